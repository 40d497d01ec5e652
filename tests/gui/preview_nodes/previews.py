"""Test-only nodes that report every kind of preview, so the editor's previews, plots and
badges can be tested (and shown in the docs) before the real dataset and training nodes land.
Loaded as a plugin folder: `launch.py --nodes-dir tests/gui/preview_nodes gui ...`.
"""

import io
import math
import time

from app.graph.spec import Float, Int, Output, Socket, String, node

COLOURS = {"red": (220, 50, 50), "blue": (50, 90, 220), "green": (40, 170, 80), "yellow": (230, 200, 40)}


def _png(colour, shape: str, size: int = 64, noise: float = 0.0, seed: int = 0) -> bytes:
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    m = size // 6
    if shape == "circle":
        d.ellipse((m, m, size - m, size - m), fill=colour)
    else:
        d.rectangle((m, m, size - m, size - m), fill=colour)
    if noise:
        arr = np.asarray(img, dtype=np.float32)
        arr = np.clip(arr + rng.normal(0, 255 * noise, arr.shape), 0, 255).astype("uint8")
        img = Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@node(type="GuiDemoConcept", category="gui-demo", description="A generated concept: coloured shapes with captions.",
      inputs=[Int("images", 6, min=1, max=32, tooltip="how many shapes"), String("name", "shapes")],
      outputs=[Output("dataset", "DATASET")])
def demo_concept(ctx, images, name):
    names = list(COLOURS)
    items = []
    for i in range(images):
        colour = names[i % len(names)]
        shape = "circle" if i % 2 == 0 else "square"
        items.append((f"{colour} {shape}", _png(COLOURS[colour], shape, seed=i)))
    ctx.preview("images", images=[p for _, p in items], captions=[c for c, _ in items])
    return {"name": name, "captions": [c for c, _ in items]}


@node(type="GuiDemoBucketer", category="gui-demo", description="Pretend buckets: a histogram and a dropped list.",
      inputs=[Socket("dataset", "DATASET"), Int("batch_size", 4, min=1, max=64)],
      outputs=[Output("buckets", "BUCKETS")])
def demo_bucketer(ctx, dataset, batch_size):
    labels = ["512x512", "448x576", "576x448", "384x640"]
    counts = [8, 5, 3, 1]
    ctx.preview("histogram", labels=labels, counts=counts, title="images per bucket")
    ctx.preview("table", title="dropped (cannot fill a batch)", columns=["image", "bucket"],
                rows=[["tall_07.png", "384x640"]])
    return {"batches": sum(counts) // batch_size, "dataset": dataset}


@node(type="GuiDemoTrain", category="gui-demo",
      description="A pretend training loop: metric events (loss, lr, steps/s, ETA) and samples over time.",
      inputs=[Socket("buckets", "BUCKETS"), Int("steps", 60, min=1, max=100000),
              Float("step_s", 0.02, min=0.0, max=10.0), Int("sample_every", 20, min=1, max=100000),
              Float("lr", 1e-3, min=0.0, max=1.0)],
      outputs=[Output("model", "MODEL")])
def demo_train(ctx, buckets, steps, step_s, sample_every, lr):
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        time.sleep(step_s)
        warm = min(1.0, step / max(1, steps // 10))
        cur_lr = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = 0.15 + 0.6 * math.exp(-step / (steps / 4)) + 0.03 * math.sin(step * 1.7)
        elapsed = time.monotonic() - t0
        sps = step / elapsed if elapsed > 0 else 0.0
        ctx.metric(loss=loss, lr=cur_lr, steps_per_s=sps, eta_s=(steps - step) / sps if sps else 0.0, step=step,
                   epoch=step * 4 // steps)
        ctx.progress(step, steps)
        if step % sample_every == 0 or step == steps:
            noise = max(0.0, 0.5 * (1 - step / steps))
            ctx.preview("images", images=[_png(COLOURS["red"], "circle", noise=noise, seed=step),
                                          _png(COLOURS["blue"], "square", noise=noise, seed=step + 1)],
                        captions=[f"red circle (step {step})", f"blue square (step {step})"])
    return {"steps": steps}
