"""Image augmentation drawn per epoch (or per cached variation) from the seeded rng.

Parameters are drawn first (`draw_params`) and applied second (`apply_params`) so the cache can
key a latent by the exact transform that produced it, and so masks receive the same geometric
transform as their image. Each augmentation has its own rng stream: enabling rotation does not
change which samples get flipped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageEnhance

from .rng import rng_for

MODES = ("random", "fixed")
FLIP_MODES = ("off", "random", "fixed")


@dataclass(frozen=True)
class AugmentSettings:
    """Per-concept image augmentation (OneTrainer's defaults: flip and crop jitter on).

    flip: "off", "random" (50 %), or "fixed" (always flipped).
    rotation: max degrees; "random" draws in [-max, max], "fixed" always rotates by max.
    brightness/contrast/saturation: max strength s; the factor is 1 + u with u in [-s, s]
    ("random") or exactly 1 + s ("fixed"). hue: max shift as a fraction of the colour wheel.
    crop_jitter: random crop offset instead of a centre crop when the image is larger than
    its bucket.
    """

    flip: str = "random"
    rotation: float = 0.0
    rotation_mode: str = "random"
    crop_jitter: bool = True
    brightness: float = 0.0
    brightness_mode: str = "random"
    contrast: float = 0.0
    contrast_mode: str = "random"
    saturation: float = 0.0
    saturation_mode: str = "random"
    hue: float = 0.0
    hue_mode: str = "random"

    def __post_init__(self):
        if self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {self.flip!r}")
        for name in ("rotation", "brightness", "contrast", "saturation", "hue"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} strength must be >= 0, got {getattr(self, name)}")
            mode = getattr(self, name + "_mode")
            if mode not in MODES:
                raise ValueError(f"{name}_mode must be one of {MODES}, got {mode!r}")
        if self.hue > 0.5:
            raise ValueError(f"hue is a fraction of the colour wheel (0..0.5), got {self.hue}")


NO_AUGMENT = AugmentSettings(flip="off", crop_jitter=False)


@dataclass(frozen=True)
class AugmentParams:
    """One concrete draw; identical params give identical pixels (used in cache keys)."""

    flip: bool = False
    angle: float = 0.0
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0
    hue: float = 0.0

    @property
    def is_identity(self) -> bool:
        return self == AugmentParams()

    def key(self) -> str:
        return (
            f"flip={int(self.flip)};angle={self.angle:.6f};b={self.brightness:.6f};"
            f"c={self.contrast:.6f};s={self.saturation:.6f};h={self.hue:.6f}"
        )


def draw_params(settings: AugmentSettings, seed: int, epoch: int, index, variation: int | None = None) -> AugmentParams:
    """The augmentation for sample `index` in `epoch` (or in cached `variation`)."""
    s = settings
    if s.flip == "fixed":
        flip = True
    elif s.flip == "random":
        flip = bool(rng_for(seed, epoch, index, "flip", variation=variation).random() < 0.5)
    else:
        flip = False

    def strength(purpose, max_value, mode):
        if max_value == 0:
            return 0.0
        if mode == "fixed":
            return float(max_value)
        return float(rng_for(seed, epoch, index, purpose, variation=variation).uniform(-max_value, max_value))

    return AugmentParams(
        flip=flip,
        angle=strength("rotation", s.rotation, s.rotation_mode),
        brightness=1.0 + strength("brightness", s.brightness, s.brightness_mode),
        contrast=1.0 + strength("contrast", s.contrast, s.contrast_mode),
        saturation=1.0 + strength("saturation", s.saturation, s.saturation_mode),
        hue=strength("hue", s.hue, s.hue_mode),
    )


def _rotate_cover(img: Image.Image, angle: float, resample) -> Image.Image:
    """Rotate about the centre, zoomed just enough that no empty corners appear."""
    w, h = img.size
    t = math.radians(abs(angle))
    zoom = math.cos(t) + max(w / h, h / w) * math.sin(t)
    a = math.radians(angle)
    cos, sin = math.cos(a) / zoom, math.sin(a) / zoom
    cx, cy = w / 2.0, h / 2.0
    # inverse map: output (x, y) -> input (cos*dx - sin*dy + cx, sin*dx + cos*dy + cy)
    matrix = (cos, -sin, cx - cos * cx + sin * cy, sin, cos, cy - sin * cx - cos * cy)
    return img.transform((w, h), Image.Transform.AFFINE, matrix, resample=resample)


def _shift_hue(img: Image.Image, shift: float) -> Image.Image:
    """Exact HSV hue rotation (what users mean by "hue"), via a lookup table on the H band."""
    h, s, v = img.convert("HSV").split()
    k = int(round(shift * 256))
    h = h.point([(i + k) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def apply_params(image: Image.Image, mask: Image.Image | None, params: AugmentParams):
    """Apply a drawn augmentation; masks follow the geometric part (flip, rotation)."""
    if params.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if mask is not None:
            mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if params.angle:
        # bilinear: half the cost of bicubic and indistinguishable at training resolutions
        image = _rotate_cover(image, params.angle, Image.Resampling.BILINEAR)
        if mask is not None:
            mask = _rotate_cover(mask, params.angle, Image.Resampling.BILINEAR)
    if params.brightness != 1.0:
        image = ImageEnhance.Brightness(image).enhance(params.brightness)
    if params.contrast != 1.0:
        image = ImageEnhance.Contrast(image).enhance(params.contrast)
    if params.saturation != 1.0:
        image = ImageEnhance.Color(image).enhance(params.saturation)
    if params.hue:
        image = _shift_hue(image, params.hue)
    return image, mask


def augment(image: Image.Image, mask: Image.Image | None, settings: AugmentSettings, seed: int, epoch: int, index, variation: int | None = None):
    """Augmented (image, mask) for sample `index`; redrawn each epoch unless `variation` is given."""
    return apply_params(image, mask, draw_params(settings, seed, epoch, index, variation))
