"""Aspect-ratio buckets (OneTrainer's rule) and where each image lands in one.

Buckets hold about R*R pixels at a fixed set of aspects, rounded to the model's quantization
(the VAE/patch grid: 8 for SD1.x/2.x, 64 for SDXL/Flux). Each image goes to the nearest aspect
(compared in log space, so 1:2 and 2:1 are equally far from 1:1), is scaled to cover the bucket
and cropped. Sizes are always (width, height).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from app.ml.data.resolution import Resolution, parse_resolution  # noqa: F401  (the bucketing API)

# h:w aspects of OneTrainer; transposes are added by `bucket_sizes`.
ASPECTS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0)

QUANTIZATION = {
    "sd15": 8, "sd1": 8, "sd14": 8, "sd2": 8, "sd20": 8, "sd21": 8,
    "sdxl": 64, "sd3": 64, "flux": 64,
    "pixart": 16, "sana": 32,
}
BUCKET_MODES = ("on", "off")


def quantization_for(model_family: str) -> int:
    key = model_family.lower().replace(".", "").replace("-", "").replace("_", "")
    if key not in QUANTIZATION:
        raise ValueError(f"unknown model family {model_family!r}; known: {sorted(QUANTIZATION)} (or set quantization)")
    return QUANTIZATION[key]


def _round_q(x: float, q: int) -> int:
    return max(q, int(math.floor(x / q + 0.5)) * q)


@lru_cache(maxsize=256)
def bucket_sizes(resolution: int, quantization: int, aspects: tuple[float, ...] = ASPECTS) -> tuple[tuple[int, int], ...]:
    """All (width, height) buckets for target R: h = h/sqrt(hw)*R, w = w/sqrt(hw)*R, rounded to q."""
    out: list[tuple[int, int]] = []
    for a in aspects:
        for h, w in ((1.0, a), (a, 1.0)):
            norm = math.sqrt(h * w)
            size = (_round_q(w / norm * resolution, quantization), _round_q(h / norm * resolution, quantization))
            if size not in out:
                out.append(size)
    return tuple(out)


def nearest_bucket(size: tuple[int, int], buckets) -> tuple[int, int]:
    """The bucket whose aspect is nearest to the image's, in log-aspect space (ties: first)."""
    w, h = size
    target = math.log(w / h)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def shrink_to_fit(bucket: tuple[int, int], size: tuple[int, int], quantization: int) -> tuple[int, int]:
    """kohya's no_upscale: a smaller bucket (same shape, still quantized) the image can cover."""
    bw, bh = bucket
    w, h = size
    if w >= bw and h >= bh:
        return bucket
    s = min(w / bw, h / bh)
    return (
        max(quantization, (int(bw * s) // quantization) * quantization),
        max(quantization, (int(bh * s) // quantization) * quantization),
    )


def cover_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """Resize size that covers the bucket while keeping the image's aspect."""
    w, h = size
    bw, bh = bucket
    scale = max(bw / w, bh / h)
    return max(bw, int(round(w * scale))), max(bh, int(round(h * scale)))


def crop_box(resized: tuple[int, int], bucket: tuple[int, int], rng: np.random.Generator | None = None):
    """(left, top, right, bottom) of the bucket inside the resized image; centre, or jittered by rng."""
    rw, rh = resized
    bw, bh = bucket
    if rng is None:
        left, top = (rw - bw) // 2, (rh - bh) // 2
    else:
        left = int(rng.integers(0, rw - bw + 1))
        top = int(rng.integers(0, rh - bh + 1))
    return left, top, left + bw, top + bh


@dataclass(frozen=True)
class BucketSettings:
    """resolution: "512", "512,768,1024" or "1024x768" (W x H). quantization: explicit q, else
    from model_family. mode "off": square crop at R (no aspect buckets). no_upscale: images
    smaller than their bucket get a smaller (quantized) bucket instead of being upscaled."""

    resolution: str = "512"
    model_family: str | None = None
    quantization: int | None = None
    mode: str = "on"
    no_upscale: bool = False
    aspects: tuple[float, ...] = ASPECTS

    def __post_init__(self):
        if self.mode not in BUCKET_MODES:
            raise ValueError(f"bucketing mode must be one of {BUCKET_MODES}, got {self.mode!r}")
        parse_resolution(self.resolution)
        if self.quantization is None and self.model_family is None:
            raise ValueError("set quantization or model_family (8 for sd15/sd2, 64 for sdxl/flux)")
        if self.quantization is not None and self.quantization < 1:
            raise ValueError("quantization must be >= 1")
        if self.model_family is not None:
            quantization_for(self.model_family)

    @property
    def q(self) -> int:
        return self.quantization if self.quantization is not None else quantization_for(self.model_family)


def buckets_for(resolution: Resolution, target: int | None, settings: BucketSettings) -> tuple[tuple[int, int], ...]:
    """Candidate buckets for one draw: fixed size, square (mode off) or the aspect set at R."""
    q = settings.q
    if resolution.fixed is not None:
        return (resolution.fixed,)
    if settings.mode == "off":
        r = _round_q(target, q)
        return ((r, r),)
    return bucket_sizes(target, q, tuple(settings.aspects))


def assign_bucket(size: tuple[int, int], resolution: Resolution, target: int | None, settings: BucketSettings) -> tuple[int, int]:
    """The bucket for an image of `size` at target R (after no_upscale shrinking)."""
    bucket = nearest_bucket(size, buckets_for(resolution, target, settings))
    if settings.no_upscale and resolution.fixed is None:
        bucket = shrink_to_fit(bucket, size, settings.q)
    return bucket
