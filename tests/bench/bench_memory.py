"""Benchmark: the memory plan a recipe shows before its run against the measured peak of its LoRA step.

Each config is a recipe (LoadModel, Bucketer, Cache, LoRAInject, Optimizer, TrainLoop) planned by
the product's planner (``app/ml/memory/recipe_plan.py``: configs on the meta device, the family
module's measured activation profile, nothing calibrated here), then run for real in a fresh
subprocess: the denoiser built from the same config, quantized as LoadModel does (the family's
``quant_keep`` layers kept), LoRA rank 16 on the layers LoRAInject selects, AdamW, one step on
random cached latents and text. Measured: the resident size above the warmed-up process before the
model was built, at the step's peak (a thread samples /proc/self/statm every millisecond; large
allocations mmap-backed so freed tensors leave at once): the weights as loaded plus the step's
growth; on CUDA ``torch.cuda.max_memory_allocated``.

Block swap on a CPU runs the real BlockSwap hooks but moves nothing (host and device are the
same memory): its rows compare against the plan without the swap saving, which is listed apart.

Configs (cached latents and text: only the denoiser is on the device):
  tiny-sd        builtin:tiny-sd, fp32, 512 px (64x64 latents), attn-only LoRA
  tiny-flux      builtin:tiny-flux, fp32, 512 px (1024 image + 32 text tokens), attn-mlp LoRA
  sd15           the full-size SD 1.5 UNet, bf16, 256 px (32x32 latents), attn-mlp LoRA
  flux:FMT[:ckpt][:swapN]  the Flux dev transformer at full width (3072, 24 heads) with 1 double +
                 2 single blocks, bf16 / fp8 / nf4 Linear weights, 256 px (256 image + 32 text
                 tokens), attn-mlp LoRA; ckpt: gradient checkpointing; swapN: blocks_to_swap N (of
                 3 blocks, one prefetched: swap2 keeps 2 on the device, a GPU saves one block)

Run: OMP_NUM_THREADS=1 python tests/bench/bench_memory.py [--configs tiny-sd,flux:nf4,...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIGS = ["tiny-sd", "tiny-flux", "sd15", "flux:bf16", "flux:fp8", "flux:nf4", "flux:bf16:ckpt", "flux:nf4:ckpt:swap2"]
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    def __init__(self):
        self.peak, self._stop = rss(), False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop:
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def stop(self) -> int:
        self._stop = True
        self._t.join()
        return max(self.peak, rss())


def _trim():
    """Return freed heap to the system, so a later peak is not hidden in malloc's free lists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


# ---- the recipes ---------------------------------------------------------------------------------

BASE = {
    "format_version": 1, "meta": {"title": "memory benchmark"},
    "nodes": {
        "1": {"type": "LoadModel", "version": 1, "params": {}},
        "2": {"type": "Concept", "version": 1, "params": {"folder": "data"}},
        "3": {"type": "Bucketer", "version": 2, "params": {"batch_size": 1}},
        "4": {"type": "Cache", "version": 1, "params": {"cache_text": True}},
        "5": {"type": "LoRAInject", "version": 1, "params": {"rank": 16, "alpha": 16.0, "text_encoder_layers": "none"}},
        "6": {"type": "Optimizer", "version": 1, "params": {"optimizer": "adamw"}},
        "7": {"type": "TrainLoop", "version": 2, "params": {"gradient_checkpointing": False}},
    },
    "links": [
        {"id": 1, "from_node": "1", "from_output": "model", "to_node": "5", "to_input": "model"},
        {"id": 2, "from_node": "2", "from_output": "dataset", "to_node": "3", "to_input": "datasets"},
        {"id": 3, "from_node": "1", "from_output": "model", "to_node": "3", "to_input": "model"},
        {"id": 4, "from_node": "1", "from_output": "model", "to_node": "4", "to_input": "model"},
        {"id": 5, "from_node": "3", "from_output": "buckets", "to_node": "4", "to_input": "buckets"},
        {"id": 6, "from_node": "5", "from_output": "model", "to_node": "7", "to_input": "model"},
        {"id": 7, "from_node": "4", "from_output": "buckets", "to_node": "7", "to_input": "buckets"},
        {"id": 8, "from_node": "6", "from_output": "optimizer", "to_node": "7", "to_input": "optimizer"},
    ],
    "ui": {},
}


