"""Zoom and fit for the node editor.

Dear PyGui's node editor (imnodes) can neither scale nor report or set its panning, so the view
is ours: a node is drawn at `grid * zoom + shift` in the editor's space, its text in a font loaded
at the zoomed size and its widgets at zoomed widths. The recipe keeps grid-space positions; the
view is never saved, so opening and saving an unchanged recipe gives the same bytes.

The maths here is pure (no Dear PyGui) so it is tested without a display.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ZOOM_MIN, ZOOM_MAX = 0.35, 2.0
ZOOM_STEP = 1.15
FIT_MARGIN = 24.0
DEFAULT_NODE_SIZE = (260.0, 200.0)  # before a node has been drawn once

FONT_SIZE = 13
FONT_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                   "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                   "/System/Library/Fonts/Supplemental/Arial.ttf",
                   "C:/Windows/Fonts/segoeui.ttf")
# Font sizes loaded for the canvas: zooming picks the nearest (a font atlas per size is cheap).
ZOOM_FONT_SIZES = (5, 6, 7, 8, 9, 10, 11, 12, 13, 15, 17, 19, 22, 26)


def font_file() -> str | None:
    return next((p for p in FONT_CANDIDATES if os.path.isfile(p)), None)


def font_size_for(zoom: float) -> int:
    want = FONT_SIZE * zoom
    return min(ZOOM_FONT_SIZES, key=lambda s: abs(s - want))


@dataclass(frozen=True)
class View:
    zoom: float = 1.0
    shift: tuple[float, float] = (0.0, 0.0)

    def to_editor(self, grid) -> tuple[float, float]:
        return grid[0] * self.zoom + self.shift[0], grid[1] * self.zoom + self.shift[1]

    def to_grid(self, editor) -> tuple[float, float]:
        return (editor[0] - self.shift[0]) / self.zoom, (editor[1] - self.shift[1]) / self.zoom

    def zoomed(self, factor: float, anchor) -> "View":
        """Zoom by `factor` keeping the grid point under `anchor` (editor space) where it is."""
        zoom = min(ZOOM_MAX, max(ZOOM_MIN, self.zoom * factor))
        g = self.to_grid(anchor)
        return View(zoom, (anchor[0] - g[0] * zoom, anchor[1] - g[1] * zoom))


def fit(boxes, area, margin: float = FIT_MARGIN, max_zoom: float = 1.0) -> View:
    """The view that shows every box (grid-space x, y, w, h at zoom 1) inside `area` (editor-space
    x, y, w, h), centred, at the largest zoom up to `max_zoom` (fitting never enlarges past 1:1)."""
    boxes = list(boxes)
    if not boxes:
        return View(1.0, (area[0] + margin, area[1] + margin))
    x0 = min(b[0] for b in boxes)
    y0 = min(b[1] for b in boxes)
    x1 = max(b[0] + b[2] for b in boxes)
    y1 = max(b[1] + b[3] for b in boxes)
    w, h = max(1.0, x1 - x0), max(1.0, y1 - y0)
    aw, ah = max(1.0, area[2] - 2 * margin), max(1.0, area[3] - 2 * margin)
    zoom = min(max_zoom, ZOOM_MAX, aw / w, ah / h)
    zoom = max(ZOOM_MIN, zoom)
    sx = area[0] + margin + max(0.0, (aw - w * zoom) / 2) - x0 * zoom
    sy = area[1] + margin + max(0.0, (ah - h * zoom) / 2) - y0 * zoom
    return View(zoom, (sx, sy))
