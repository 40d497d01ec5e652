"""Kohya-layout LoRA keys on the full-size SD1.5 and SDXL architectures, checked with diffusers' loader.

Not a pytest test. Tiny test models can hide blocks only the real ones have (SDXL's 10-deep
transformer stacks, its label embedding, SD1.5's 3 down levels with attention), so this builds the
real UNet/text-encoder configs shipped in ``app/ml/models/configs`` with *uninitialised* bf16 weights
(no download, no random init cost), adapts every layer (LoCon, preset ``full`` + text encoders
``attn-mlp``), saves in kohya layout, and lets ``pipe.load_lora_weights`` load it. Reports keys
written, LoRA modules diffusers injected per component versus ours, and any loader complaints.

    HF_HUB_OFFLINE=1 python tests/bench/bench_keys.py [--family sd15 sdxl] [--preset full]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.ml.adapters import AdapterConfig, create_adapter_set  # noqa: E402
from app.ml.models.bundle import ModelBundle  # noqa: E402
from app.ml.models.families import get_family  # noqa: E402
from app.ml.models.tiny import CONFIGS, load_tiny_tokenizer  # noqa: E402
from app.ml.save import save_adapter  # noqa: E402


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        m = factory()
    return m.to_empty(device="cpu").to(torch.bfloat16).requires_grad_(False).eval()


def build_full_size(family_id: str) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    fam = get_family(family_id)
    cdir = CONFIGS / fam.config_dir
    unet = _empty(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(cdir / "unet"))))
    vae = _empty(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(str(cdir / "vae"))))
    tes = []
    for spec in fam.text_encoders:
        cfg = CLIPTextConfig.from_pretrained(str(cdir / spec.name))
        cls = CLIPTextModelWithProjection if spec.model_class == "CLIPTextModelWithProjection" else CLIPTextModel
        tes.append(_empty(lambda: cls(cfg)))
    toks = [load_tiny_tokenizer(spec.pad_token) for spec in fam.text_encoders]
    sched = json.loads((cdir / "scheduler" / "scheduler_config.json").read_text())
    return ModelBundle(family=fam, denoiser=unet, vae=vae, text_encoders=tes, tokenizers=toks, scheduler_config=sched,
                       dtypes={"unet": torch.bfloat16}, identities={"unet": family_id}, source=f"bench:{family_id}")


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run(family_id: str, preset: str, algorithm: str, rank: int) -> dict:
    from peft.tuners.lora import LoraLayer

    from app.ml.sampling import build_pipeline, make_scheduler

    t0 = time.time()
    bundle = build_full_size(family_id)
    tes = {spec.name: "attn-mlp" for spec in bundle.family.text_encoders}
    aset = create_adapter_set(bundle, AdapterConfig(algorithm=algorithm, rank=rank, alpha=1.0, targets={"unet": preset, **tes}),
                              dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(aset, Path(tmp) / "lora", layout="kohya", dtype="bf16")
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        pipe = build_pipeline(bundle, make_scheduler("Euler", bundle.scheduler_config)[0])
        cap = _Capture()
        logging.getLogger("diffusers").addHandler(cap)
        try:
            pipe.load_lora_weights(str(path), adapter_name="bench")
            error = None
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            error = f"{type(e).__name__}: {e}"[:500]
        finally:
            logging.getLogger("diffusers").removeHandler(cap)
    injected = {}
    for comp in aset.components:
        injected[comp] = sum(1 for _, m in getattr(pipe, comp).named_modules() if isinstance(m, LoraLayer))
    ours = aset.summary()["layers"]
    per_module = {k.split(".")[0] for k in keys}
    matched = sum(injected.values())
    return {
        "family": family_id, "preset": preset, "algorithm": algorithm, "rank": rank,
        "keys_written": len(keys), "modules_written": len(per_module),
        "modules_ours": ours, "modules_injected_by_diffusers": injected,
        "keys_matched": matched * 3 if matched == len(per_module) else f"{matched} of {len(per_module)} modules",
        "loader_warnings": cap.messages, "error": error,
        "trainable_parameters": aset.num_parameters(), "seconds": round(time.time() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", nargs="+", default=["sd15", "sdxl"])
    ap.add_argument("--preset", default="full")
    ap.add_argument("--algorithm", default="locon")
    ap.add_argument("--rank", type=int, default=4)
    args = ap.parse_args()
    ok = True
    for fam in args.family:
        r = run(fam, args.preset, args.algorithm, args.rank)
        print(json.dumps(r, indent=2))
        ok &= r["error"] is None and r["modules_ours"] == r["modules_injected_by_diffusers"] and not r["loader_warnings"]
    print("ALL KEYS MATCHED" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
