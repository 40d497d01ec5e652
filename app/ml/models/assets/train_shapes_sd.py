"""Train ``builtin:shapes-sd``: a tiny SD1.5-like model that draws coloured shapes from prompts.

The random ``builtin:tiny-sd`` only draws coloured noise, so a demo LoRA on it shows nothing. This
script trains the same kind of model (the architecture in ``tiny.shapes_sd_spec``: diffusers'
``AutoencoderKL`` and ``UNet2DConditionModel``, transformers' ``CLIPTextModel``, the shipped tiny
tokenizer) on generated 64 px images of one filled shape ("red circle", "blue square", "yellow
triangle", ...; ``app.ml.data.demo.shape_image``), in two stages:

1. the VAE as an autoencoder (64 px -> 8 x 8 x 4 latents) on shapes of every palette colour, green
   too; its scaling factor is then set to 1 / std of its latents over the UNet's data, as the real
   SD factors were chosen, so the UNet sees unit variance;
2. the UNet and the text encoder together with the usual epsilon objective on those latents, with
   10 % empty captions so classifier-free guidance has an unconditional branch.

The UNet and text encoder never see green, on purpose: the demo LoRA (``presets/tiny_demo.json``)
teaches the word "green".

Run ``python app/ml/models/assets/train_shapes_sd.py`` from the repository root (options: ``--help``);
it writes ``shapes_sd/{unet,vae,text_encoder}.safetensors`` (fp16, about 3 MB) and ``model.json``.
Seeds are fixed, so a rerun on the same machine and torch version gives the same weights. On 2 CPU
cores shared with other work the default settings took 16 minutes with ``--threads 1`` (faster than 2
threads on a busy machine; ``model.json`` records the settings and the measured time).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from app.ml.data.demo import COLOURS, SHAPES, shape_image  # noqa: E402
from app.ml.models import tiny  # noqa: E402

BASE_COLOURS = ("red", "blue", "yellow")  # not green: that is what the demo LoRA teaches
SIZE = 64


def make_data(n_per_class: int, seed: int, colours=BASE_COLOURS) -> tuple[torch.Tensor, list[str]]:
    """``N x 3 x 64 x 64`` images in [-1, 1] and their captions, every colour x shape class."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for colour in colours:
        for shape in SHAPES:
            for _ in range(n_per_class):
                img = shape_image(rng, COLOURS[colour], shape, SIZE, SIZE, radius=(0.2, 0.42))
                images.append(np.asarray(img))
                captions.append(f"{colour} {shape}")
    return _to_tensor(images), captions


def make_vae_data(n_per_class: int, seed: int) -> torch.Tensor:
    """Shapes in every palette colour, green too: the VAE must be able to draw a colour the base
    model never names, or no LoRA could teach it (a VAE that saw only red, blue and yellow encodes
    green next to yellow and decodes it as yellow)."""
    return make_data(n_per_class, seed, colours=tuple(COLOURS))[0]


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def build_modules(spec):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(spec.seed)
    unet = UNet2DConditionModel(**spec.unet)
    torch.manual_seed(spec.seed + 1)
    vae = AutoencoderKL(**spec.vae)
    kwargs = dict(spec.text_encoders[0])
    kwargs.pop("_class")
    torch.manual_seed(spec.seed + 2)
    te = CLIPTextModel(CLIPTextConfig(**kwargs))
    return unet, vae, te


def train_vae(vae, x: torch.Tensor, steps: int, batch: int, lr: float, seed: int, log) -> None:
    """Reconstruction (L1 + MSE) with a small KL term, so latents stay near the prior's scale."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=gen)
        xb = x[idx]
        if step % 2:
            xb = xb.flip(-1)
        dist = vae.encode(xb).latent_dist
        z = dist.sample(gen)
        rec = vae.decode(z).sample
        kl = dist.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, xb) + F.mse_loss(rec, xb) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {loss.item():.4f} kl {kl.item():.3f}")
    vae.eval()


@torch.no_grad()
def encode_all(vae, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + 256]).latent_dist.mode() for i in range(0, len(x), 256)])


def train_unet(unet, te, tokenizer, latents: torch.Tensor, captions: list[str], steps: int, batch: int, lr: float,
               seed: int, log) -> None:
    from diffusers import DDPMScheduler

    cfg = json.loads((tiny.CONFIGS / tiny.SD15.config_dir / "scheduler" / "scheduler_config.json").read_text())
    noise_sched = DDPMScheduler.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    prompts = sorted(set(captions)) + [""]
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    which = torch.tensor([prompts.index(c) for c in captions])
    empty = len(prompts) - 1
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # no decay: unused words (green) stay as they are
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    unet.train()
    te.train()
    avg = None
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        z = latents[idx]
        flip = torch.rand(batch, generator=gen) < 0.5
        z = torch.where(flip[:, None, None, None], z.flip(-1), z)
        p = which[idx].clone()
        p[torch.rand(batch, generator=gen) < 0.1] = empty
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=gen)
        noisy = noise_sched.add_noise(z, noise, t)
        emb = te(ids[p]).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=emb).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps} loss {avg:.4f}")
    unet.eval()
    te.eval()


def save(out: Path, modules: dict, record: dict) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    for name, module in modules.items():
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"), metadata={"format": "pt", "model": "builtin:shapes-sd"})
    (out / "model.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=tiny.SHAPES_SD_DIR)
    ap.add_argument("--per-class", type=int, default=100, help="generated images per colour x shape")
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--unet-steps", type=int, default=2000)
    ap.add_argument("--unet-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2, help="torch threads; 1 is faster on a machine busy with other work")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:7.1f}s] {msg}", flush=True)

    spec = tiny.shapes_sd_spec()
    unet, vae, te = build_modules(spec)
    x, captions = make_data(args.per_class, args.seed)
    log(f"{len(x)} images, {len(set(captions))} classes")
    train_vae(vae, make_vae_data(args.per_class, args.seed + 3), args.vae_steps, args.vae_batch, 2e-3, args.seed + 1, log)
    raw = encode_all(vae, x)
    scaling = 1.0 / float(raw.std())
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        rec = vae.decode(raw[:256]).sample
    log(f"vae done: latent std {raw.std():.4f} mean {raw.mean():.4f} -> scaling_factor {scaling:.4f}; "
        f"reconstruction MAE {(rec - x[:256]).abs().mean().item() * 127.5:.2f} / 255")
    train_unet(unet, te, tiny.load_tiny_tokenizer(), raw * scaling, captions, args.unet_steps, args.unet_batch, 1e-3,
               args.seed + 2, log)
    minutes = (time.time() - start) / 60
    record = {
        "vae_scaling_factor": round(scaling, 5),
        "trained_by": "app/ml/models/assets/train_shapes_sd.py",
        "colours": list(BASE_COLOURS),
        "shapes": list(SHAPES),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "minutes": round(minutes, 1),
    }
    save(args.out, {"unet": unet, "vae": vae, "text_encoder": te}, record)
    log(f"saved to {args.out} ({minutes:.1f} min)")


if __name__ == "__main__":
    main()
