"""Flux latents: VAE scale/shift, 2x2 packing into a token sequence, and position ids (backs the Flux
family's ``encode_latents`` / ``decode_latents`` and the denoiser-call preparation).

Flux's transformer sees images as a sequence: each 2x2 patch of the 16-channel latent becomes one
64-wide token, in row-major order of the packed grid, and every token gets a 3-axis RoPE position
(0, row, column); text tokens all sit at position (0, 0, 0). The layout must match diffusers'
``FluxPipeline`` exactly, or a LoRA trained here would see its images scrambled when sampled there.
"""

from __future__ import annotations

import torch

SCALING_FACTOR = 0.3611  # Flux.1 VAE (ae.safetensors / vae/config.json)
SHIFT_FACTOR = 0.1159
VAE_DOWNSCALE = 8
PATCH = 2
PIXEL_MULTIPLE = VAE_DOWNSCALE * PATCH  # 16 px: the hard minimum step of a Flux image side


class LatentShapeError(ValueError):
    pass


def encode_scale(vae_latent: torch.Tensor, scale: float = SCALING_FACTOR, shift: float = SHIFT_FACTOR) -> torch.Tensor:
    """What the transformer trains on: ``(vae_latent - shift) * scale``."""
    return (vae_latent - shift) * scale


def decode_scale(latent: torch.Tensor, scale: float = SCALING_FACTOR, shift: float = SHIFT_FACTOR) -> torch.Tensor:
    """The inverse of ``encode_scale``: what the VAE decoder takes."""
    return latent / scale + shift


def check_pixel_size(height: int, width: int, where: str = "Flux") -> None:
    """Flux images need sides that are multiples of 16 px (8x VAE, then 2x2 packing)."""
    bad = [f"{name} {v}" for name, v in (("height", height), ("width", width)) if v <= 0 or v % PIXEL_MULTIPLE]
    if bad:
        raise LatentShapeError(
            f"{where}: image size {width}x{height} px is not usable ({', '.join(bad)}): Flux needs both sides to be "
            f"positive multiples of {PIXEL_MULTIPLE} px; resize or crop the image, or use buckets quantised to 16 or 64 px."
        )


def _check_latent_hw(h: int, w: int, where: str) -> None:
    if h <= 0 or w <= 0 or h % PATCH or w % PATCH:
        raise LatentShapeError(
            f"{where}: latent size {w}x{h} cannot be packed into 2x2 patches: both sides must be even, i.e. the image "
            f"sides multiples of {PIXEL_MULTIPLE} px; resize or crop the image."
        )


def pack(latents: torch.Tensor, where: str = "Flux") -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): one token per 2x2 patch, channels-major inside the patch."""
    if latents.ndim != 4:
        raise LatentShapeError(f"{where}: expected latents of shape (batch, channels, height, width), got {tuple(latents.shape)}.")
    b, c, h, w = latents.shape
    _check_latent_hw(h, w, where)
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, latent_height: int, latent_width: int, where: str = "Flux") -> torch.Tensor:
    """The inverse of ``pack``, given the latent (not pixel) height and width."""
    _check_latent_hw(latent_height, latent_width, where)
    b, n, d = tokens.shape
    gh, gw = latent_height // 2, latent_width // 2
    if n != gh * gw or d % 4:
        raise LatentShapeError(
            f"{where}: {n} tokens of width {d} do not form a {latent_width}x{latent_height} latent "
            f"(expected {gh * gw} tokens of a width divisible by 4)."
        )
    x = tokens.reshape(b, gh, gw, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, latent_height, latent_width)


def latent_size(height: int, width: int, where: str = "Flux") -> tuple[int, int]:
    """Pixel size -> latent (height, width), refusing sizes that cannot be packed."""
    check_pixel_size(height, width, where)
    return height // VAE_DOWNSCALE, width // VAE_DOWNSCALE


def image_seq_len(height: int, width: int, where: str = "Flux") -> int:
    """Number of image tokens for a pixel size (what the resolution-dependent shift is computed from)."""
    lh, lw = latent_size(height, width, where)
    return (lh // 2) * (lw // 2)


def image_ids(latent_height: int, latent_width: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) RoPE positions of the packed tokens: (0, row, column) in row-major order."""
    _check_latent_hw(latent_height, latent_width, "Flux")
    gh, gw = latent_height // 2, latent_width // 2
    ids = torch.zeros(gh, gw, 3)
    ids[..., 1] = torch.arange(gh)[:, None]
    ids[..., 2] = torch.arange(gw)[None, :]
    return ids.reshape(gh * gw, 3).to(device=device, dtype=dtype)


def text_ids(seq_len: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """(L_txt, 3) zeros: every text token sits at the origin of the RoPE grid."""
    return torch.zeros(seq_len, 3, device=device, dtype=dtype)
