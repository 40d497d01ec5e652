"""Node discovery: built-ins from nodes/, plugins from user folders; broken plugins are skipped."""

import subprocess
import sys
import textwrap

from app.graph.registry import Registry, load_registry
from tests.conftest import ROOT

MISSION_NODES = {"LoadModel", "Concept", "Augment", "Bucketer", "LoRAInject", "Optimizer", "TrainLoop",
                 "Sample", "Save"}

GOOD = '''
from app.graph.spec import node, Int, Output
@node(type="MyNode", category="custom", description="A user node.",
      inputs=[Int("n", 1, min=0, max=9)], outputs=[Output("out", "DATASET")])
def my_node(ctx, n):
    return {"n": n}
'''


def write(folder, name, text):
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def test_catalogue_holds_the_mission_nodes():
    reg = load_registry(include_user=False)
    assert MISSION_NODES <= set(reg.specs)
    assert not reg.problems
    for t in MISSION_NODES:
        spec = reg.get(t)
        assert spec.description and spec.category and spec.fn is not None
    assert reg.get("Save").side_effect and reg.get("Sample").side_effect
    assert reg.get("TrainLoop").pure and reg.get("LoRAInject").pure


def test_broken_plugins_are_reported_and_skipped(tmp_path):
    write(tmp_path, "a_good.py", GOOD)
    write(tmp_path, "b_syntax.py", "def broken(:\n")
    write(tmp_path, "c_raises.py", "raise RuntimeError('no GPU found')\n")
    write(tmp_path, "d_exits.py", "import sys\nsys.exit(1)\n")
    write(tmp_path, "e_badspec.py", GOOD.replace("MyNode", "BadSpec").replace("Int(\"n\", 1", "Int(\"n\", 99"))
    write(tmp_path, "f_replaces.py", GOOD.replace("MyNode", "Concept"))
    write(tmp_path, "g_empty.py", "x = 1\n")
    write(tmp_path, "h_duplicate.py", GOOD.replace("my_node", "other"))
    reg = Registry()
    reg.load_builtin()
    reg.load_plugins([tmp_path])
    assert "MyNode" in reg and "BadSpec" not in reg
    assert reg.get("Concept").source == "builtin"
    problems = {p.path.split("/")[-1]: p.message for p in reg.problems}
    assert set(problems) == {"b_syntax.py", "c_raises.py", "d_exits.py", "e_badspec.py", "f_replaces.py",
                             "g_empty.py", "h_duplicate.py"}
    assert "syntax error at line 1" in problems["b_syntax.py"]
    assert "no GPU found" in problems["c_raises.py"]
    assert "SystemExit" in problems["d_exits.py"]
    assert "above the maximum" in problems["e_badspec.py"]
    assert "built in and cannot be replaced" in problems["f_replaces.py"]
    assert "declares no nodes" in problems["g_empty.py"]
    assert "already defined by" in problems["h_duplicate.py"]
    assert all("(skipped)" in str(p) for p in reg.problems)


def test_package_plugins_and_env_folder(tmp_path, monkeypatch):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    write(pkg, "__init__.py", "from .impl import *\n")
    write(pkg, "impl.py", GOOD.replace("MyNode", "PkgNode"))
    monkeypatch.setenv("NODETRAINER_NODES", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    reg = load_registry()
    # impl.py declares the node; the package re-exports it
    assert "PkgNode" in reg and not reg.problems, reg.problems


def test_cli_lists_plugins_and_survives_broken_ones(tmp_path):
    write(tmp_path, "good.py", GOOD)
    write(tmp_path, "bad.py", "import not_a_module_anywhere\n")
    out = subprocess.run([sys.executable, "launch.py", "--nodes-dir", str(tmp_path), "nodes"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "MyNode" in out.stdout and "Concept" in out.stdout
    assert "bad.py" in out.stderr and "not_a_module_anywhere" in out.stderr


def test_node_modules_and_fast_commands_never_import_torch():
    code = textwrap.dedent("""
        import sys, io, contextlib
        sys.argv = ["launch.py"]
        from app.cli import main
        from app.graph.registry import load_registry
        load_registry()
        for argv in (["nodes"], ["nodes", "--json"], ["validate", "presets/tiny_demo.json"]):
            with contextlib.redirect_stdout(io.StringIO()):
                main(argv)
        heavy = sorted(m for m in ("torch", "diffusers", "transformers", "dearpygui", "networkx")
                       if m in sys.modules)
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""
