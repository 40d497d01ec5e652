"""Comparing finished runs: `launch.py compare WS1 WS2 ... [--out DIR] [--prompts ...] [--step N]`.

Writes into one folder:

    grid.png      the same prompts and seeds sampled from each run's final output (or the periodic save
                  of ``--step``), one row per run, one column per prompt; sampled through the real
                  LoadModel -> LoRAInject(init_from) -> Sample nodes, in one executor (a base model shared
                  by the runs loads once)
    loss.png      training loss (raw, faint; smoothed, solid) and validation loss (dashed) of every run
    compare.md    the settings that differ between the runs, with steps and final losses (and compare.csv)
    recipes/      each run's recipe
    compare.json  what was compared and where each file is (the editor's compare window reads it)

A run's recipe is ``<workspace>/recipe.json`` (sweeps and the queue write it), else the one the saved
file carries in its metadata. Losses come from ``<workspace>/events.jsonl``, else from TrainLoop's
TensorBoard logs.
"""

from __future__ import annotations

import csv
import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


class CompareError(ValueError):
    """A run that cannot be compared: the message names the workspace and what is missing."""


@dataclass
class Run:
    name: str
    workspace: Path
    recipe: dict
    output: Path  # the LoRA file, checkpoint or diffusers folder sampled from
    adapter: bool
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss)
    smoothed: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, float]] = field(default_factory=list)


# ---- reading a run ---------------------------------------------------------------------------------

