"""Cheap content identities for model files, folders and in-memory weights (cache keys).

Hashing a 7 GB checkpoint fully would cost a minute per load, so a file's identity is the SHA-256 of
its size, its first and last MiB and 16 evenly spaced 64 KiB samples. The path and mtime are left out
on purpose: a copied or moved model keeps its identity (and its latent cache). For safetensors the
first MiB holds the header with every tensor name, dtype and offset, and the samples catch weights
changed in place. Component identities also include the dtype the component is loaded in, because
fp16 and fp32 VAEs give different latents.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

_EDGE = 1 << 20
_SAMPLE = 1 << 16
_SAMPLES = 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json", ".txt", ".model")


def file_identity(path: "str | os.PathLike") -> str:
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(f"size={size};".encode())
    with open(path, "rb") as f:
        if size <= 2 * _EDGE + _SAMPLES * _SAMPLE:
            h.update(f.read())
        else:
            h.update(f.read(_EDGE))
            step = (size - 2 * _EDGE) // (_SAMPLES + 1)
            for i in range(1, _SAMPLES + 1):
                f.seek(_EDGE + i * step)
                h.update(f.read(_SAMPLE))
            f.seek(size - _EDGE)
            h.update(f.read(_EDGE))
    return h.hexdigest()[:32]


def folder_identity(folder: "str | os.PathLike") -> str:
    """Identity of a component folder: its weight/config files by relative name and content."""
    folder = Path(folder)
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES:
            h.update(f"{p.relative_to(folder).as_posix()}={file_identity(p)};".encode())
    return h.hexdigest()[:32]


def combine(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def tensors_identity(named_tensors: Iterable) -> str:
    """Identity of in-memory weights (builtin tiny models): names, shapes, dtypes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]
