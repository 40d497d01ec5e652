"""Quantized base weights on a full-width Flux: weight memory of nf4 / int8 / fp8 against bf16, through
LoadModel's own quantization step, and a LoRA training step on each. Not a pytest test (a gigabyte of
weights per run, minutes of CPU).

The real dev transformer config at full width (3072, 24 heads, 4096-wide T5 context, guidance embedder)
with one double and one single block (``--double`` / ``--single``): every block of the 19 + 38 has the
same structure, so the blocks' ratio is what the whole model's weights approach. Each format runs in its
own process (a fair RSS): build in bf16, quantize with ``app.ml.models.load._quantize`` (what LoadModel
runs after loading: the Flux family's ``quant_keep`` layers stay bf16), then LoRA rank 16 on attention +
MLP (LoRAInject's preset), AdamW, bf16 autocast, a few timed steps.

Weight memory is counted exactly (``module_bytes``: parameters, buffers and packed storage with its
scales); RSS after quantizing and the step's peak growth are reported beside it. Targets: nf4 ≤ 0.35 and
fp8 ≤ 0.55 of bf16's block weights.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2 python tests/bench/bench_quant.py [--formats bf16,nf4,fp8,int8] [--steps 3]
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGETS = {"nf4": 0.35, "fp8": 0.55}


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def _transformer(double: int, single: int):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    from app.ml.flux.variants import config

    cfg = {k: v for k, v in config("dev", "transformer").items() if not k.startswith("_")}
    cfg.update(num_layers=double, num_single_layers=single)
    with init_empty_weights():
        m = FluxTransformer2DModel(**cfg)
    m = m.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    return m.requires_grad_(False).eval()


def _blocks_bytes(model) -> int:
    from app.ml.memory.quant import module_bytes

    return sum(module_bytes(b) for b in [*model.transformer_blocks, *model.single_transformer_blocks])


def _full_depth_bytes(model) -> int:
    """The weights of Flux dev's 19 double + 38 single blocks and the rest as built (each block of a kind alike)."""
    from app.ml.memory.quant import module_bytes

    double = module_bytes(model.transformer_blocks[0])
    single = module_bytes(model.single_transformer_blocks[0])
    return module_bytes(model) - _blocks_bytes(model) + 19 * double + 38 * single


def run_one(args) -> dict:
    from app.ml.adapters import AdapterConfig, attached, create_adapter_set
    from app.ml.memory.quant import module_bytes
    from app.ml.models.bundle import ModelBundle
    from app.ml.models.families.flux import FLUX_DEV
    from app.ml.models.load import _quantize

    fmt = args.one
    rss0 = _rss()
    model = _transformer(args.double, args.single)
    out = {"format": fmt, "blocks": [args.double, args.single]}
    lines: list[str] = []
    t = time.perf_counter()
    if fmt != "bf16":
        _quantize(model, fmt, "transformer", FLUX_DEV, args.fp8_block_size, lines.append)  # LoadModel's step
    out["quantize_s"] = round(time.perf_counter() - t, 2)
    gc.collect()
    out["log"] = lines
    out["model_bytes"] = module_bytes(model)
    out["block_bytes"] = _blocks_bytes(model)
    out["full_depth_bytes"] = _full_depth_bytes(model)
    out["rss_weights"] = _rss() - rss0

    bundle = ModelBundle(family=FLUX_DEV, denoiser=model, vae=None, text_encoders=(None, None),
                         tokenizers=(None, None), scheduler_config={}, dtypes={"transformer": torch.bfloat16},
                         identities={}, source="bench", quant={} if fmt == "bf16" else {"transformer": fmt})
    aset = create_adapter_set(bundle, AdapterConfig(rank=16, alpha=16.0, targets={"unet": "attn-mlp"}))
    opt = torch.optim.AdamW(aset.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    h = w = args.res // 8
    latents = torch.randn(1, 16, h, w, generator=g)
    text = {"prompt_embeds": torch.randn(1, args.text, 4096, generator=g),
            "pooled_prompt_embeds": torch.randn(1, 768, generator=g)}
    cond = FLUX_DEV.conditioning(bundle, text, pixel_size=(args.res, args.res), batch=1, device="cpu", guidance=1.0)
    cond = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
    times, losses = [], []
    _reset_peak()
    base_rss = _rss()
    with attached(bundle, aset):
        for step in range(args.steps + 1):
            noise = torch.randn(latents.shape, generator=g)
            sigma = torch.rand(1, generator=g)
            noisy = (1 - sigma) * latents + sigma * noise
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = FLUX_DEV.predict(model, noisy.to(torch.bfloat16), sigma, cond)
                loss = torch.nn.functional.mse_loss(pred.float(), noise - latents)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step:  # the first step warms up
                times.append(time.perf_counter() - t0)
            losses.append(round(loss.item(), 4))
    out["step_ms"] = round(1000 * sum(times) / max(len(times), 1), 1)
    out["step_peak_growth"] = _peak_rss() - base_rss
    out["losses"] = losses
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default="bf16,nf4,fp8,int8")
    ap.add_argument("--double", type=int, default=1)
    ap.add_argument("--single", type=int, default=1)
    ap.add_argument("--res", type=int, default=128, help="image side in pixels (latent tokens = (res/16)^2)")
    ap.add_argument("--text", type=int, default=64, help="T5 tokens")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--fp8-block-size", type=int, default=128)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child mode: one format in this process
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args)))
        return 0
    results = {}
    for fmt in args.formats.split(","):
        cmd = [sys.executable, __file__, "--one", fmt, "--double", str(args.double), "--single", str(args.single),
               "--res", str(args.res), "--text", str(args.text), "--steps", str(args.steps),
               "--fp8-block-size", str(args.fp8_block_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results[fmt] = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = results.get("bf16")
    print(f"full-width Flux dev transformer, {args.double} double + {args.single} single block(s); LoRA rank 16 "
          f"attn-mlp, {args.res} px, {args.text} T5 tokens, bf16 autocast")
    print(f"{'format':7} {'block MiB':>10} {'ratio':>6} {'model MiB':>10} {'ratio':>6} {'19+38 GiB':>9} {'ratio':>6} "
          f"{'RSS MiB':>8} {'quantize s':>10} {'step ms':>8} {'step peak MiB':>13}  target (blocks)")
    ok = True
    for fmt, r in results.items():
        br = r["block_bytes"] / ref["block_bytes"] if ref else float("nan")
        mr = r["model_bytes"] / ref["model_bytes"] if ref else float("nan")
        fr = r["full_depth_bytes"] / ref["full_depth_bytes"] if ref else float("nan")
        target = TARGETS.get(fmt)
        verdict = "" if target is None else (f"<= {target}: " + ("met" if br <= target else "MISSED"))
        ok &= target is None or br <= target
        print(f"{fmt:7} {r['block_bytes'] / 2**20:10.1f} {br:6.3f} {r['model_bytes'] / 2**20:10.1f} {mr:6.3f} "
              f"{r['full_depth_bytes'] / 2**30:9.2f} {fr:6.3f} "
              f"{r['rss_weights'] / 2**20:8.0f} {r['quantize_s']:10.2f} {r['step_ms']:8.0f} "
              f"{r['step_peak_growth'] / 2**20:13.0f}  {verdict}")
    for fmt, r in results.items():
        for line in r["log"]:
            print(f"  {fmt}: {line}")
        print(f"  {fmt}: losses {r['losses']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
