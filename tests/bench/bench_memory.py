"""Benchmark: the memory planner's predicted peak against the measured peak of a LoRA step.

Each config runs in a fresh subprocess of this script. The measured peak is the process's resident
memory (a sampling thread reads /proc/self/statm every millisecond) above what it held before the
model was built - so it covers the weights, the adapter, the optimizer state and the step - on this
CPU; on CUDA ``torch.cuda.max_memory_allocated``. The prediction uses only data: parameter counts
from the built model, the storage format's bytes per weight, and activation coefficients measured
with ``activation_coefficient`` at two *smaller* token counts than the step's (so the prediction
extrapolates, as it does for a real recipe).

Configs (LoRA rank 16 on the attention projections, AdamW, batch 1, cached latents and text: only
the denoiser is built):
  tiny-sd       ``builtin:tiny-sd``'s UNet, fp32, 64x64 latents
  flux-reduced  the Flux dev transformer at full width (3072, 24 heads) with 1 double + 2 single
                blocks, bf16 / fp8 / nf4 Linear weights, 32x32 latents (256 image + 32 text tokens)

Run: OMP_NUM_THREADS=1 python tests/bench/bench_memory.py [--configs tiny-sd,flux-reduced:bf16,...] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

CONFIGS = ["tiny-sd", "flux-reduced:bf16", "flux-reduced:fp8", "flux-reduced:nf4"]
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


def _lora(model, targets, rank=16):
    import torch.nn as nn

    from app.ml.adapters.modules import LoRAModule

    loras = nn.ModuleList()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets or name.endswith("to_out.0"):
            if not isinstance(m, nn.Linear):
                continue
            lora = LoRAModule(m, rank, rank)
            m.register_forward_hook(lambda mod, inp, out, lora=lora: lora(mod, inp[0], out, 1.0))
            loras.append(lora)
    return loras


def _trim():
    """Return freed heap to the system, so a later peak is not hidden in malloc's free lists."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _warm_up():
    """Import and run once what the step uses, so the baseline already holds the code and libraries."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel  # noqa: F401

    from app.ml.models.tiny import tiny_spec

    # diffusers builds some modules lazily on first use: a throwaway tiny UNet step pays for that
    unet = UNet2DConditionModel(**tiny_spec("tiny-sd").unet)
    unet(torch.randn(1, 4, 8, 8), torch.tensor([1]), encoder_hidden_states=torch.randn(1, 77, unet.config.cross_attention_dim)
         ).sample.mean().backward()
    del unet
    lin = torch.nn.Linear(64, 64)
    lin(torch.randn(4, 64, requires_grad=True)).sum().backward()
    torch.optim.AdamW(lin.parameters()).step()
    _trim()


def worker(config: str, mode: str) -> dict:
    import torch

    from app.ml.memory.plan import (Component, Recipe, activation_coefficient, count_params, largest_linear,
                                    measure_transient, predict, step_coefficient)
    from app.ml.memory.quant import quantize_linears

    torch.manual_seed(0)
    name, _, fmt = config.partition(":")
    _warm_up()
    quantize = None
    base_rss = rss()
    meter = PeakRSS()
    if name == "tiny-sd":
        from diffusers import UNet2DConditionModel

        from app.ml.models.tiny import tiny_spec

        model = UNet2DConditionModel(**tiny_spec("tiny-sd").unet).requires_grad_(False)
        dtype, ctx_dim, side = torch.float32, model.config.cross_attention_dim, 64
        targets = ("to_q", "to_k", "to_v")

        def run(tokens_side, grad=True):
            x = torch.randn(1, 4, tokens_side, tokens_side, requires_grad=grad)
            return model(x, torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, ctx_dim)).sample

        calib = (32 * 32, 48 * 48)  # latent pixels
        blocks = 1
        tokens = side * side
        coef_fn = lambda n: run(int(round(n ** 0.5)))  # noqa: E731
        step = lambda: run(side, grad=False)  # noqa: E731
    else:
        from diffusers import FluxTransformer2DModel

        from app.ml.flux.variants import config as flux_config

        cfg = {k: v for k, v in flux_config("dev", "transformer").items() if not k.startswith("_")}
        cfg.update(num_layers=1, num_single_layers=2)
        old = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        with torch.no_grad():
            model = FluxTransformer2DModel(**cfg).requires_grad_(False)
        torch.set_default_dtype(old)
        if fmt != "bf16":
            quantize = fmt
        dtype, blocks, text = torch.bfloat16, 3, 32
        targets = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
        image = 256
        tokens = image + text

        def run_flux(n_img, n_txt):
            hs = torch.randn(1, n_img, 64, dtype=dtype, requires_grad=True)
            side = int(n_img ** 0.5)
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(side).float(), torch.arange(side).float(), indexing="ij"),
                              -1).reshape(-1, 3)[:n_img].to(dtype)
            return model(hidden_states=hs, encoder_hidden_states=torch.randn(1, n_txt, 4096, dtype=dtype),
                         pooled_projections=torch.randn(1, 768, dtype=dtype), timestep=torch.tensor([0.5], dtype=dtype),
                         img_ids=ids, txt_ids=torch.zeros(n_txt, 3, dtype=dtype),
                         guidance=torch.tensor([3.5], dtype=dtype)).sample

        calib = (80, 180)  # total tokens: 64 + 16, 144 + 36 (image a square, text a fifth)
        coef_fn = lambda n: run_flux(n - n // 5, n // 5)  # noqa: E731
        step = lambda: run_flux(image, text)  # noqa: E731
    meter.stop()
    _trim()
    built = rss()  # the model's weights as built (before the calibration leaves caches behind)
    # the activation coefficient is the architecture's (data of the family): measured on the model
    # before its weights are quantized, at smaller token counts than the step's
    if mode == "saved":  # what autograd saves: exact for checkpointing arithmetic, misses backward's transients
        coef = activation_coefficient(coef_fn, calib, exclude=model) / blocks
    else:  # the peak growth of forward + backward per token, measured at the smaller sizes
        coef = step_coefficient(lambda n: coef_fn(n).float().square().mean().backward(), calib) / blocks
    _trim()
    pre_quant = rss()
    if quantize:
        quantize_linears(model, quantize)
    _trim()
    loaded = built + (rss() - pre_quant)  # the weights as held after quantizing (its conversion peak is not the step's)
    total, linear = count_params(model)
    loras = _lora(model, targets)
    adapter = sum(p.numel() for p in loras.parameters())
    big = max((m for m in model.modules() if isinstance(m, torch.nn.Linear)), key=lambda m: m.in_features * m.out_features)
    quant = None if fmt in ("", "bf16") else fmt
    transient = measure_transient(quant, dtype, shape=(big.out_features, big.in_features))
    _trim()
    before_step = rss()
    meter = PeakRSS()
    opt = torch.optim.AdamW(loras.parameters(), lr=1e-4)
    t0 = time.perf_counter()
    out = step()
    loss = out.float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    ms = (time.perf_counter() - t0) * 1000
    step_peak = meter.stop()
    measured = (loaded - base_rss) + (step_peak - before_step)  # weights as loaded + the step's growth
    comp = Component("denoiser", total, linear, "fp32" if dtype == torch.float32 else "bf16",
                     quant=None if fmt in ("", "bf16") else fmt)
    recipe = Recipe([comp], denoiser="denoiser", blocks=blocks, act_per_token=coef, tokens=tokens,
                    adapter_params=adapter, optimizer="adamw", largest_linear=largest_linear(model),
                    compute_dtype=comp.dtype, transient_per_weight=transient)
    plan = predict(recipe)
    return {"config": config, "activations": mode, "transient_per_weight": round(transient, 2), "predicted_mb": plan.peak / 2**20, "measured_mb": measured / 2**20,
            "error": (plan.peak - measured) / measured, "ms_step": ms, "weights_mb": (loaded - base_rss) / 2**20,
            "breakdown_mb": {k: round(v / 2**20, 1) for k, v in plan.parts.items() if v}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--worker")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each config (fresh processes)")
    ap.add_argument("--activations", choices=["step", "saved"], default="step",
                    help="activation coefficient: peak growth of a step per token (default) or bytes autograd saves")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.activations)))
        return
    rows = []
    for c in [c for _ in range(args.rounds) for c in args.configs.split(",")]:
        # large blocks straight from mmap: freed tensors leave the resident size at once, so the
        # measured peak is the tensors', not glibc's free lists' (fragmentation of a quantizing load)
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
                   MALLOC_MMAP_THRESHOLD_="131072")
        out = subprocess.run([sys.executable, __file__, "--worker", c, "--activations", args.activations], capture_output=True, text=True, env=env)
        if out.returncode:
            print(f"{c}: failed\n{out.stderr[-2000:]}")
            continue
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row))
    print(f"\n{'config':<20} {'predicted MB':>12} {'measured MB':>12} {'error':>7} {'ms/step':>9}")
    for r in rows:
        print(f"{r['config']:<20} {r['predicted_mb']:12.1f} {r['measured_mb']:12.1f} {r['error']:+7.1%} {r['ms_step']:9.0f}")


if __name__ == "__main__":
    main()