def _flux_folder(tmp: Path) -> Path:
    """A diffusers FLUX.1 folder of configs only (no weights): the dev configs, 1 + 2 blocks."""
    from app.ml.flux.variants import CONFIGS

    src = CONFIGS / "flux1-dev"
    for f in src.rglob("*.json"):
        dst = tmp / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(f.read_text())
        if f.relative_to(src).as_posix() == "transformer/config.json":
            data.update(num_layers=1, num_single_layers=2)
        dst.write_text(json.dumps(data))
    return tmp


def recipe_for(config: str, tmp: Path) -> dict:
    name, *opts = config.split(":")
    r = copy.deepcopy(BASE)
    load, bucket, inject, loop = (r["nodes"][k]["params"] for k in ("1", "3", "5", "7"))
    if name == "tiny-sd":
        load.update(source="builtin:tiny-sd", unet_dtype="fp32")
        bucket.update(resolution="512x512")
        inject.update(unet_layers="attn-only")
        loop.update(train_dtype="fp32")
    elif name == "tiny-flux":
        load.update(source="builtin:tiny-flux", unet_dtype="fp32")
        bucket.update(resolution="512x512")
        inject.update(unet_layers="attn-mlp")
        loop.update(train_dtype="fp32")
    elif name == "sd15":
        load.update(source="", family="sd15", unet_dtype="bf16")
        bucket.update(resolution="256x256")
        inject.update(unet_layers="attn-mlp")
        loop.update(train_dtype="bf16")
    elif name == "flux":
        load.update(source=str(_flux_folder(tmp)), unet_dtype="bf16", text_max_length=32,
                    denoiser_quant=opts[0] if opts and opts[0] != "bf16" else "none")
        bucket.update(resolution="256x256")
        inject.update(unet_layers="attn-mlp")
        loop.update(train_dtype="bf16")
    else:
        raise SystemExit(f"unknown config {config!r}")
    for o in opts:
        if o == "ckpt":
            loop["gradient_checkpointing"] = True
        elif o.startswith("swap"):
            loop["blocks_to_swap"] = int(o[4:])
    return r


# ---- the measured step ---------------------------------------------------------------------------

