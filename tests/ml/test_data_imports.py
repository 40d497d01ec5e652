"""The data library must import without torch (the GUI process imports it)."""
import pytest

from data_helpers import run_python

MODULES = ["errors", "rng", "images", "captions", "augment", "concept", "bucketing", "batches", "cache", "demo"]


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_torch(module):
    out = run_python(f"import sys, app.ml.data.{module}; print('torch' in sys.modules)")
    assert out.strip() == "False"
