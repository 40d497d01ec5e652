"""Write sample images as PNGs that carry their recipe and generation parameters.

``nodetrainer_recipe`` (the recipe JSON) lets a user drop an image into the editor to recover the
graph; ``parameters`` is A1111's text block, so PNG-info readers and Civitai show prompt, sampler
and seed; ``nodetrainer_params`` holds the same as JSON for exact machine reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from app.atomic import atomic_file


def a1111_parameters(p: dict[str, Any]) -> str:
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append("Negative prompt: " + p["negative_prompt"])
    fields = [
        f"Steps: {p['steps']}", f"Sampler: {p['sampler']}", f"CFG scale: {p['cfg']}", f"Seed: {p['seed']}",
        f"Size: {p['width']}x{p['height']}", f"Model hash: {str(p.get('model_hash', ''))[:10]}",
    ]
    if p.get("clip_skip", 1) != 1:
        fields.append(f"Clip skip: {p['clip_skip']}")
    if p.get("strength") is not None:
        fields.append(f"Lora weight: {p['strength']}")
    lines.append(", ".join(fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: "str | os.PathLike", params: dict[str, Any], recipe: Any = None,
             *, overwrite: bool = False) -> Path:
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    info.add_text("nodetrainer_params", json.dumps(params, sort_keys=True))
    if recipe is not None:
        info.add_text("nodetrainer_recipe", recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True))
    with atomic_file(path, overwrite) as target:
        image.save(target.tmp, format="PNG", pnginfo=info)
    return target.final


def save_samples(result, folder: "str | os.PathLike", *, prefix: str = "sample", recipe: Any = None,
                 overwrite: bool = False) -> list[Path]:
    """One PNG per image, ``<prefix>_<index>_<seed>.png``; existing files are kept (``_1`` suffix)."""
    folder = Path(folder)
    return [
        save_png(img, folder / f"{prefix}_{i:03d}_{p['seed']}.png", p, recipe, overwrite=overwrite)
        for i, (img, p) in enumerate(zip(result.images, result.params))
    ]


def read_png_text(path: "str | os.PathLike") -> dict[str, str]:
    with Image.open(path) as im:
        return dict(getattr(im, "text", {}) or im.info)
