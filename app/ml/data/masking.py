"""Training masks (`<stem>-masklabel.png`, white = learn) made from a text prompt or an alpha channel.

A masked loss lets a LoRA learn the subject and not the background. Two sources, as OneTrainer
offers: CLIPSeg (transformers' CLIPSegForImageSegmentation, e.g. CIDAS/clipseg-rd64-refined) scores
every pixel against a prompt ("a person"), or the image's own alpha channel (cut-outs). The score is
then thresholded, grown (dilate), softened (blur) and optionally inverted, always at the image's
own size so a mask pairs with its image pixel for pixel.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .captioning import load_failure, read_model_config, to_device
from .errors import DataError

DOWNLOAD_HINT = "download it, e.g. `hf download CIDAS/clipseg-rd64-refined --local-dir models/clipseg`"


@dataclass(frozen=True)
class MaskSettings:
    """threshold: score (0..1) above which a pixel is learned; dilate: pixels to grow the mask by;
    blur: Gaussian radius in pixels for soft edges (0 = hard 0/255); invert: learn the rest."""

    threshold: float = 0.4
    dilate: int = 0
    blur: float = 0.0
    invert: bool = False

    def __post_init__(self):
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be between 0 and 1, got {self.threshold}")
        if self.dilate < 0 or self.blur < 0:
            raise ValueError("dilate and blur must be >= 0")


def finish_mask(score: np.ndarray, settings: MaskSettings) -> np.ndarray:
    """A float score map (H, W) in [0, 1] -> the uint8 mask (H, W): threshold, dilate, blur, invert."""
    from PIL import Image, ImageFilter

    mask = np.where(np.asarray(score, dtype=np.float32) >= settings.threshold, 255, 0).astype(np.uint8)
    img = Image.fromarray(mask, "L")
    if settings.dilate > 0:
        img = img.filter(ImageFilter.MaxFilter(2 * int(settings.dilate) + 1))
    if settings.blur > 0:
        img = img.filter(ImageFilter.GaussianBlur(float(settings.blur)))
    out = np.asarray(img, dtype=np.uint8)
    return (255 - out) if settings.invert else out.copy()


def alpha_score(path: str | Path) -> np.ndarray | None:
    """The alpha channel of an image as a score in [0, 1] (upright), or None when it has none."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode not in ("RGBA", "LA", "PA") and "transparency" not in img.info:
                return None
            alpha = img.convert("RGBA").getchannel("A")
    except Exception as exc:
        raise DataError(f"cannot open image ({exc})", path) from None
    return np.asarray(alpha, dtype=np.float32) / 255.0


@dataclass
class Segmenter:
    """A loaded CLIPSeg model: `scores(images, prompt)` gives a [0, 1] map per image at its size."""

    folder: Path
    model: object
    processor: object
    device: str

    def scores(self, images: Sequence, prompt: str) -> list[np.ndarray]:
        import torch
        from PIL import Image

        images = [im.convert("RGB") for im in images]
        if not images:
            return []
        with torch.inference_mode():
            inputs = self.processor(text=[prompt] * len(images), images=images, padding=True,
                                    return_tensors="pt").to(self.device)
            logits = self.model(**inputs).logits
        logits = logits.float().cpu()
        if logits.ndim == 2:  # one image: transformers drops the batch axis
            logits = logits[None]
        probs = torch.sigmoid(logits).numpy()
        out = []
        for p, im in zip(probs, images):
            small = Image.fromarray(p.astype(np.float32), "F")
            out.append(np.clip(np.asarray(small.resize(im.size, Image.Resampling.BILINEAR)), 0.0, 1.0))
        return out


def load_segmenter(folder: str | Path, device: str = "cpu") -> Segmenter:
    """CLIPSeg from a model folder; a folder of another kind or a failed load is a DataError naming it."""
    folder = Path(folder)
    data = read_model_config(folder, "mask model")
    if data.get("model_type") != "clipseg":
        raise DataError(f"model_type {data.get('model_type')!r} in config.json is not CLIPSeg; choose a CLIPSeg "
                        f"folder ({DOWNLOAD_HINT}) or use the alpha channel", folder)
    try:
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        processor = CLIPSegProcessor.from_pretrained(str(folder))
        model = CLIPSegForImageSegmentation.from_pretrained(str(folder))
    except Exception as exc:  # safetensors, tokenizers and transformers each raise their own kinds
        raise DataError(f"cannot load the CLIPSeg model ({load_failure(exc)}); the folder needs the weights, the "
                        f"tokenizer and the processor files: {DOWNLOAD_HINT}", folder) from None
    to_device(model, device, folder)
    return Segmenter(folder=folder, model=model, processor=processor, device=device)


def overlay(image, mask: np.ndarray, colour=(255, 40, 40), strength: float = 0.5):
    """The image with the learned area tinted (a preview of what the mask keeps)."""
    from PIL import Image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    a = (mask.astype(np.float32) / 255.0)[..., None] * strength
    tinted = rgb * (1 - a) + np.asarray(colour, dtype=np.float32) * a
    return Image.fromarray(np.clip(tinted + 0.5, 0, 255).astype(np.uint8), "RGB")


def mask_png(mask: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask, "L").save(buf, format="PNG")
    return buf.getvalue()
