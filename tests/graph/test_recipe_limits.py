"""Recipe size limits: oversized files and graphs are refused at once with a message that says why,
before json builds a million objects (shared recipes come from anywhere)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.graph.problems import RecipeError
from app.graph.recipe import MAX_FILE_BYTES, MAX_LINKS, MAX_NODES, load_recipe, loads_recipe, parse_recipe

ROOT = Path(__file__).resolve().parents[2]


def _write_nodes(path: Path, n: int, *, pad: int = 0) -> None:
    """A recipe with n minimal nodes, written line by line (no million-entry dict in the test)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"format_version": 1, "meta": {"title": "' + "x" * pad + '"}, "nodes": {')
        f.write(",".join(f'"{i}":{{"type":"TestConst"}}' for i in range(n)))
        f.write('}, "links": []}\n')


def test_million_node_recipe_is_refused_fast_with_the_limit(registry, tmp_path):
    path = tmp_path / "huge.json"
    _write_nodes(path, 1_000_000)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as err:
        load_recipe(path, registry)
    elapsed = time.perf_counter() - t0
    msg = str(err.value)
    assert str(path) in msg and "too large for a recipe" in msg and "20 MB" in msg, msg
    assert elapsed < 5, elapsed  # sanity only: it is a stat() call


def _b36(i: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        i, r = divmod(i, 36)
        out = digits[r] + out
        if not i:
            return out


def test_million_nodes_under_the_byte_limit_are_refused_before_parsing(registry, monkeypatch):
    text = '{"format_version": 1, "nodes": {' + ",".join(
        f'"{_b36(i)}":{{"type":"A"}}' for i in range(1_000_000)) + '}, "links": []}'
    assert len(text) <= MAX_FILE_BYTES  # so the node count, not the byte size, refuses it
    monkeypatch.setattr(json, "loads", lambda *a, **k: pytest.fail("parsed a recipe it should refuse"))
    with pytest.raises(RecipeError) as err:
        loads_recipe(text, "big.json", registry)
    msg = str(err.value)
    assert msg.startswith("big.json: about 1,000,000 nodes is too many") and f"{MAX_NODES:,}" in msg, msg


def test_node_and_link_counts_over_the_limit_are_refused_exactly(registry):
    nodes = {str(i): {"type": "TestConst", "params": {}} for i in range(MAX_NODES + 1)}
    with pytest.raises(RecipeError, match=r"10,001 nodes is too many for a recipe \(the limit is 10,000\)"):
        parse_recipe({"format_version": 1, "nodes": nodes}, "r.json", registry)
    links = [{"id": i + 1, "from_node": "1", "from_output": "out", "to_node": "2", "to_input": "items"}
             for i in range(MAX_LINKS + 1)]
    with pytest.raises(RecipeError, match=r"r.json: 10,001 links is too many"):
        parse_recipe({"format_version": 1, "nodes": {}, "links": links}, "r.json", registry)


def test_a_recipe_at_the_limit_still_loads(registry, tmp_path):
    path = tmp_path / "big_ok.json"
    _write_nodes(path, MAX_NODES)
    graph, problems = load_recipe(path, registry)
    assert len(graph.nodes) == MAX_NODES and problems == []


def test_oversized_text_is_refused_by_size_too(registry):
    text = '{"format_version": 1, "nodes": {}, "meta": {"d": "' + "x" * (MAX_FILE_BYTES + 1) + '"}}'
    with pytest.raises(RecipeError, match="pasted: 20.0 MB is too large for a recipe"):
        loads_recipe(text, "pasted", registry)


def test_validate_refuses_a_huge_recipe_quickly(tmp_path):
    path = tmp_path / "huge.json"
    _write_nodes(path, 1_000_000)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), "validate", str(path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "too large for a recipe" in proc.stdout + proc.stderr
    assert elapsed < 10, elapsed  # sanity only: the old path parsed and validated for minutes
