"""Measures the activation profiles the family modules carry (``ACTIVATION_PROFILES`` in
``app/ml/models/families/sd.py``, ``sdxl.py``, ``flux.py``; see ``families/memory.py``).

For each denoiser: the peak growth of the resident size during one forward + backward (frozen
weights, the input requiring grad, as under an adapter) at three token counts, without and with
gradient checkpointing; the per-token cost is the slope between the two larger counts, and the
slope between the two smaller ones is printed next to it (equal slopes: no quadratic part, i.e.
no attention-score matrices held). Transformers with repeated blocks (Flux) are measured at three
depths (1+1, 2+1, 1+2 double + single blocks) to split the cost into a base and a cost per block,
so a profile measured at reduced depth holds at full depth (the tiny Flux is measured whole). ``first_step``: the first step at the
largest size over a later one (allocator growth and kernel workspaces that later steps reuse: a
run's peak includes its first step). ``adapter_factor``: the extra peak of
the same step with LoRA (rank 16, the family's attn-mlp layers) per byte of the adapted layers'
inputs. Each model runs in a fresh subprocess (mmap-backed large allocations, as the benchmark).

Profiles: tiny-sd, tiny-sdxl, shapes-sd (fp32), tiny-flux (fp32), sd15, flux-dev (full width, bf16), and
with ``--full`` sdxl (bf16; 5 GB of weights and minutes a step on a small CPU).

Run: OMP_NUM_THREADS=1 python tests/bench/measure_coefficients.py [--only tiny-sd,sd15] [--full]
and paste the printed ``ActivationProfile(...)`` lines into the family modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

PROFILES = ["tiny-sd", "tiny-sdxl", "shapes-sd", "tiny-flux", "sd15", "flux-dev"]
FULL = ["sdxl"]


def _unet(name: str):
    import torch
    from diffusers import UNet2DConditionModel

    if name in ("tiny-sd", "tiny-sdxl", "shapes-sd"):
        from app.ml.models.tiny import tiny_spec

        spec = tiny_spec(name)
        return UNet2DConditionModel(**spec.unet), spec.family, torch.float32
    from app.ml.models.families import get_family
    from app.ml.models.tiny import CONFIGS

    fam = get_family(name)
    cfg = json.loads((CONFIGS / fam.config_dir / "unet" / "config.json").read_text())
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = UNet2DConditionModel.from_config(cfg)
    finally:
        torch.set_default_dtype(old)
    return model, fam, torch.bfloat16


def _flux(name: str, double: int, single: int):
    import torch
    from diffusers import FluxTransformer2DModel

    from app.ml.models.families import get_family

    if name == "tiny-flux":
        from app.ml.flux.tiny import component_config

        cfg, dtype = component_config("transformer"), torch.float32
    else:
        from app.ml.flux.variants import config

        cfg, dtype = config("dev", "transformer"), torch.bfloat16
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if double is not None:  # reduced depth: split the cost per block
        cfg.update(num_layers=double, num_single_layers=single)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    return model, get_family("flux-dev"), dtype


def _runner(model, family, dtype):
    """run(side) -> output of a forward with grad on the input: UNet latents side x side, Flux
    side^2 image tokens and side^2 / 4 text tokens. tokens(side): what the profile counts."""
    import torch

    if family.denoiser == "transformer":
        c = model.config

        def run(side):
            n_img, n_txt = side * side, side * side // 4
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(),
                                             indexing="ij"), -1).reshape(-1, 3).to(dtype)
            kw = {"guidance": torch.tensor([1.0], dtype=dtype)} if c.guidance_embeds else {}
            return model(hidden_states=torch.randn(1, n_img, c.in_channels, dtype=dtype, requires_grad=True),
                         encoder_hidden_states=torch.randn(1, n_txt, c.joint_attention_dim, dtype=dtype),
                         pooled_projections=torch.randn(1, c.pooled_projection_dim, dtype=dtype),
                         timestep=torch.tensor([0.5], dtype=dtype), img_ids=ids, txt_ids=torch.zeros(n_txt, 3, dtype=dtype),
                         **kw).sample

        return run, lambda side: side * side + side * side // 4
    c = model.config

    def run(side):
        kw = {}
        if c.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, dtype=dtype),
                                       "time_ids": torch.zeros(1, 6, dtype=dtype)}
        x = torch.randn(1, c.in_channels, side, side, dtype=dtype, requires_grad=True)
        return model(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, c.cross_attention_dim, dtype=dtype),
                     **kw).sample

    return run, lambda side: side * side


def _sides(name: str) -> tuple[int, int, int]:
    return {"tiny-sd": (16, 32, 48), "tiny-sdxl": (16, 32, 48), "shapes-sd": (16, 32, 48), "sd15": (8, 16, 24), "sdxl": (16, 24, 32),
            "tiny-flux": (16, 32, 48), "flux-dev": (8, 12, 16)}[name]


def _attach_lora(model, family):
    """LoRA rank 16 on the family's attn-mlp layers (forward hooks, as adapters attach), and the
    bytes of the adapted layers' inputs during one forward (each input tensor once)."""
    import torch.nn as nn

    from app.ml.adapters.modules import LoRAModule

    names = set(family.adapter_targets(model, family.denoiser, "attn-mlp", (), False))
    loras = nn.ModuleList()
    for name, m in model.named_modules():
        if name in names and isinstance(m, nn.Linear):
            lora = LoRAModule(m, 16, 16).to(m.weight.dtype)
            m.register_forward_hook(lambda mod, inp, out, lora=lora: lora(mod, inp[0], out, 1.0))
            loras.append(lora)
    return names, loras


