"""A shared recipe writes only inside its workspace (or folders the user allowed): node ids are plain
names, Save/Cache paths that climb out with '..', are absolute or start with '~' are refused by
`validate`, by `run` and by the executor itself; reading is not restricted."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def lora_recipe(save_path: str, ids=("1", "2", "3")) -> dict:
    """LoadModel -> LoRAInject -> Save: writes a LoRA without training (a second on the tiny model)."""
    a, b, c = ids
    return {
        "format_version": 1,
        "meta": {"title": "shared"},
        "nodes": {
            a: {"type": "LoadModel", "version": 1, "params": {"source": "builtin:tiny-sd"}},
            b: {"type": "LoRAInject", "version": 1, "params": {"rank": 2, "alpha": 2.0}},
            c: {"type": "Save", "version": 1, "params": {"path": save_path, "if_exists": "overwrite"}},
        },
        "links": [{"id": 1, "from_node": a, "from_output": "model", "to_node": b, "to_input": "model"},
                  {"id": 2, "from_node": b, "from_output": "model", "to_node": c, "to_input": "model"}],
        "ui": {"nodes": {a: {"pos": [0, 0]}, b: {"pos": [200, 0]}, c: {"pos": [400, 0]}},
               "groups": [{"title": "all", "rect": [0, 0, 10, 10], "nodes": [a, c]}]},
    }


def write_recipe(folder: Path, data: dict, name="shared.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(json.dumps(data, indent=2))
    return p


@pytest.fixture
def no_env_allow(monkeypatch):
    monkeypatch.delenv("NODETRAINER_ALLOW_OUTPUT", raising=False)


def escaping_paths(tmp_path: Path) -> dict[str, str]:
    return {"dotdot": "../../escaped.safetensors", "absolute": str(tmp_path / "outside" / "escaped.safetensors"),
            "home": "~/nodetrainer_escaped_test.safetensors"}


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "home"])
def test_validate_refuses_a_save_path_outside_the_workspace(tmp_path, capsys, no_env_allow, kind):
    from app.cli import main

    path = escaping_paths(tmp_path)[kind]
    recipe = write_recipe(tmp_path / "recipes", lora_recipe(path))
    ws = tmp_path / "ws"
    code = main(["validate", str(recipe)] + (["--allow-output", str(tmp_path / "elsewhere")]))
    out = capsys.readouterr().out
    assert code == 2, out
    expected = os.path.realpath(os.path.expanduser(path)) if kind != "dotdot" else "escaped.safetensors"
    line = next(l for l in out.splitlines() if "outside" in l)
    assert line.startswith("node 3 (Save): param 'path' writes to ") and expected in line, line
    assert "--allow-output" in line
    # the run refuses it before anything runs, and nothing is written anywhere
    code = main(["run", str(recipe), "--workspace", str(ws)])
    assert code == 2
    assert not (tmp_path / "outside").exists() and not ws.exists()
    assert not Path(os.path.expanduser("~/nodetrainer_escaped_test.safetensors")).exists()


def test_allowed_output_folder_by_flag_or_environment(tmp_path, capsys, monkeypatch, no_env_allow):
    from app.cli import main

    loras = tmp_path / "ComfyUI" / "models" / "loras"
    loras.mkdir(parents=True)
    recipe = write_recipe(tmp_path / "recipes", lora_recipe(str(loras / "mine.safetensors")))
    assert main(["validate", str(recipe)]) == 2
    assert main(["validate", str(recipe), "--allow-output", str(loras)]) == 0
    monkeypatch.setenv("NODETRAINER_ALLOW_OUTPUT", os.pathsep.join(["/nonexistent", str(tmp_path / "ComfyUI")]))
    assert main(["validate", str(recipe)]) == 0
    monkeypatch.delenv("NODETRAINER_ALLOW_OUTPUT")
    capsys.readouterr()
    assert main(["run", str(recipe), "--workspace", str(tmp_path / "ws"), "--allow-output", str(loras)]) == 0
    assert (loras / "mine.safetensors").is_file()
    # a symlink inside an allowed folder that points elsewhere is followed before deciding
    (loras / "link").symlink_to(tmp_path / "private", target_is_directory=True)
    (tmp_path / "private").mkdir()
    write_recipe(tmp_path / "recipes", lora_recipe(str(loras / "link" / "x.safetensors")))
    assert main(["validate", str(recipe), "--allow-output", str(loras)]) == 2
    assert str(tmp_path / "private" / "x.safetensors") in capsys.readouterr().out


def test_run_subprocess_refuses_and_worker_allows(tmp_path, no_env_allow):
    """The CLI as a user runs it: refused by default; --allow-output reaches the --worker process."""
    import subprocess
    import sys

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    recipe = write_recipe(tmp_path / "recipes", lora_recipe(str(out_dir / "w.safetensors")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    base = [sys.executable, str(ROOT / "launch.py"), "run", str(recipe), "--workspace", str(tmp_path / "ws")]
    r = subprocess.run(base, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "outside the workspace" in r.stderr and "node 3 (Save)" in r.stderr, r.stderr
    r = subprocess.run(base + ["--worker", "--allow-output", str(out_dir)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert (out_dir / "w.safetensors").is_file()


def test_executor_refuses_escapes_itself(tmp_path, registry, build, no_env_allow):
    """The editor's worker runs graphs without the CLI: the executor checks ids and written paths."""
    from app.engine.executor import Executor

    g = build(("../evil", "TestConst", {"value": 1}))
    r = Executor(registry).run(g, workspace=tmp_path / "ws")
    assert r.status == "invalid"
    assert any(p.node_id == "../evil" and "letters, digits" in p.message for p in r.problems)

    from app.graph.model import Graph
    from app.graph.registry import load_registry

    reg = load_registry(include_user=False)
    g2 = Graph()
    g2.add_node("LoadModel", 1, {"source": "builtin:tiny-sd"}, node_id="1")
    g2.add_node("Save", 1, {"path": "../x.safetensors"}, node_id="2")
    g2.add_link("1", "model", "2", "model")
    r = Executor(reg).run(g2, workspace=tmp_path / "ws")
    assert r.status == "invalid" and "param 'path' writes to" in r.problems[0].message
    assert not (tmp_path / "x.safetensors").exists()