def _warm_up():
    """Import and run once what the step uses, so the baseline already holds the code and libraries."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401

    from app.ml.models.tiny import tiny_spec

    unet = UNet2DConditionModel(**tiny_spec("tiny-sd").unet)
    unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim)
         ).sample.mean().backward()
    del unet
    lin = torch.nn.Linear(64, 64)
    lin(torch.randn(4, 64, requires_grad=True)).sum().backward()
    torch.optim.AdamW(lin.parameters()).step()
    _trim()


def _build(fam, configs, dtype):
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    cfg = {k: v for k, v in configs[fam.denoiser].items() if not k.startswith("_")}
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.no_grad():
            cls = FluxTransformer2DModel if fam.denoiser == "transformer" else UNet2DConditionModel
            return cls.from_config(cfg).requires_grad_(False)
    finally:
        torch.set_default_dtype(old)


def worker(config: str, device: str) -> dict:
    import torch

    from app.graph.recipe import parse_recipe
    from app.graph.registry import load_registry
    from app.ml.adapters.modules import LoRAModule
    from app.ml.memory import recipe_plan
    from app.ml.memory.quant import quantize_component

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    tmp = Path(tempfile.mkdtemp(prefix="bench_memory_"))
    data = recipe_for(config, tmp)
    registry = load_registry()
    graph, problems = parse_recipe(data, registry=registry)
    rp = recipe_plan.plan_graph(graph, registry, tmp)[0]  # the plan, before anything is built
    plan = rp.plan
    lp, tp, ip = (graph.nodes[k].params for k in ("1", "7", "5"))
    g = recipe_plan._graph_from(graph, registry)
    model_info = recipe_plan._model_of(g.nodes["1"]["params"], tmp, "LoadModel")
    fam = model_info.family
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[lp.get("unet_dtype", "fp32")]
    _warm_up()
    base_rss = rss()
    model = _build(fam, model_info.configs, dtype)
    quant = lp.get("denoiser_quant", "none")
    if quant and quant != "none":
        quantize_component(model, quant, fam.denoiser, keep=getattr(fam, "quant_keep", ()))
    _trim()
    loaded = rss() - base_rss  # the weights as held (a quantizing load's conversion peak is not the step's)
    names = set(fam.adapter_targets(model, fam.denoiser, ip.get("unet_layers", "attn-mlp"), (), True))
    loras = torch.nn.ModuleList()
    for n, m in model.named_modules():
        if n in names and isinstance(m, torch.nn.Linear):
            lora = LoRAModule(m, 16, 16.0)
            m.register_forward_hook(lambda mod, inp, out, lora=lora: lora(mod, inp[0], out, 1.0))
            loras.append(lora)
    swap = None
    if tp.get("blocks_to_swap"):
        from app.ml.memory.swap import BlockSwap

        blocks = torch.nn.ModuleList(fam.swappable_blocks(model))
        swap = BlockSwap(blocks, max(1, len(blocks) - int(tp["blocks_to_swap"])), device)
    if tp.get("gradient_checkpointing"):
        model.enable_gradient_checkpointing()
    model.train()
    width, height = (int(x) for x in graph.nodes["3"].params["resolution"].split("x"))
    f = fam.vae_scale_factor
    c = model.config
    if fam.denoiser == "transformer":
        side_h, side_w = height // (2 * f), width // (2 * f)
        text = int(lp.get("text_max_length") or 32)
        ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side_h).float(), torch.arange(side_w).float(),
                                         indexing="ij"), -1).reshape(-1, 3).to(dtype)

        def forward():
            kw = {"guidance": torch.tensor([1.0], dtype=dtype)} if c.guidance_embeds else {}
            return model(hidden_states=torch.randn(1, side_h * side_w, c.in_channels, dtype=dtype),
                         encoder_hidden_states=torch.randn(1, text, c.joint_attention_dim, dtype=dtype),
                         pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
                         timestep=torch.tensor([0.5], dtype=dtype), img_ids=ids,
                         txt_ids=torch.zeros(text, 3, dtype=dtype), **kw).sample
    else:
        def forward():
            return model(torch.randn(1, c.in_channels, height // f, width // f, dtype=dtype), torch.tensor([500]),
                         encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, dtype=dtype)).sample
    opt = torch.optim.AdamW(loras.parameters(), lr=1e-4)

    def step():
        loss = forward().float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    _trim()
    before_step = rss()
    meter = PeakRSS()
    step()
    step_peak = meter.stop()
    _trim()
    before_second = rss()
    meter = PeakRSS()
    t0 = time.perf_counter()
    step()
    ms = (time.perf_counter() - t0) * 1000
    second_peak = meter.stop()
    if swap is not None:
        swap.remove()
    measured = loaded + (step_peak - before_step)
    saving = -plan.parts.get("block swap (weights in RAM)", 0.0)
    predicted = plan.peak + (saving if device == "cpu" else 0.0)  # a CPU's block swap moves nothing
    return {"config": config, "predicted_mb": predicted / 2**20, "measured_mb": measured / 2**20,
            "error": (predicted - measured) / measured, "ms_step": ms, "weights_mb": loaded / 2**20,
            "second_step_mb": (loaded + second_peak - before_second) / 2**20,
            "swap_saving_on_gpu_mb": saving / 2**20, "tokens": rp.tokens,
            "breakdown_mb": {k: round(v / 2**20, 1) for k, v in plan.parts.items() if v}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each config (fresh processes)")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.device)))
        return
    rows = []
    for c in [c for _ in range(args.rounds) for c in args.configs.split(",")]:
        # large blocks straight from mmap: freed tensors leave the resident size at once, so the
        # measured peak is the tensors', not glibc's free lists' (fragmentation of a quantizing load)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                   MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, "--worker", c, "--device", args.device], capture_output=True,
                             text=True, env=env)
        if out.returncode:
            print(f"{c}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{'config':<22} {'predicted MB':>12} {'measured MB':>12} {'error':>7} {'ms/step':>9}  swap saving on a GPU")
    for r in rows:
        swap = f"{r['swap_saving_on_gpu_mb']:.0f} MB" if r["swap_saving_on_gpu_mb"] else ""
        print(f"{r['config']:<22} {r['predicted_mb']:12.1f} {r['measured_mb']:12.1f} {r['error']:+7.1%} "
              f"{r['ms_step']:9.0f}  {swap}")


if __name__ == "__main__":
    main()