def input_bytes(model, names, fn) -> int:
    """Bytes of the distinct input tensors of the modules ``names`` while ``fn`` runs."""
    import torch

    seen: dict[int, tuple] = {}

    def hook(mod, inp, out):  # returns None: the output is left alone
        seen.setdefault(id(inp[0]), (inp[0], inp[0].nbytes))

    hooks = [m.register_forward_hook(hook) for n, m in model.named_modules() if n in names]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in hooks:
            h.remove()
    return sum(b for _, b in seen.values())


def _growth(model, run, side) -> int:
    from app.ml.memory.plan import peak_growth

    def step():
        run(side).float().square().mean().backward()

    first = peak_growth(step)  # the first pass at this size
    return first, min(first, peak_growth(step))


def worker(name: str, depth: str | None) -> dict:
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if "flux" in name:
        d, s = (int(x) for x in depth.split("+")) if depth else (None, None)
        model, family, dtype = _flux(name, d, s)
    else:
        model, family, dtype = _unet(name)
    model.requires_grad_(False)
    run, tokens = _runner(model, family, dtype)
    sides = _sides(name)
    out = {"name": name, "depth": depth, "dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
           "class": type(model).__name__, "config": {k: v for k, v in dict(model.config).items() if not k.startswith("_")}}
    run(sides[0]).float().sum().backward()  # lazy set-up once
    for ckpt in (False, True):
        if ckpt:
            model.enable_gradient_checkpointing()
            model.train()
        # the largest size first: its first pass is then a run's first step (nothing at that size before)
        last = _growth(model, run, sides[2])
        pairs = [_growth(model, run, s) for s in sides[:2]] + [last]
        g = [steady for _, steady in pairs]
        t = [tokens(s) for s in sides]
        out["ckpt" if ckpt else "full"] = {"low": (g[1] - g[0]) / (t[1] - t[0]), "slope": (g[2] - g[1]) / (t[2] - t[1]),
                                           "growth": g, "tokens": t, "first_step": pairs[2][0] / max(1, pairs[2][1])}
    if depth in (None, "1+1"):  # the adapter's extra, once per model
        model.disable_gradient_checkpointing()
        base = out["full"]["growth"][2]
        names, loras = _attach_lora(model, family)
        run(sides[0]).float().sum().backward()
        with_lora = _growth(model, run, sides[2])[1]
        inputs = input_bytes(model, names, lambda: run(sides[2]))
        out["adapter_factor"] = (with_lora - base) / inputs if inputs else 1.0
        out["adapter_inputs"] = inputs
    return out


def _profile(name: str, rows: list[dict]) -> str:
    from app.ml.models.families.memory import signature, width_of

    first = rows[0]
    sig = signature(first["class"], first["config"])
    width = width_of(first["class"], first["config"])
    if len(rows) == 1:
        base, ckpt, blocks = first["full"]["slope"], first["ckpt"]["slope"], ()
    else:
        by = {r["depth"]: r for r in rows}
        g = {k: (by[k]["full"]["slope"], by[k]["ckpt"]["slope"]) for k in by}
        # a checkpointed block keeps at least its input (width x dtype bytes a token): a smaller
        # difference is the noise of two larger measurements
        floor = width * (2 if first["dtype"] == "bf16" else 4)
        dbl = tuple(g["2+1"][i] - g["1+1"][i] for i in range(2))
        sgl = tuple(g["1+2"][i] - g["1+1"][i] for i in range(2))
        dbl, sgl = (dbl[0], max(dbl[1], floor)), (sgl[0], max(sgl[1], floor))
        base, ckpt = (g["1+1"][i] - dbl[i] - sgl[i] for i in range(2))
        blocks = (("transformer_blocks", round(dbl[0], 1), round(dbl[1], 1)),
                  ("single_transformer_blocks", round(sgl[0], 1), round(sgl[1], 1)))
    sides = _sides(name)
    return (f"ActivationProfile(\n    name={name!r},\n    signature={sig!r},\n    dtype={first['dtype']!r}, width={width!r},\n"
            f"    base={base:.1f}, ckpt_base={ckpt:.1f},\n    per_block={blocks!r},\n"
            f"    adapter_factor={first['adapter_factor']:.2f}, first_step={first['full']['first_step']:.2f},\n"
            f"    measured=\"tests/bench/measure_coefficients.py, CPU, latent sides {sides}\",\n),")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated profile names")
    ap.add_argument("--full", action="store_true", help="also the full-size SDXL UNet (slow)")
    ap.add_argument("--worker")
    ap.add_argument("--depth")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.depth)))
        return
    names = args.only.split(",") if args.only else PROFILES + (FULL if args.full else [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               MALLOC_MMAP_THRESHOLD_="131072")
    for name in names:
        # the tiny transformer is measured whole: its blocks are too small to tell apart from the rest
        depths = ["1+1", "2+1", "1+2"] if name == "flux-dev" else [None]
        rows = []
        for depth in depths:
            cmd = [sys.executable, __file__, "--worker", name] + (["--depth", depth] if depth else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{name} {depth or ''}: failed\n{out.stderr[-2000:]}")
                break
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"# {name} {depth or ''}: per token {row['full']['low']:.0f} -> {row['full']['slope']:.0f} B "
                  f"(checkpointed {row['ckpt']['low']:.0f} -> {row['ckpt']['slope']:.0f}) at tokens {row['full']['tokens']}"
                  + f"; first step x{row['full']['first_step']:.2f}"
                  + (f"; adapter factor {row['adapter_factor']:.2f} on {row['adapter_inputs'] / 2**20:.1f} MiB of inputs"
                     if "adapter_factor" in row else ""), flush=True)
        else:
            print(_profile(name, rows), flush=True)


if __name__ == "__main__":
    main()