def test_cache_folder_is_a_written_path(tmp_path, no_env_allow):
    from app.graph.model import Graph
    from app.graph.registry import load_registry
    from app.graph.validate import validate

    reg = load_registry(include_user=False)
    g = Graph()
    g.add_node("Cache", 1, {"folder": str(tmp_path / "elsewhere")}, node_id="5")
    problems = validate(g, reg, workspace=tmp_path / "ws", recipe_dir=tmp_path)
    assert any(p.node_id == "5" and "param 'folder' writes to" in p.message for p in problems)
    g.nodes["5"].params["folder"] = str(tmp_path / "ws" / "cache")
    assert not any("writes to" in p.message for p in validate(g, reg, workspace=tmp_path / "ws", recipe_dir=tmp_path))
    # read paths are not restricted
    g.add_node("Concept", 1, {"folder": "/some/where/else"}, node_id="6")
    assert not any(p.node_id == "6" and "writes to" in p.message
                   for p in validate(g, reg, workspace=tmp_path / "ws", recipe_dir=tmp_path))


def test_old_recipe_ids_are_renamed_with_links_and_ui(tmp_path):
    from app.graph.recipe import dumps_recipe, load_recipe
    from app.graph.registry import load_registry
    from app.graph.validate import validate

    reg = load_registry(include_user=False)
    data = lora_recipe("x.safetensors", ids=("../../load", "my lora", "."))
    graph, problems = load_recipe(write_recipe(tmp_path, data), reg)
    assert not problems
    assert sorted(graph.nodes) == ["load", "my_lora", "node"]
    assert {(l.from_node, l.to_node) for l in graph.links} == {("load", "my_lora"), ("my_lora", "node")}
    assert set(graph.ui["nodes"]) == {"load", "my_lora", "node"}
    assert graph.ui["groups"][0]["nodes"] == ["load", "node"]
    assert not validate(graph, reg, workspace=tmp_path / "ws", recipe_dir=tmp_path)
    # a clash with an existing id gets a suffix
    data = lora_recipe("x.safetensors", ids=("a/b", "a_b", "3"))
    graph, _ = load_recipe(write_recipe(tmp_path, data, "clash.json"), reg)
    assert sorted(graph.nodes) == ["3", "a_b", "a_b_2"]
    # an unchanged valid recipe still saves to the same bytes
    presets = sorted((ROOT / "presets").glob("*.json"))
    assert presets
    for preset in presets:
        g, _ = load_recipe(preset, reg)
        assert dumps_recipe(g) == preset.read_text(encoding="utf-8"), preset.name


