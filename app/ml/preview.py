"""Preview payloads for the editor: images as PNG bytes (small, msgpack-friendly)."""

from __future__ import annotations

import io


def png_bytes(image, max_side: int = 256) -> bytes:
    img = image.copy()
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def images_payload(images, captions=(), max_side: int = 256) -> dict:
    return {"images": [png_bytes(im, max_side) for im in images], "captions": [str(c) for c in captions]}
