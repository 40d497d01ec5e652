"""Helpers for the data-pipeline tests: generated images with fixed seeds, broken files.

A separately named module (not conftest) so it never clashes with other test folders' conftests.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def write_image(path, size=(64, 48), seed=0, fmt=None, mode="RGB", **save_kw) -> Path:
    """A noisy image of `size` (width, height); deterministic for a seed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt, **save_kw)
    return path


def write_gradient(path, size=(64, 48)) -> Path:
    """Left half black, right half white: makes flips and crops easy to see."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, w // 2:] = 255
    Image.fromarray(arr).save(path)
    return Path(path)


def write_truncated_jpeg(path, size=(64, 64)) -> Path:
    tmp = Path(str(path) + ".full.jpg")
    write_image(tmp, size, seed=3, fmt="JPEG", quality=95)
    data = tmp.read_bytes()
    tmp.unlink()
    Path(path).write_bytes(data[: len(data) // 2])
    return Path(path)


def run_python(code: str) -> str:
    """Run code in a fresh interpreter rooted at the repository; return stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED="random")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout
