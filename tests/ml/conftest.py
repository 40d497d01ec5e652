"""Fixtures for the data-pipeline tests (helpers live in data_helpers.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parents[1]), str(HERE)):  # repository root (for app.*) and this folder (helpers)
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def shapes(tmp_path):
    from app.ml.data.demo import make_shapes_dataset

    folder = tmp_path / "shapes"
    make_shapes_dataset(folder, n_per_class=3, size=64, seed=0)
    return folder


@pytest.fixture(scope="module")
def sd():
    """The tiny SD 1.5 model (one per test module: tests may train or move it)."""
    from app.ml.models import load_model

    return load_model("builtin:tiny-sd")


@pytest.fixture(scope="module")
def sdxl():
    from app.ml.models import load_model

    return load_model("builtin:tiny-sdxl")
