"""Benchmark: what keeping idle components off the device and the fused backward pass save.

Two measurements, each run in a fresh subprocess of this script so its memory figures are its own:

placement  A LoRA run (rank 16, attention layers, AdamW) with cached latents and cached text, as the
           Trainer places components now ("off": the VAE and text encoder in RAM) and as it did
           before ("on": every component on the device for the whole run, which a mover that
           ignores the moves back to RAM reproduces). On CUDA the peak is the allocator's
           ``max_memory_allocated`` over the run, real. On a CPU the device *is* the RAM, so nothing
           can be saved or measured there: the figure is an accounting - the largest sum of the
           bytes of the components the mover holds "on the device" at any point of the run, plus the
           run's measured RSS growth (its activations, gradients and optimizer state, the same in
           both) - and it shows only that the accounting follows the placement.
fused      A full fine-tune of the UNet (Adafactor, bf16 weights, clip 0, in place as a one-shot run)
           with and without ``fused_backward``: the run's peak RSS growth over the loaded process
           (``TrainResult.peak_bytes``: the kernel's high-water mark, reset for the run) and the
           ratio. The unfused step holds every gradient at the end of backward (the UNet's size
           again); the fused one holds one at a time.

Configs: ``tiny`` (builtin:tiny-sd) and ``sd15`` (the full-size SD 1.5 architecture with random
weights, from tests/bench/bench_train.py; bf16, 256 px, batch 1: about 2 GB of weights).

Measured on the shared 2-core CPU (2026-12-01, ``--config sd15``, one thread): placement: weights on the
device 1639.4 MiB with the VAE and text encoder in RAM vs 2033.7 MiB with them on it, 394.3 MiB saved
= their size (accounting; the run's RSS growth 536.0 / 536.6 MiB); fused: peak RSS growth 4472.0 MiB
unfused vs 2877.9 MiB fused, ratio 0.64 (1594 MiB less: the UNet's 1639 MiB of bf16 gradients),
65.4 / 56.3 s a step. tiny-sd is too small to show either (its whole UNet is 1.1 MiB).

    python tests/bench/bench_placement.py                       # both measurements, tiny and sd15
    python tests/bench/bench_placement.py --what fused --config sd15
    python tests/bench/bench_placement.py --device cuda         # real device peaks
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _bundle(config: str, dtype: str):
    from tests.bench.bench_train import build_bundle

    return build_bundle(config, dtype)


class _Cached:
    """Cached latents and text of the right shapes (seeded random: memory does not depend on values)."""

    def __init__(self, bundle, res: int, batch: int, n: int):
        import torch

        g = torch.Generator().manual_seed(0)
        h = res // bundle.vae_scale_factor
        dim = bundle.text_encoders[0].config.hidden_size  # SD: one encoder, its hidden states
        self.items = [(torch.randn((batch, bundle.family.latent_channels, h, h), generator=g),
                       {"prompt_embeds": torch.randn((batch, 77, dim), generator=g)}) for _ in range(n)]
        self.b = batch

    def iterations(self, epoch):
        return len(self.items)

    def batch(self, epoch, index, rank=0, world=1):
        import torch

        from app.ml.train.loop import Batch

        latents, text = self.items[index]
        return Batch(captions=["a photo"] * self.b, loss_weights=torch.ones(self.b), latents=latents, text=text)


class _Accounting:
    """The CPU stand-in for a device: counts the bytes of what is "on" it; with ``keep_all`` nothing
    ever leaves (the placement before components visited the device)."""

    def __init__(self, keep_all: bool):
        self.keep_all = keep_all
        self.on: dict[int, int] = {}
        self.peak = 0

    def __call__(self, module, target, skip=()):
        from app.ml.memory.placement import DEVICE, module_bytes

        size = module_bytes(module) - sum(module_bytes(m) for m in skip)
        if target == DEVICE or self.keep_all:
            self.on[id(module)] = size
        else:
            self.on.pop(id(module), None)
        self.peak = max(self.peak, sum(self.on.values()))


class _Forced:
    """On CUDA, the old placement: every component moves to the device and never back during the run."""

    def __init__(self, device):
        self.device = device

    def __call__(self, module, target, skip=()):
        module.to(self.device)


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from app.ml.adapters import AdapterConfig, create_adapter_set
    from app.ml.handle import ModelHandle
    from app.ml.memory.placement import module_bytes
    from app.ml.train.loop import Trainer, TrainSettings
    from app.ml.train.trainables import AdapterTrainable, FullFinetune

    bundle = _bundle(spec["config"], spec["dtype"])
    device = torch.device(spec["device"])
    data = _Cached(bundle, spec["res"], spec["batch"], spec["steps"])
    out = {"sizes_mib": {n: module_bytes(m) / 2**20 for n, m in
                         (("denoiser", bundle.denoiser), ("vae", bundle.vae), ("text_encoder", bundle.text_encoders[0]))}}
    with tempfile.TemporaryDirectory() as tmp:
        if spec["what"] == "placement":
            config = AdapterConfig(rank=16, alpha=16, targets={"unet": "attn-only", "text_encoder": "none"}, seed=1)
            trainable = AdapterTrainable(ModelHandle(bundle).with_adapter(create_adapter_set(bundle, config)), in_place=True)
            keep_all = spec["mode"] == "on"
            mover = _Accounting(keep_all) if device.type == "cpu" else (_Forced(device) if keep_all else None)
            settings = TrainSettings(epochs=1, train_dtype=spec["dtype"], gradient_checkpointing=False)
            opt = {"optimizer": "adamw", "lr": 1e-4}
            result = Trainer(bundle, trainable, data, opt, settings, Path(tmp), device=device, mover=mover).run()
            out["measured_peak_mib"] = (result.peak_bytes or 0) / 2**20
            out["peak_kind"] = result.peak_kind
            if device.type == "cpu":
                out["device_weights_peak_mib"] = mover.peak / 2**20
                out["device_peak_mib"] = out["device_weights_peak_mib"] + out["measured_peak_mib"]
            else:
                out["device_peak_mib"] = out["measured_peak_mib"]
        else:
            trainable = FullFinetune(bundle, in_place=True)
            settings = TrainSettings(epochs=1, train_dtype=spec["dtype"], clip_grad_norm=0.0,
                                     fused_backward=spec["mode"] == "fused")
            opt = {"optimizer": "adafactor", "lr": 1e-5, "weight_decay": 0.0}
            result = Trainer(bundle, trainable, data, opt, settings, Path(tmp), device=device).run()
            out["measured_peak_mib"] = (result.peak_bytes or 0) / 2**20
            out["peak_kind"] = result.peak_kind
            out["ms_step"] = 1000 * result.elapsed_s / max(1, result.steps)
    return out


def _spawn(spec: dict) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=3600)
    if r.returncode:
        raise SystemExit(f"worker {spec} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", default="placement,fused")
    ap.add_argument("--config", default="tiny,sd15")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for what in args.what.split(","):
        for config in args.config.split(","):
            dtype = "bf16" if config == "sd15" else "fp32"
            modes = ("off", "on") if what == "placement" else ("unfused", "fused")
            got = {m: _spawn(dict(what=what, config=config, mode=m, dtype=dtype, device=args.device, res=args.res,
                                  batch=args.batch, steps=args.steps, threads=args.threads)) for m in modes}
            rows.append((what, config, got))
            sizes = got[modes[0]]["sizes_mib"]
            print(f"\n{what} · {config} ({dtype}, {args.res} px, batch {args.batch}, {args.device}); component MiB: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in sizes.items()))
            if what == "placement":
                off, on = got["off"], got["on"]
                idle = sizes["vae"] + sizes["text_encoder"]
                if args.device == "cpu":
                    print(f"  accounting: weights on the device at most {off['device_weights_peak_mib']:.1f} MiB with idle "
                          f"components off vs {on['device_weights_peak_mib']:.1f} MiB on: saved "
                          f"{on['device_weights_peak_mib'] - off['device_weights_peak_mib']:.1f} MiB (VAE + text encoder "
                          f"{idle:.1f} MiB); the run's measured RSS growth {off['measured_peak_mib']:.1f} / "
                          f"{on['measured_peak_mib']:.1f} MiB (one memory on a CPU: the same work either way)")
                else:
                    print(f"  device peak, idle components off: {off['device_peak_mib']:.1f} MiB; on: "
                          f"{on['device_peak_mib']:.1f} MiB; saved {on['device_peak_mib'] - off['device_peak_mib']:.1f} MiB "
                          f"(VAE + text encoder: {idle:.1f} MiB)")
            else:
                u, f = got["unfused"], got["fused"]
                print(f"  peak {u['peak_kind']}: unfused {u['measured_peak_mib']:.1f} MiB, fused {f['measured_peak_mib']:.1f} MiB, "
                      f"ratio {f['measured_peak_mib'] / max(u['measured_peak_mib'], 1e-9):.2f}; "
                      f"ms/step {u['ms_step']:.0f} / {f['ms_step']:.0f} (denoiser {sizes['denoiser']:.1f} MiB)")


if __name__ == "__main__":
    main()
