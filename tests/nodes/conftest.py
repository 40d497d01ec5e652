"""Fixtures for node-level tests: graphs run through the real executor and registry."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
for p in (str(HERE.parents[1]), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)


@pytest.fixture
def mixed(tmp_path):
    from dataset_node_helpers import make_mixed_dataset

    return make_mixed_dataset(tmp_path / "mixed")
