"""The memory plan in the editor: the TrainLoop node's "≈ ... peak" line, the breakdown and the
target size in the inspector; headless with a stand-in planner, and the real editor on Xvfb with the
real planner (a subprocess) for a preset."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from tests.gui.conftest import ROOT

PLAN = {"node": "7", "where": "TrainLoop (node 7)", "model": "Stable Diffusion 1.5 from builtin:shapes-sd; lora rank 8",
        "tokens": "80x56, batch 4: 10x7 latents", "peak_bytes": 7_800_000_000,
        "parts": {"weights unet (bf16)": 5_000_000_000, "activations": 2_800_000_000}, "notes": ["a note"]}


def test_the_node_line_and_the_inspector_show_the_plan_and_what_fits(editor, monkeypatch):
    import dearpygui.dearpygui as dpg

    from app.gui import memory_plan

    asked = []

    def fake(data, recipe_dir, target, timeout=0):
        asked.append(target)
        plan = dict(PLAN)
        if target:
            plan["fit"] = {"target_bytes": 6e9, "fits": True, "changes": ["nf4 unet", "block swap 2"],
                           "peak_bytes": 5.9e9}
        return {"plans": [plan]}

    monkeypatch.setattr(memory_plan, "compute", fake)
    monkeypatch.setattr(memory_plan, "SETTLE_S", 0.0)
    monkeypatch.setattr(memory_plan, "can_plan", lambda: True)  # as an editor on screen
    memory_plan._CACHE.clear()
    assert editor.open_path(str(ROOT / "presets" / "tiny_demo.json"))
    editor.focus_node("7", quiet=True)

    def settle():
        for _ in range(200):
            editor.frame()
            if not editor.memory.busy():
                editor.frame()
                return editor.memory.report()
            time.sleep(0.01)
        raise AssertionError("no plan arrived")

    report = settle()
    assert report["nodes"] == {"7": "≈ 7.8 GB peak (memory plan)"}
    assert "predicted peak device memory: 7.8 GB (80x56, batch 4: 10x7 latents)" in report["inspector"]
    assert "  weights unet (bf16): 5.000 GB" in report["inspector"] and "note: a note" in report["inspector"]
    editor.memory.set_target("6GB")
    report = settle()
    assert asked == ["", "6GB"]
    assert report["nodes"]["7"] == "≈ 7.8 GB peak (memory plan); 6.0 GB: nf4 unet + block swap 2 -> 5.9 GB"
    assert "6.0 GB: nf4 unet + block swap 2 -> 5.9 GB" in report["inspector"]
    # another node in the inspector: the plan section hides; the node keeps its line
    editor.focus_node("6", quiet=True)
    editor.frame()
    assert editor.memory.report()["inspector"] == [] and not dpg.is_item_shown(editor.memory.group)
    assert editor.memory.report()["nodes"]["7"].startswith("≈ 7.8 GB peak")


def test_a_planner_error_is_shown_not_raised(editor, monkeypatch):
    from app.gui import memory_plan

    monkeypatch.setattr(memory_plan, "compute", lambda *a, **k: {"error": "TrainLoop (node 7): its buckets input is not linked"})
    monkeypatch.setattr(memory_plan, "SETTLE_S", 0.0)
    monkeypatch.setattr(memory_plan, "can_plan", lambda: True)
    memory_plan._CACHE.clear()
    assert editor.open_path(str(ROOT / "presets" / "tiny_demo.json"))
    editor.focus_node("7", quiet=True)
    for _ in range(200):
        editor.frame()
        if not editor.memory.busy():
            break
        time.sleep(0.01)
    editor.frame()
    report = editor.memory.report()
    assert report["nodes"] == {}
    assert report["inspector"] == ["memory plan: TrainLoop (node 7): its buckets input is not linked"]


needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None or shutil.which("xdotool") is None,
                                reason="Xvfb or xdotool is not installed (apt-get install xvfb xdotool)")


@needs_xvfb
def test_the_editor_shows_a_presets_plan_on_its_train_loop(display, tmp_path):
    state_file = tmp_path / "state.json"
    env = dict(os.environ, DISPLAY=display, NODETRAINER_CONFIG=str(tmp_path / "config"),
               NODETRAINER_GUI_DUMP=str(state_file), NODETRAINER_GUI_FOCUS="7")
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "gui", str(ROOT / "presets" / "tiny_demo.json")],
                            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, state, x = time.monotonic() + 420, {}, 0
        while time.monotonic() < deadline:
            # an idle editor draws on input only: a mouse move every second lets the arrived plan show
            x = 1 - x
            subprocess.run(["xdotool", "mousemove", str(1500 + 40 * x), "900"], env=env, check=False)
            time.sleep(1)
            try:
                state = json.loads(state_file.read_text())
            except (OSError, ValueError):
                continue
            shown = state.get("memory_plan") or {}
            if shown.get("nodes", {}).get("7") and shown.get("inspector"):
                break
        shown = state.get("memory_plan") or {}
        line = shown.get("nodes", {}).get("7", "")
        assert line.startswith("≈ ") and line.endswith(" MB peak (memory plan)"), shown
        assert any(t.startswith("predicted peak device memory: ") for t in shown["inspector"]), shown
        assert any(t.startswith("  weights unet (fp32): ") for t in shown["inspector"]), shown
        assert state["timing"]["max_work_ms"] < 500, state["timing"]  # the planner never ran on the UI thread
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_a_headless_editor_asks_for_no_plan(editor, monkeypatch):
    from app.gui import memory_plan

    calls = []
    monkeypatch.setattr(memory_plan, "compute", lambda *a, **k: calls.append(a) or {"plans": []})
    monkeypatch.setattr(memory_plan, "SETTLE_S", 0.0)
    memory_plan._CACHE.clear()
    assert editor.open_path(str(ROOT / "presets" / "tiny_demo.json"))
    for _ in range(5):
        editor.frame()
    time.sleep(0.1)
    assert calls == [] and editor.memory.busy()  # waiting, but for an editor on screen


def test_the_planner_subprocess_ends_with_the_editor(tmp_path):
    """A planner still running when the editor closes gets SIGTERM (Linux), not minutes more of CPU."""
    import os
    import subprocess
    import sys
    import time

    code = ("import subprocess, sys, threading, time\n"
            "from app.gui.memory_plan import _background\n"
            "def run():\n"
            "    p = subprocess.Popen(['sleep', '120'], preexec_fn=_background)\n"
            "    print(p.pid, flush=True)\n"
            "    p.wait()\n"
            "threading.Thread(target=run, daemon=True).start()\n"
            "time.sleep(1.0)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=120)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}") and "Z" not in _state(pid):
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}") or "Z" in _state(pid), "the planner outlived the editor"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"
