"""Recipe files: canonical round trip, migrations, and whole-file errors."""

import json
from pathlib import Path

import pytest

from app.graph.problems import RecipeError
from app.graph.recipe import dumps_recipe, load_recipe, loads_recipe, save_recipe

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "presets").glob("*.json")) + sorted((ROOT / "graphs").glob("*.json"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_load_then_save_gives_identical_bytes(path, registry, tmp_path):
    graph, problems = load_recipe(path, registry)
    assert problems == []
    out = tmp_path / path.name
    save_recipe(graph, out)
    assert out.read_bytes() == path.read_bytes()


def test_round_trip_keeps_unknown_keys_titles_ui_and_unicode(registry, tmp_path):
    data = {
        "format_version": 1,
        "meta": {"title": "Über-Rezept ✓", "author": "me"},
        "nodes": {
            "7": {"type": "TestConst", "version": 1, "title": "Seven", "params": {"value": 3, "tag": "日本"},
                  "color": "#ff0000"},
            "a": {"type": "TestAdd", "version": 1, "params": {}},
        },
        "links": [{"id": 4, "from_node": "7", "from_output": "out", "to_node": "a", "to_input": "items"}],
        "ui": {"nodes": {"7": {"pos": [1.5, -20]}}, "groups": [{"title": "G", "rect": [0, 0, 10, 10]}]},
        "x-tool": {"anything": [1, 2, 3]},
    }
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    graph, problems = loads_recipe(text, registry=registry)
    assert problems == []
    assert graph.nodes["7"].title == "Seven" and graph.nodes["7"].extra == {"color": "#ff0000"}
    assert dumps_recipe(graph) == text
    p = tmp_path / "r.json"
    save_recipe(graph, p)
    assert dumps_recipe(load_recipe(p, registry)[0]) == text


def test_bucketer_v1_is_migrated_to_v2(registry):
    text = json.dumps({"format_version": 1, "nodes": {
        "1": {"type": "Bucketer", "version": 1, "params": {"resolution": 768, "enable_bucketing": False,
                                                           "batch_size": 2}}}, "links": []})
    graph, problems = loads_recipe(text, registry=registry)
    assert problems == []
    node = graph.nodes["1"]
    assert node.version == 2
    assert node.params == {"resolution": "768", "bucketing": "off", "batch_size": 2}
    assert json.loads(dumps_recipe(graph))["nodes"]["1"]["version"] == 2


def test_node_from_a_newer_program_is_a_problem(registry):
    text = json.dumps({"format_version": 1, "nodes": {"1": {"type": "Bucketer", "version": 9, "params": {}}},
                       "links": []})
    _, problems = loads_recipe(text, registry=registry)
    assert len(problems) == 1 and problems[0].node_id == "1" and "newer version of Bucketer" in problems[0].message


@pytest.mark.parametrize("text,expect", [
    ("", "the file is empty"),
    ("   \n", "the file is empty"),
    ("{", "not valid JSON (line 1"),
    ("[1, 2]", "not a NodeTrainer recipe"),
    ('{"nodes": {}}', "not a NodeTrainer recipe"),
    ('{"format_version": "1", "nodes": {}}', "format_version must be a whole number"),
    ('{"format_version": 99, "nodes": {}}', "newer NodeTrainer (format_version 99"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"format_version": 1, "nodes": {}, "x": ' + "9" * 5000 + "}", "not a valid recipe"),
])
def test_whole_file_errors_are_one_clear_line(text, expect):
    with pytest.raises(RecipeError) as err:
        loads_recipe(text, "r.json")
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.json")
    with pytest.raises(RecipeError, match="is a folder"):
        load_recipe(tmp_path)
    bad = tmp_path / "bin.json"
    bad.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(bad)


def test_recipe_is_data_only(registry, tmp_path):
    """Nothing in a recipe is executed or imported: a type naming a module is just an unknown type."""
    marker = tmp_path / "pwned"
    text = json.dumps({"format_version": 1, "nodes": {
        "1": {"type": "os.system", "version": 1, "params": {"command": f"touch {marker}"}},
        "2": {"type": "__import__('os').system('touch x')", "version": 1, "params": {}}}, "links": []})
    graph, problems = loads_recipe(text, registry=registry)
    from app.graph.validate import validate

    msgs = [str(p) for p in validate(graph, registry)]
    assert any("unknown node type 'os.system'" in m for m in msgs)
    assert not marker.exists()


def test_save_is_atomic_and_leaves_no_temp_files(registry, tmp_path, build):
    g = build(("1", "TestConst", {"value": 2}))
    target = tmp_path / "a" / "r.json"
    save_recipe(g, target)
    save_recipe(g, target)
    assert [p.name for p in target.parent.iterdir()] == ["r.json"]


def test_failed_save_keeps_the_old_file(registry, tmp_path, build, monkeypatch):
    g = build(("1", "TestConst", {"value": 2}))
    target = tmp_path / "r.json"
    save_recipe(g, target)
    before = target.read_bytes()
    import os as _os

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_os, "fsync", full_disk)
    g.set_param("1", "value", 3)
    with pytest.raises(OSError):
        save_recipe(g, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
