"""Compose the README's before/after picture from a run of the demo recipe.

    python launch.py run presets/tiny_demo.json --workspace /tmp/demo
    python tests/presets/demo_before_after.py /tmp/demo docs/demo-before-after.png

Puts the "Sample before" images (``Sample_2``) in the top row and the "Sample after" images
(``Sample_8``) below, each labelled with its prompt, enlarged 3x without smoothing so the 64 px
samples stay readable.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

SCALE = 3
LABEL_W = 70
CAPTION_H = 18


def prompt_of(png: Path) -> str:
    """The prompt from the parameters the Sample node writes into the PNG (the file name otherwise)."""
    try:
        return str(json.loads(Image.open(png).info["nodetrainer_params"])["prompt"])
    except (KeyError, ValueError, TypeError):
        return png.stem


def compose(workspace: Path, out: Path, before: str = "Sample_2", after: str = "Sample_8") -> Path:
    rows = [("before", sorted((workspace / before).glob("*.png"))), ("after", sorted((workspace / after).glob("*.png")))]
    if not rows[0][1] or not rows[1][1]:
        raise SystemExit(f"{workspace}: no PNGs in {before}/ or {after}/; run presets/tiny_demo.json with --workspace there first")
    cell = 64 * SCALE
    cols = max(len(r[1]) for r in rows)
    canvas = Image.new("RGB", (LABEL_W + cols * (cell + 8), len(rows) * (cell + CAPTION_H + 8) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for r, (label, pngs) in enumerate(rows):
        y = 4 + r * (cell + CAPTION_H + 8)
        draw.text((6, y + cell // 2 - 6), label, fill="black", font=font)
        for c, png in enumerate(pngs):
            x = LABEL_W + c * (cell + 8)
            img = Image.open(png).convert("RGB")
            canvas.paste(img.resize((img.width * SCALE, img.height * SCALE), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell + 3), prompt_of(png), fill="black", font=font)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, optimize=True)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(compose(Path(sys.argv[1]), Path(sys.argv[2])))
