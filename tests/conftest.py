import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ROOT / "tests" / "stub_nodes"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test models are dominated by per-op overhead: one thread each is faster than two fighting over
# the CPU, and subprocesses started by tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def registry():
    """The built-in catalogue plus the test-only stub nodes."""
    from app.graph.registry import Registry

    reg = Registry()
    reg.load_builtin()
    reg.load_plugins([STUBS])
    assert not reg.problems, reg.problems
    return reg


@pytest.fixture
def build(registry):
    """build(("1", "TestConst", {"value": 2}), ..., links=[("1", "out", "2", "items")]) -> Graph"""
    from app.graph.model import Graph

    def _build(*nodes, links=()):
        g = Graph()
        for nid, ntype, params in nodes:
            g.add_node(ntype, registry.get(ntype).version, params, node_id=nid)
        for src, out, dst, inp in links:
            g.add_link(src, out, dst, inp)
        return g

    return _build