def test_node_folder_never_leaves_the_workspace(tmp_path):
    import threading

    from app.engine.context import NodeContext
    from app.graph.confine import OutsideWorkspace

    ws = tmp_path / "ws"
    ws.mkdir()
    outside = tmp_path / "victim"
    outside.mkdir()
    (ws / "TrainLoop_7").symlink_to(outside, target_is_directory=True)

    def ctx(nid):
        return NodeContext(node_id=nid, node_type="TrainLoop", title="t", emit=lambda e: None,
                           cancel_event=threading.Event(), workspace=ws)

    with pytest.raises(OutsideWorkspace, match="outside the workspace"):
        ctx("7").node_dir("backups")
    with pytest.raises(OutsideWorkspace, match="letters, digits"):
        ctx("../../x").node_dir()
    assert not (outside / "backups").exists()
    assert ctx("8").node_dir("samples") == ws / "TrainLoop_8" / "samples"


def test_rolling_backups_delete_only_their_own_folders(tmp_path):
    from app.ml.train.loop import prune_backups

    root = tmp_path / "backups"
    for s in (10, 20, 30, 40):
        (root / f"step_{s:07d}").mkdir(parents=True)
        (root / f"step_{s:07d}" / "backup.json").write_text("{}")
    victim = tmp_path / "victim"
    (victim / "step_0000001").mkdir(parents=True)
    (victim / "step_0000001" / "backup.json").write_text("{}")
    (root / "step_0000001").symlink_to(victim / "step_0000001", target_is_directory=True)
    (root / "step_notes").mkdir()  # a user's folder with a similar name
    (root / "step_0000005").mkdir()  # no backup.json: not one of ours
    gone = prune_backups(root, keep=2)
    assert [p.name for p in gone] == ["step_0000010", "step_0000020"]
    assert sorted(p.name for p in root.iterdir()) == ["step_0000001", "step_0000005", "step_0000030",
                                                      "step_0000040", "step_notes"]
    assert (victim / "step_0000001" / "backup.json").is_file()
    shutil.rmtree(root)


@pytest.mark.parametrize("value", [".", "sub/..", "{ws}", "{allowed}"])
def test_a_save_path_naming_the_workspace_itself_is_refused(tmp_path, value, no_env_allow):
    """Save adds ".safetensors" to the last name (ws -> ../ws.safetensors) and replaces a folder it
    writes: the workspace or an allowed folder itself is no place to save."""
    from app.engine.executor import Executor
    from app.graph.model import Graph
    from app.graph.registry import load_registry

    ws, allowed = tmp_path / "ws", tmp_path / "loras"
    allowed.mkdir()
    reg = load_registry(include_user=False)
    g = Graph()
    g.add_node("LoadModel", 1, {"source": "builtin:tiny-sd"}, node_id="1")
    g.add_node("Save", 1, {"path": value.format(ws=ws, allowed=allowed), "what": "full_model",
                           "layout": "single_file"}, node_id="2")
    g.add_link("1", "model", "2", "model")
    r = Executor(reg, allow_output=[allowed]).run(g, workspace=ws)
    assert r.status == "invalid" and "itself; name a file or folder inside it" in r.problems[0].message, r.problems
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loras"]


def test_validate_checks_against_the_workspace_the_run_will_use(tmp_path, no_env_allow):
    from app.cli import main

    ws = tmp_path / "ws"
    recipe = write_recipe(tmp_path / "recipes", lora_recipe(str(ws / "loras" / "x.safetensors")))
    assert main(["validate", str(recipe)]) == 2
    assert main(["validate", str(recipe), "--workspace", str(ws)]) == 0
