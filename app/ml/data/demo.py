"""A tiny generated dataset of coloured shapes, for the demo recipe and learning tests.

Captions are exactly the colour and shape ("red circle"), so a model that learned anything
from them must produce redder latents for "red" than for "blue". Images have mixed sizes and
aspects so they exercise bucketing. Fully deterministic from the seed: same bytes every run.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
NEW_SHAPES = ("cross",)  # drawn only for the demo LoRA's data: builtin:shapes-sd never saw one
ASPECTS = ((1, 1), (4, 3), (3, 4), (3, 2), (2, 3))  # (w, h)


def make_shapes_dataset(folder: str | Path, n_per_class: int = 4, size: int = 64, seed: int = 0,
                        colours: tuple[str, ...] = ("red", "blue"), shapes: tuple[str, ...] = SHAPES,
                        radius: tuple[float, float] = (0.25, 0.4),
                        aspects: tuple[tuple[int, int], ...] = ASPECTS) -> list[Path]:
    """Write `<colour>_<shape>_<i>.png` + `.txt` ("red circle") files; returns the image paths.

    Sizes are about size*size pixels at aspects 1:1, 4:3, 3:4, 3:2, 2:3 (rounded to 8). `radius`:
    the shape's radius range as a fraction of the shorter side (larger = a stronger colour signal).
    `aspects`: the (w, h) aspects drawn from; ``((1, 1),)`` gives square images only.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for colour in colours:
        if colour not in COLOURS:
            raise ValueError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
        fill = COLOURS[colour]
        for shape in shapes:
            for i in range(n_per_class):
                aw, ah = aspects[int(rng.integers(len(aspects)))]
                norm = math.sqrt(aw * ah)
                w = max(8, int(round(size * aw / norm / 8)) * 8)
                h = max(8, int(round(size * ah / norm / 8)) * 8)
                img = shape_image(rng, fill, shape, w, h, radius)
                path = folder / f"{colour}_{shape}_{i:03d}.png"
                img.save(path, optimize=False)
                path.with_suffix(".txt").write_text(f"{colour} {shape}\n", encoding="utf-8")
                paths.append(path)
    return paths


def shape_image(rng: np.random.Generator, fill: tuple[int, int, int], shape: str, w: int, h: int,
                radius: tuple[float, float] = (0.25, 0.4)) -> Image.Image:
    """One ``w`` x ``h`` image: a light, slightly noisy background with one filled shape at a random
    place and size (also what ``train_shapes_sd.py`` trains the ``builtin:shapes-sd`` base on)."""
    if shape not in SHAPES + NEW_SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES + NEW_SHAPES)}")
    bg = rng.integers(200, 250, size=3)
    noise = rng.integers(-8, 9, size=(h, w, 3))
    arr = np.clip(bg[None, None, :] + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    draw = ImageDraw.Draw(img)
    r = min(w, h) * float(rng.uniform(*radius))
    cx = float(rng.uniform(r, w - r))
    cy = float(rng.uniform(r, h - r))
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "cross":
        arm = r / 3
        draw.rectangle((cx - r, cy - arm, cx + r, cy + arm), fill=fill)
        draw.rectangle((cx - arm, cy - r, cx + arm, cy + r), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return img
