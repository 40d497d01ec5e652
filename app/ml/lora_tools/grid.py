"""A labelled comparison grid, as A1111's X/Y/Z plot draws it: column labels on top, row labels at the left.

The fastest way to pick the best save of a run: one row per LoRA file (the periodic saves), one
column per strength (and prompt), every cell with the same seed, so only the LoRA differs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def lora_files(entries: Sequence[str]) -> list[Path]:
    """Files and folders (their ``.safetensors`` in name order) as one list, in the order given."""
    out: list[Path] = []
    for e in entries:
        p = Path(os.path.expanduser(e))
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise FileNotFoundError(f"{p}: no .safetensors files in this folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such LoRA file or folder")
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines or [""]


def compose(cells: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str],
            *, pad: int = 4) -> Image.Image:
    """One image: ``cells[row][col]`` in a grid with wrapped labels (white background, black text)."""
    rows, cols = len(cells), len(cells[0]) if cells else 0
    if not rows or not cols or any(len(r) != cols for r in cells):
        raise ValueError("a grid needs at least one cell and the same number of cells in every row")
    w, h = cells[0][0].size
    font = _font(max(10, min(w, h) // 12))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.size * 1.25) if hasattr(font, "size") else 12
    left_w = max(w, 96)
    col_lines = [_wrap(probe, t, font, w - 2 * pad) for t in col_labels]
    top_h = max(len(ls) for ls in col_lines) * line_h + 2 * pad
    grid = Image.new("RGB", (left_w + cols * w, top_h + rows * h), "white")
    draw = ImageDraw.Draw(grid)
    for c, ls in enumerate(col_lines):
        for i, line in enumerate(ls):
            x = left_w + c * w + (w - draw.textlength(line, font=font)) / 2
            draw.text((x, pad + i * line_h), line, fill="black", font=font)
    for r, label in enumerate(row_labels):
        ls = _wrap(draw, label, font, left_w - 2 * pad)
        y0 = top_h + r * h + (h - len(ls) * line_h) / 2
        for i, line in enumerate(ls):
            draw.text((left_w - pad - draw.textlength(line, font=font), y0 + i * line_h), line, fill="black", font=font)
        for c, im in enumerate(cells[r]):
            grid.paste(im.convert("RGB"), (left_w + c * w, top_h + r * h))
    return grid
