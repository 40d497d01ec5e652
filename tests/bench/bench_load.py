"""Benchmark: load time and peak RAM of ``load_model`` on a full-size SD1.5 single-file checkpoint.

No real weights can be downloaded, so the checkpoint is generated locally: the full-size SD1.5
architecture from ``app/ml/models/configs/sd15`` (built on the meta device, so no 4 GB model is
allocated), renamed to the original A1111 layout with ``original_layout``, filled with random fp16
values (~2.1 GB) and written once to /tmp. Generation and each measurement run in their own
processes so ``ru_maxrss`` is the peak of the load alone (plus library imports, reported separately).

    python tests/bench/bench_load.py                      # fp16 components and fp32 components
    python tests/bench/bench_load.py --dtype bf16 --path /tmp/other.safetensors

The real SD1.5 tokenizer is not available offline, so the tiny tokenizer stands in (tokenizer=);
it does not affect the weight-loading figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
DEFAULT_PATH = Path("/tmp/nodetrainer_bench/sd15_random_fp16.safetensors")


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def generate(path: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from app.ml.models.original_layout import to_original_state_dict

    cfg = ROOT / "app/ml/models/configs/sd15"
    unet_cfg = json.loads((cfg / "unet/config.json").read_text())
    vae_cfg = json.loads((cfg / "vae/config.json").read_text())
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(unet_cfg)
        vae = AutoencoderKL.from_config(vae_cfg)
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(cfg / "text_encoder")))
    meta = to_original_state_dict(
        "sd15", unet.state_dict(), unet.config, vae.state_dict(), vae.config, [te.state_dict()]
    )
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, t in meta.items():
        x = torch.randn(tuple(t.shape), generator=gen, dtype=torch.float32).mul_(0.02)
        tensors[name] = x.to(torch.float16)
    # real SD1.x files carry this int64 buffer; the loader must ignore it
    tensors["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.rename(path)
    n = sum(t.numel() for t in tensors.values())
    print(f"generated {path} ({path.stat().st_size / 2**30:.2f} GiB, {len(tensors)} tensors, {n / 1e6:.0f}M values)")


def measure(path: Path, dtype: str) -> dict:
    t0 = time.perf_counter()
    import torch
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    from app.ml.models import load_model
    from app.ml.models.tiny import TINY_TOKENIZER_DIR

    t_import = time.perf_counter() - t0
    rss_import = _maxrss_mib()
    t1 = time.perf_counter()
    bundle = load_model(path, dtypes={"unet": dtype, "vae": dtype, "text_encoder": dtype}, tokenizer=TINY_TOKENIZER_DIR)
    t_load = time.perf_counter() - t1
    rss_peak = _maxrss_mib()
    # safetensors tensors may still be lazily mapped from the file: read every weight once
    t2 = time.perf_counter()
    with torch.no_grad():
        for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
            for p in m.parameters():
                p.float().sum()
    t_touch = time.perf_counter() - t2
    status = dict(
        line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("Rss")
    )
    params = sum(p.numel() for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters())
    bytes_ = sum(p.numel() * p.element_size() for m in (bundle.unet, bundle.vae, *bundle.text_encoders) for p in m.parameters())
    return {
        "dtype": dtype,
        "family": bundle.family.id,
        "params_M": round(params / 1e6, 1),
        "weights_GiB": round(bytes_ / 2**30, 2),
        "import_s": round(t_import, 2),
        "load_s": round(t_load, 2),
        "maxrss_after_import_MiB": round(rss_import),
        "maxrss_peak_MiB": round(rss_peak),
        "read_all_weights_s": round(t_touch, 2),
        "maxrss_after_reading_MiB": round(_maxrss_mib()),
        "rss_anon_MiB": round(int(status["RssAnon"].split()[0]) / 1024),
        "rss_file_MiB": round(int(status["RssFile"].split()[0]) / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--path", type=Path, default=DEFAULT_PATH)
    ap.add_argument("--dtype", action="append", help="fp16 / bf16 / fp32 (repeatable; default fp16 and fp32)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure:
        print(json.dumps(measure(args.path, args.measure)))
        return
    if args.generate_only:
        if not args.path.exists():
            generate(args.path)
        return
    if not args.path.exists():
        t = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--path", str(args.path), "--generate-only"], check=True)
        print(f"(generation took {time.perf_counter() - t:.1f}s)")
    file_gib = args.path.stat().st_size / 2**30
    print(f"checkpoint: {args.path} ({file_gib:.2f} GiB), cpu count {os.cpu_count()}")
    for dtype in args.dtype or ["fp16", "fp32"]:
        out = subprocess.run(
            [sys.executable, __file__, "--path", str(args.path), "--measure", dtype],
            check=True, capture_output=True, text=True,
        )
        print(out.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