def safetensors_metadata(path: Path) -> dict:
    """The ``__metadata__`` of a .safetensors file, read from its header (no tensors loaded)."""
    try:
        with open(path, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            if n > 100_000_000:
                return {}
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def _final_output(ws: Path, step: int | None) -> Path:
    if step is not None:
        found = sorted(ws.glob(f"TrainLoop_*/saves/step_{step:07d}.safetensors"))
        if found:
            return found[0]
        steps = sorted({int(p.stem.split("_")[-1]) for p in ws.glob("TrainLoop_*/saves/step_*.safetensors")})
        raise CompareError(f"{ws}: no save of step {step}" + (f" (saved steps: {', '.join(map(str, steps))})" if steps
                           else "; set TrainLoop.save_every to keep periodic saves"))
    files = [p for p in ws.glob("*.safetensors") if p.is_file()]
    files += [p for p in ws.iterdir() if p.is_dir() and (p / "model_index.json").is_file()] if ws.is_dir() else []
    if not files:
        raise CompareError(f"{ws}: no saved model or LoRA in the workspace (did the run finish? its Save node "
                           f"writes one); compare --step N uses a periodic save instead")
    return max(files, key=lambda p: p.stat().st_mtime)


def _recipe(ws: Path, output: Path) -> dict:
    p = ws / "recipe.json"
    if p.is_file():
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise CompareError(f"{p}: not a recipe ({e})") from None
    if output.is_file():
        text = safetensors_metadata(output).get("nodetrainer_recipe")
    else:  # a diffusers folder keeps the same metadata in nodetrainer.json
        try:
            text = json.loads((output / "nodetrainer.json").read_text(encoding="utf-8")).get("nodetrainer_recipe")
        except (OSError, ValueError, AttributeError):
            text = None
    if text:
        try:
            return json.loads(text)
        except ValueError:
            pass
    raise CompareError(f"{ws}: no recipe.json and {output.name} carries no recipe; compare runs made by NodeTrainer")


def _from_events(path: Path, run: Run) -> bool:
    if not path.is_file():
        return False
    last_step = 0  # a validation metric may come without a step: it belongs to the last training step
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue
        if e.get("event") != "metric":
            continue
        v = e.get("values") or {}
        step = v.get("step", last_step if "validation_loss" in v else None)
        if step is None:
            continue
        last_step = step
        if v.get("loss") is not None:
            run.losses.append((int(step), float(v["loss"])))
        if v.get("smooth_loss") is not None:
            run.smoothed.append((int(step), float(v["smooth_loss"])))
        if v.get("validation_loss") is not None:
            run.validation.append((int(step), float(v["validation_loss"])))
    _keep_last_attempt(run)
    return bool(run.losses or run.validation)


def _keep_last_attempt(run: Run) -> None:
    """An events file appended by a resumed run repeats steps: keep the latest value of each step."""
    for attr in ("losses", "smoothed", "validation"):
        by_step = dict(getattr(run, attr))
        setattr(run, attr, sorted(by_step.items()))


def _from_tensorboard(ws: Path, run: Run) -> None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        return
    for folder in sorted(ws.glob("TrainLoop_*/tensorboard")):
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        tags = set(acc.Tags().get("scalars", []))
        for tag, attr in (("loss/train", "losses"), ("loss/smoothed", "smoothed"), ("loss/validation", "validation")):
            if tag in tags:
                getattr(run, attr).extend((int(s.step), float(s.value)) for s in acc.Scalars(tag))
    _keep_last_attempt(run)


def read_run(ws: str | Path, step: int | None = None) -> Run:
    ws = Path(ws)
    if not ws.is_dir():
        raise CompareError(f"{ws}: no such workspace folder")
    output = _final_output(ws, step)
    recipe = _recipe(ws, output)
    adapter = any(n.get("type") == "LoRAInject" for n in (recipe.get("nodes") or {}).values())
    run = Run(ws.name, ws.resolve(), recipe, output.resolve(), adapter)
    if not _from_events(ws / "events.jsonl", run):
        _from_tensorboard(ws, run)
    return run


# ---- settings that differ ------------------------------------------------------------------------

def settings(recipe: dict) -> dict[str, object]:
    """"Title.param" -> value for every node param (nodes by title, else type, else id)."""
    nodes = recipe.get("nodes") or {}
    labels: dict[str, str] = {}
    for nid, n in nodes.items():
        label = n.get("title") or n.get("type") or nid
        if sum(1 for m in nodes.values() if (m.get("title") or m.get("type")) == label) > 1:
            label = f"{label} ({nid})"
        labels[nid] = label
    out = {}
    for nid, n in nodes.items():
        for k, v in (n.get("params") or {}).items():
            out[f"{labels[nid]}.{k}"] = v
    return out


def differing(runs: list[Run]) -> list[str]:
    """Keys whose value is not the same in every run (a param missing in one run counts as different)."""
    all_settings = [settings(r.recipe) for r in runs]
    keys = sorted(set().union(*all_settings))
    return [k for k in keys if len({json.dumps(s[k] if k in s else "<none>", sort_keys=True, default=str)
                                    for s in all_settings}) > 1]


# ---- sampling ------------------------------------------------------------------------------------

def _node(recipe: dict, type_: str) -> dict:
    return next((n for n in (recipe.get("nodes") or {}).values() if n.get("type") == type_), {})


def default_prompts(runs: list[Run]) -> list[str]:
    for r in runs:
        text = (_node(r.recipe, "TrainLoop").get("params") or {}).get("sample_prompts") or \
               (_node(r.recipe, "Sample").get("params") or {}).get("prompt") or ""
        prompts = [p.strip() for p in str(text).splitlines() if p.strip()]
        if prompts:
            return prompts[:8]
    return ["a photo"]


def _size(runs: list[Run]) -> int:
    res = str((_node(runs[0].recipe, "Bucketer").get("params") or {}).get("resolution", "512"))
    try:
        return max(64, int(res.split(",")[-1].split("x")[0]))
    except ValueError:
        return 512


def sample_runs(runs: list[Run], prompts: list[str], out: Path, *, seed: int, steps: int, size: int, registry,
                log: Callable[[str], None]) -> dict[str, list[str]]:
    """Sample every run's output through LoadModel -> (LoRAInject init_from) -> Sample in one executor."""
    from app.engine.executor import Executor
    from app.graph.model import Graph

    executor = Executor(registry, keep_outputs=True)  # runs on one base model load it once
    images: dict[str, list[str]] = {}
    for run in runs:
        load = dict(_node(run.recipe, "LoadModel").get("params") or {})
        train = _node(run.recipe, "TrainLoop").get("params") or {}
        g = Graph()
        spec = registry.get("LoadModel")
        if run.adapter:
            g.add_node("LoadModel", spec.version, {k: v for k, v in load.items() if spec.input(k)}, node_id="1")
            g.add_node("LoRAInject", registry.get("LoRAInject").version, {"init_from": str(run.output)}, node_id="2")
            g.add_link("1", "model", "2", "model")
            src = "2"
        else:  # a fine-tune: its saved checkpoint is the model
            params = {k: v for k, v in load.items() if spec.input(k) and k not in ("source", "vae")}
            g.add_node("LoadModel", spec.version, {**params, "source": str(run.output)}, node_id="1")
            src = "1"
        sampler = train.get("sample_sampler") or "euler"
        g.add_node("Sample", registry.get("Sample").version,
                   {"prompt": "\n".join(prompts), "width": size, "height": size, "steps": steps,
                    "cfg": float(train.get("sample_cfg", 7.0)), "seed": seed, "sampler": sampler}, node_id="3")
        g.add_link(src, "model", "3", "model")
        ws = out / "samples" / run.name
        log(f"sampling {run.name} ({run.output.name}) ...")
        result = executor.run(g, ["3"], recipe_dir=run.workspace, workspace=ws,
                              emit=lambda e: log(f"  {e.get('message')}") if e.get("event") == "node_error" else None)
        if result.status != "done":
            raise CompareError(f"{run.workspace}: sampling failed: {result.error or result.problems}")
        images[run.name] = list(result.outputs["3"]["images"]["paths"])
    return images


def grid(images: dict[str, list[str]], prompts: list[str], path: Path, cell_min: int = 192) -> Path:
    from PIL import Image, ImageDraw

    names = list(images)
    first = Image.open(images[names[0]][0])
    scale = max(1, -(-cell_min // max(first.size)))  # tiny images are enlarged (nearest) to be seen
    cw, ch = first.size[0] * scale, first.size[1] * scale
    label_w, head_h = 220, 40
    canvas = Image.new("RGB", (label_w + cw * len(prompts), head_h + ch * len(names)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, prompt in enumerate(prompts):
        draw.text((label_w + j * cw + 4, 4), prompt[: max(8, cw // 7)], fill="black")
        draw.text((label_w + j * cw + 4, 20), prompt[max(8, cw // 7): 2 * max(8, cw // 7)], fill="black")
    for i, name in enumerate(names):
        draw.text((4, head_h + i * ch + ch // 2 - 6), name[:34], fill="black")
        for j, p in enumerate(images[name][: len(prompts)]):
            im = Image.open(p).convert("RGB").resize((cw, ch), Image.NEAREST)
            canvas.paste(im, (label_w + j * cw, head_h + i * ch))
    canvas.save(path)
    return path


def plot_losses(runs: list[Run], path: Path) -> Path | None:
    if not any(r.losses or r.validation for r in runs):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
    for i, r in enumerate(runs):
        color = f"C{i % 10}"
        if r.losses:
            ax.plot(*zip(*r.losses), color=color, alpha=0.25, linewidth=0.8)
        if r.smoothed:
            ax.plot(*zip(*r.smoothed), color=color, linewidth=1.8, label=f"{r.name} (train, smoothed)")
        elif r.losses:
            ax.plot([], [], color=color, label=f"{r.name} (train)")
        if r.validation:
            ax.plot(*zip(*r.validation), color=color, linestyle="--", marker="o", markersize=3,
                    label=f"{r.name} (validation)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _last(series: list[tuple[int, float]]):
    return series[-1][1] if series else None


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.5g}"
    return json.dumps(v) if not isinstance(v, str) else v.replace("\n", " / ")


def table(runs: list[Run], out: Path) -> tuple[Path, Path]:
    keys = differing(runs)
    cols = ["run", *keys, "steps", "final loss", "final smoothed loss", "final validation loss"]
    rows = []
    for r in runs:
        s = settings(r.recipe)
        steps = r.losses[-1][0] if r.losses else None
        rows.append([r.name, *(_fmt(s.get(k)) for k in keys), _fmt(steps), _fmt(_last(r.losses)),
                     _fmt(_last(r.smoothed)), _fmt(_last(r.validation))])
    md = out / "compare.md"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    intro = f"# Comparison of {len(runs)} runs\n\nSettings that differ, and the final losses.\n\n"
    md.write_text(intro + "\n".join(lines) + "\n\n![samples](grid.png)\n\n![loss](loss.png)\n", encoding="utf-8")
    csv_path = out / "compare.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(rows)
    return md, csv_path


def compare_runs(workspaces, *, out=None, prompts=None, step=None, seed=1, steps=20, size=None, images=True,
                 registry=None, log: Callable[[str], None] = lambda m: None) -> Path:
    runs = [read_run(ws, step) for ws in workspaces]
    seen: dict[str, int] = {}
    for r in runs:  # two workspaces with one folder name ("a/run", "b/run")
        if r.name in seen:
            seen[r.name] += 1
            r.name = f"{r.name} ({seen[r.name]})"
        else:
            seen[r.name] = 1
    out = Path(out or Path("workspace") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipes").mkdir(exist_ok=True)
    for r in runs:
        (out / "recipes" / f"{r.name}.json").write_text(json.dumps(r.recipe, indent=2, ensure_ascii=False) + "\n",
                                                         encoding="utf-8")
    summary = {"runs": [{"name": r.name, "workspace": str(r.workspace.resolve()), "output": str(r.output.resolve()),
                         "final_loss": _last(r.losses), "final_validation_loss": _last(r.validation)} for r in runs]}
    prompts = prompts or default_prompts(runs)
    if images:
        if registry is None:
            from app.graph.registry import load_registry

            registry = load_registry()
        sampled = sample_runs(runs, prompts, out, seed=seed, steps=steps, size=size or _size(runs), registry=registry,
                              log=log)
        summary["grid"] = str(grid(sampled, prompts, out / "grid.png"))
        summary["prompts"], summary["seed"], summary["images"] = prompts, seed, sampled
    loss = plot_losses(runs, out / "loss.png")
    if loss:
        summary["loss_plot"] = str(loss)
    md, csv_path = table(runs, out)
    summary.update(table=str(md), csv=str(csv_path), differing=differing(runs))
    (out / "compare.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return out
