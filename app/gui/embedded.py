"""Recover the recipe that made an output file: NodeTrainer embeds it in every LoRA/checkpoint
(safetensors metadata) and sample PNG (a text chunk), both under the key "nodetrainer_recipe".

Reads only headers with the standard library: no torch, no safetensors package, and never more
than the header of a multi-gigabyte checkpoint.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

from app.graph.problems import RecipeError
from app.graph.recipe import read_recipe_text

KEY = "nodetrainer_recipe"
MAX_HEADER = 100 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_recipe_source(path) -> tuple[str, bool]:
    """(recipe JSON text, whether the file is itself a recipe) for a .json recipe, a .safetensors
    file or a PNG written by NodeTrainer."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(8)
    if head == PNG_SIGNATURE:
        return recipe_from_png(p), False
    if p.suffix.lower() == ".safetensors":
        return recipe_from_safetensors(p), False
    return read_recipe_text(p), True


def recipe_from_safetensors(path) -> str:
    """Header layout: 8-byte little-endian length, then that many bytes of JSON whose
    "__metadata__" maps strings to strings."""
    p = Path(path)
    with open(p, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise RecipeError(f"{p}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER:
            raise RecipeError(f"{p}: not a safetensors file (header length {n})")
        header = f.read(n)
    try:
        meta = json.loads(header.decode("utf-8")).get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise RecipeError(f"{p}: not a safetensors file (its header is not JSON)") from None
    text = meta.get(KEY) if isinstance(meta, dict) else None
    if not isinstance(text, str):
        raise RecipeError(f"{p}: holds no NodeTrainer recipe (it was not written by NodeTrainer, or its "
                          "metadata was stripped)")
    return text


def recipe_from_png(path) -> str:
    """Looks in tEXt, zTXt and iTXt chunks for the recipe key."""
    p = Path(path)
    data = p.read_bytes()
    pos = len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        pos += 12 + length
        text = _png_text(ctype, body)
        if text is not None:
            return text
        if ctype == b"IEND":
            break
    raise RecipeError(f"{p}: holds no NodeTrainer recipe (no '{KEY}' text chunk)")


def _png_text(ctype: bytes, body: bytes) -> str | None:
    try:
        if ctype == b"tEXt":
            key, _, value = body.partition(b"\x00")
            return value.decode("latin-1") if key == KEY.encode() else None
        if ctype == b"zTXt":
            key, _, rest = body.partition(b"\x00")
            return zlib.decompress(rest[1:]).decode("latin-1") if key == KEY.encode() else None
        if ctype == b"iTXt":
            key, _, rest = body.partition(b"\x00")
            if key != KEY.encode():
                return None
            compressed, _method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\x00")
            _tkey, _, value = rest.partition(b"\x00")
            return (zlib.decompress(value) if compressed else value).decode("utf-8")
    except (zlib.error, UnicodeDecodeError, IndexError):
        return None
    return None
