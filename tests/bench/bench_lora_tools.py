"""ResizeLoRA and ExtractLoRA timings on full-size SD 1.5 (random weights, CPU).

Not a pytest test. Builds the SD 1.5 UNet and text encoder from the configs shipped in
``app/ml/models/configs`` with random fp32 weights (no download), then:

* resize: a random LoCon (rank 64, conv 32; UNet preset ``full`` and text encoder ``attn-mlp``) to
  rank 16 fixed and to sv_fro 0.9 (capped at 64), with the Frobenius share kept;
* extract: a "fine-tune" made by adding a random rank-8 change to every adapted layer, then
  ExtractLoRA at rank 8 (full SVD of every Linear/conv difference, UNet + text encoder), with the
  worst relative error of the recovered deltas.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python tests/bench/bench_lora_tools.py [--skip-extract] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.ml.adapters import AdapterConfig, component_modules, create_adapter_set  # noqa: E402
from app.ml.lora_tools import effective_deltas, extract_lora, resize_lora  # noqa: E402
from app.ml.models.bundle import ModelBundle  # noqa: E402
from app.ml.models.families import get_family  # noqa: E402
from app.ml.models.tiny import CONFIGS, load_tiny_tokenizer  # noqa: E402


def _random(factory, seed: int):
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = factory()
    m = m.to_empty(device="cpu").float().requires_grad_(False).eval()
    g = torch.Generator().manual_seed(seed)
    for p in m.parameters():
        p.normal_(0, 0.02, generator=g)
    return m


def build_sd15(seed: int = 0) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    fam = get_family("sd15")
    cdir = CONFIGS / fam.config_dir
    unet = _random(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cdir / "unet"))), seed)
    from accelerate import init_empty_weights

    with init_empty_weights():  # never run: the tools do not touch the VAE
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(cdir / "vae")))
    spec = fam.text_encoders[0]
    cfg = CLIPTextConfig.from_pretrained(str(cdir / spec.name))
    te = _random(lambda: CLIPTextModel(cfg), seed + 1)
    sched = json.loads((cdir / "scheduler" / "scheduler_config.json").read_text())
    return ModelBundle(family=fam, denoiser=unet, vae=vae, text_encoders=[te], tokenizers=[load_tiny_tokenizer(spec.pad_token)],
                       scheduler_config=sched, dtypes={"unet": torch.float32}, identities={"unet": "bench"},
                       source="bench:sd15")


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t = time.perf_counter()
    base = build_sd15()
    print(f"built SD 1.5 UNet + text encoder (fp32, random) in {time.perf_counter() - t:.1f} s; peak RSS {rss_gb():.1f} GB")

    cfg = AdapterConfig(algorithm="locon", rank=64, alpha=32.0, conv_rank=32, conv_alpha=16.0,
                        targets={"unet": "full", "text_encoder": "attn-mlp"})
    lora = create_adapter_set(base, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    print(f"LoCon rank 64/conv 32: {len(lora)} layers, {lora.num_parameters() / 1e6:.1f} M parameters")
    for method, rank, target in (("fixed", 16, 0.0), ("sv_fro", 64, 0.9)):
        t = time.perf_counter()
        out, rep = resize_lora(base, lora, rank, method=method, target=target)
        dt = time.perf_counter() - t
        shares = [r.fro_share for r in rep]
        print(f"resize {method} (rank {rank}{f', target {target}' if target else ''}): {dt:.1f} s; ranks "
              f"{min(r.rank for r in rep)}-{max(r.rank for r in rep)}; Frobenius share kept mean "
              f"{sum(shares) / len(shares):.3f}, lowest {min(shares):.3f}")
    del out, lora
    if args.skip_extract:
        return

    tuned = build_sd15()  # the same seed: the same weights, then a known rank-8 change on every layer
    tc = component_modules(tuned)
    known = create_adapter_set(tuned, AdapterConfig(algorithm="locon", rank=8, alpha=8.0,
                                                    targets={"unet": "full", "text_encoder": "attn-mlp"}))
    with torch.no_grad():
        for p in known.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        want = effective_deltas(tuned, known)
        for (c, n), d in want.items():
            tc[c].get_submodule(n).weight.add_(d)
    print(f"fine-tune: a rank-8 change on {len(want)} layers; peak RSS {rss_gb():.1f} GB")
    t = time.perf_counter()
    out, rep = extract_lora(tuned, base, 8, min_diff=1e-7)
    dt = time.perf_counter() - t
    got = effective_deltas(base, out)
    worst = max(float((got[k] - want[k]).norm() / want[k].norm()) for k in want)
    print(f"extract rank 8 from {len(rep)} changed layers (full SVD each): {dt:.1f} s; worst relative error "
          f"{worst:.1e}; peak RSS {rss_gb():.1f} GB")


if __name__ == "__main__":
    main()
