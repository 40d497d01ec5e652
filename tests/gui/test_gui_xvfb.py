"""The real editor in a subprocess on a virtual display (Xvfb): presets render, a mouse drag makes
a link, and a run from the editor draws its plots and previews. Skipped where Xvfb is missing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.gui.conftest import PREVIEW_NODES, RECIPES, ROOT

PRESETS = sorted((ROOT / "presets").glob("*.json"))
DEMO_NODES = len(json.loads((ROOT / "presets" / "tiny_demo.json").read_text())["nodes"])
TITLE_COLOURS = {(62, 72, 96), (190, 40, 40)}  # a node's title bar: idle, or with a problem
DONE_COLOURS = {(50, 130, 70), (40, 120, 120)}  # after a run: done, cached
SOCKET_RGB = {(180, 120, 255), (90, 200, 120), (70, 170, 220), (240, 170, 60), (230, 90, 90), (240, 220, 90)}

needs_xvfb = pytest.mark.skipif(shutil.which("Xvfb") is None,
                                reason="Xvfb is not installed (apt-get install xvfb xdotool); "
                                       "the GUI is covered headless by the other tests/gui tests")


def gui_env(display, tmp_path, **extra):
    env = dict(os.environ, DISPLAY=display, NODETRAINER_CONFIG=str(tmp_path / "config"),
               NODETRAINER_WORKSPACE=str(tmp_path / "workspace"), NODETRAINER_GUI_DUMP=str(tmp_path / "state.json"))
    env.update(extra)
    return env


def launch(args, env, timeout=90):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


def pixels(png):
    from PIL import Image

    img = Image.open(png).convert("RGB")
    return img, {rgb: n for n, rgb in img.getcolors(maxcolors=1 << 20)}


def assert_shows_nodes(png, n_nodes, titles=TITLE_COLOURS):
    img, counts = pixels(png)
    assert img.size == (1600, 1000)
    assert len(counts) > 50, "the screenshot is blank"
    title = sum(counts.get(c, 0) for c in titles)
    assert title > n_nodes * 800, f"node title bars missing ({title} px for {n_nodes} nodes)"
    assert sum(counts.get(c, 0) for c in SOCKET_RGB) > 40, "no coloured pins or links"


@needs_xvfb
@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_each_preset_opens_and_renders_its_nodes(display, tmp_path, preset):
    shot = tmp_path / "shot.png"
    r = launch(["gui", str(preset), "--screenshot", str(shot), "--frames", "4"], gui_env(display, tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    state = json.loads((tmp_path / "state.json").read_text())
    n = len(json.loads(preset.read_text())["nodes"])
    assert len(state["recipe"]["nodes"]) == n and not state["dirty"]
    assert len(state["canvas"]["on_screen"]) == n, "the recipe did not open fitted to the canvas"
    assert state["timing"]["first_frame_s"] < 20
    assert_shows_nodes(shot, n)


@needs_xvfb
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed (apt-get install xdotool)")
def test_a_mouse_drag_between_pins_makes_a_link_and_a_crash_leaves_an_autosave(display, tmp_path):
    recipe = json.loads((RECIPES / "stub_run.json").read_text())
    recipe["links"] = []
    path = tmp_path / "unlinked.json"
    path.write_text(json.dumps(recipe))
    env = gui_env(display, tmp_path)
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(ROOT / "tests/stub_nodes"),
                             "gui", str(path)], env=env, cwd=str(ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        pins = wait_for(state_file, lambda s: s["pins"] if {"1.out.out", "2.data.in"} <= set(s["pins"]) else None)
        (x0, y0), (x1, y1) = pins["1.out.out"], pins["2.data.in"]
        xdo = lambda *a: subprocess.run(["xdotool", *map(str, a)], env=env, check=True)  # noqa: E731
        xdo("mousemove", int(x0) - 1, int(y0))
        time.sleep(0.4)
        xdo("mousedown", 1)
        for i in range(1, 9):
            time.sleep(0.1)
            xdo("mousemove", int(x0 + (x1 - x0) * i / 8), int(y0 + (y1 - y0) * i / 8))
        time.sleep(0.4)
        xdo("mouseup", 1)
        xdo("mousemove", 1595, 995)
        state = wait_for(state_file, lambda s: s if s["recipe"]["links"] else None)
        assert [(l["from_node"], l["from_output"], l["to_node"], l["to_input"]) for l in state["recipe"]["links"]] \
            == [("1", "out", "2", "data")]
        assert state["dirty"]
        # a link dropped on empty canvas opens the search, filtered to nodes that take a DATASET;
        # Enter adds the first one, linked
        x2, y2 = state["pins"]["2.out.out"]
        xdo("mousemove", int(x2) + 1, int(y2))
        time.sleep(0.4)
        xdo("mousedown", 1)
        for i in range(1, 6):
            time.sleep(0.1)
            xdo("mousemove", int(x2) + 20 * i, int(y2) + 50 * i)  # into empty canvas (the view is fitted)
        time.sleep(0.4)
        xdo("mouseup", 1)
        search = wait_for(state_file, lambda s: s["search"] if s["search"]["shown"] else None)
        assert search["pin_type"] == "DATASET" and search["side"] == "out" and "TestAdd" in search["results"]
        time.sleep(0.3)
        xdo("key", "Return")
        state = wait_for(state_file, lambda s: s if len(s["recipe"]["nodes"]) == 3 else None)
        new = next(n for n in state["recipe"]["nodes"] if n not in ("1", "2"))
        assert state["recipe"]["nodes"][new]["type"] == search["results"][0]
        assert any(l["from_node"] == "2" and l["to_node"] == new for l in state["recipe"]["links"])
        autosaves = tmp_path / "config" / "autosave"
        def autosaved(_):
            for f in autosaves.glob("autosave-*.json"):
                if len(json.loads(json.loads(f.read_text())["recipe"])["nodes"]) == 3:
                    return f
        wait_for(None, autosaved, timeout=15)
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: the autosave stays behind
        proc.wait(timeout=10)
    saved = json.loads(next(autosaves.glob("autosave-*.json")).read_text())
    assert json.loads(saved["recipe"])["links"][0]["to_node"] == "2" and saved["path"] == str(path)
    assert len(json.loads(saved["recipe"])["nodes"]) == 3


def wait_for(state_file, pick, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(state_file.read_text()) if state_file else None
            got = pick(state)
            if got:
                return got
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting; last state: {state_file.read_text()[:2000] if state_file else ''}")


def shortened(preset, tmp_path):
    """A copy of a preset that trains for a few steps (the GUI test is about drawing the run, not
    about learning; tests/ml proves that), with its relative input paths made absolute."""
    data = json.loads(preset.read_text())
    for node in data["nodes"].values():
        params = node.setdefault("params", {})
        if node["type"] == "TrainLoop":
            params.update(epochs=1, max_steps=min(params.get("max_steps") or 6, 6))
        if node["type"] == "Sample":
            params["steps"] = min(params.get("steps", 2), 2)
        for name, value in params.items():
            if isinstance(value, str) and value and not value.startswith("builtin:") and not Path(value).is_absolute() \
                    and (preset.parent / value).exists():
                params[name] = str((preset.parent / value).resolve())
    out = tmp_path / preset.name
    out.write_text(json.dumps(data))
    return out


RUNS = [
    pytest.param(RECIPES / "stub_run.json", ["--nodes-dir", str(ROOT / "tests/stub_nodes")], "2", id="stub-TestSlow"),
    pytest.param(RECIPES / "preview_run.json", ["--nodes-dir", str(PREVIEW_NODES)], "3", id="preview-nodes"),
    pytest.param(ROOT / "presets" / "tiny_demo.json", [], "7", id="tiny_demo"),
]


@needs_xvfb
@pytest.mark.parametrize("recipe,extra,train_node", RUNS)
def test_a_run_from_the_editor_completes_with_live_training_plots(display, tmp_path, recipe, extra, train_node):
    if recipe.parent.name == "presets":
        recipe = shortened(recipe, tmp_path)
    shot = tmp_path / "run.png"
    env = gui_env(display, tmp_path, NODETRAINER_GUI_AUTORUN="1", NODETRAINER_GUI_TIMEOUT="300")
    r = launch([*extra, "gui", str(recipe), "--screenshot", str(shot), "--frames", "4"], env, timeout=360)
    assert r.returncode == 0, r.stderr[-3000:]
    state = json.loads((tmp_path / "state.json").read_text())
    run = state["run"]
    assert run["status"] == "done", (run, state["message"])
    assert all(n["status"] in ("done", "cached") for n in run["nodes"].values()), run
    metrics = run["nodes"][train_node]["metrics"]
    assert metrics.get("loss", 0) > 0, f"the training node drew no loss plot: {metrics}"
    timing = state["timing"]
    assert timing["run_frames"] > 0
    assert timing["max_run_work_ms"] < 1000, timing  # the render loop never waited on the worker
    assert_shows_nodes(shot, len(run["nodes"]), titles=DONE_COLOURS)


def play(display, tmp_path, steps, recipe=None, timeout=120):
    """Runs the editor with a menu script (app/gui/script.py) and returns its record per step."""
    env = gui_env(display, tmp_path, NODETRAINER_GUI_SCRIPT=";".join(steps))
    r = launch(["gui", *([str(recipe)] if recipe else [])], env, timeout=timeout)
    assert r.returncode == 0, f"the editor died (exit {r.returncode}):\n{r.stderr[-3000:]}"
    state = json.loads((tmp_path / "state.json").read_text())
    assert [s["step"] for s in state["script"]] == steps, state.get("message")
    return state["script"]


def inside(inner, outer, slack=1.0):
    return (inner[0] >= outer[0] - slack and inner[1] >= outer[1] - slack and inner[2] <= outer[2] + slack
            and inner[3] <= outer[3] + slack)


@needs_xvfb
def test_replacing_recipes_from_the_menus_never_crashes_and_the_canvas_holds_only_the_new_one(display, tmp_path):
    presets = ROOT / "presets"
    cycle = ["Presets/sd15_lora", "Presets/tiny_demo", "File/New", f"File/Open...={presets / 'sdxl_lora.json'}",
             "Presets/sd15_finetune", "Presets/sdxl_lora", f"File/Open...={presets / 'tiny_demo.json'}",
             "Presets/sd15_lora", "File/New", "File/New", "Presets/sdxl_lora"]
    steps = cycle + cycle[::-1]  # 22 replacements, each kind after each other kind
    records = play(display, tmp_path, steps, recipe=presets / "sd15_lora.json", timeout=180)
    for step, rec in zip(steps, records):
        name = step.rsplit("/", 1)[-1].removesuffix(".json")
        want = json.loads((presets / f"{name}.json").read_text()) if name != "New" else {"nodes": {}, "links": []}
        assert rec["recipe"] == sorted(want["nodes"]), step
        assert rec["nodes"] == rec["recipe"], (step, rec["nodes"])  # the canvas' own map
        assert rec["dpg_nodes"] == len(want["nodes"]) and rec["dpg_links"] == len(want["links"]), (step, rec)
        assert rec["on_screen"] == rec["nodes"], f"{step}: opened with nodes off screen"


@needs_xvfb
def test_the_tiny_demo_opens_fitted_and_zoom_keeps_groups_around_their_nodes(display, tmp_path):
    demo = ROOT / "presets" / "tiny_demo.json"
    steps = ["View/Actual size", "View/Zoom in", "View/Zoom out", "View/Zoom out", "View/Fit all", "File/Open..."]
    first, *records = play(display, tmp_path, ["View/Fit all", *steps], recipe=demo)
    assert len(first["on_screen"]) == DEMO_NODES and first["zoom"] < 1  # every node, smaller than 1:1
    zooms = [r["zoom"] for r in records]
    assert zooms[0] == 1.0 and zooms[1] > 1.0 and zooms[2] == 1.0 and zooms[3] < 1.0
    assert abs(zooms[4] - first["zoom"]) < 0.05 * first["zoom"] and len(records[4]["on_screen"]) == DEMO_NODES
    for rec in [first, *records[:5]]:
        assert rec["group_frames"], rec["step"]
        frame = rec["group_frames"][0]
        for nid in ("3", "4"):  # the Data group frames Concept and Bucketer at every zoom
            if inside(rec["node_rects"][nid], rec["canvas_rect"]):
                assert inside(rec["node_rects"][nid], frame, slack=2), (rec["step"], nid, frame)
        assert inside(frame, rec["canvas_rect"])  # clipped to the canvas: never over the side panels
    assert records[5]["group_frames"] == []  # a dialog is open: nothing drawn over it
    state = json.loads((tmp_path / "state.json").read_text())
    assert not state["dirty"] and state["recipe"]["ui"] == json.loads(demo.read_text())["ui"]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@needs_xvfb
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed (apt-get install xdotool)")
def test_the_idle_editor_sleeps_and_wakes_on_input(display, tmp_path):
    env = gui_env(display, tmp_path)
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "gui", str(ROOT / "presets" / "tiny_demo.json")],
                            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(state_file, lambda s: s["pins"])  # opened and fitted
        time.sleep(2)  # past the short awake time after the last input
        frames = json.loads(state_file.read_text())["timing"]["frames"]
        c0, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(5)
        cpu = (cpu_seconds(proc.pid) - c0) / (time.monotonic() - t0)
        assert cpu < 0.05, f"the idle editor used {cpu:.0%} of a core"
        assert json.loads(state_file.read_text())["timing"]["frames"] == frames  # drew nothing
        subprocess.run(["xdotool", "mousemove", "700", "500"], env=env, check=True)
        wait_for(state_file, lambda s: s["timing"]["frames"] > frames, timeout=5)  # woke on input
    finally:
        proc.kill()
        proc.wait(timeout=10)


@needs_xvfb
@pytest.mark.skipif(shutil.which("xdotool") is None, reason="xdotool is not installed (apt-get install xdotool)")
def test_wheel_and_keys_zoom_around_the_cursor_and_the_group_follows_a_pan(display, tmp_path):
    env = gui_env(display, tmp_path)
    state_file = tmp_path / "state.json"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "gui", str(ROOT / "presets" / "tiny_demo.json")],
                            env=env, cwd=str(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    xdo = lambda *a: subprocess.run(["xdotool", *map(str, a)], env=env, check=True)  # noqa: E731

    def canvas_after(action, done):
        """The canvas once the state dump shows the action's effect."""
        action()
        return wait_for(state_file, lambda s: s["canvas"] if s["pins"] and done(s["canvas"]) else None, timeout=10)

    def grid_under(c, screen):  # the grid point drawn at a screen position
        return [(screen[i] - c["origin"][i] - c["shift"][i]) / c["zoom"] for i in (0, 1)]

    try:
        start = wait_for(state_file, lambda s: s["canvas"] if s["pins"] else None)
        cursor = (520, 420)
        zoom_is = lambda z: lambda c: c["zoom"] == pytest.approx(z, rel=0.01)  # noqa: E731
        wheel = canvas_after(lambda: (xdo("mousemove", *cursor), time.sleep(0.3), xdo("click", 4), xdo("click", 4)),
                             zoom_is(start["zoom"] * 1.15 ** 2))
        assert wheel["zoom"] == pytest.approx(start["zoom"] * 1.15 ** 2, rel=0.01)
        assert grid_under(wheel, cursor) == pytest.approx(grid_under(start, cursor), abs=2)  # around the cursor
        out = canvas_after(lambda: (xdo("keydown", "ctrl"), time.sleep(0.3), xdo("key", "minus"), time.sleep(0.3),
                                    xdo("keyup", "ctrl")), zoom_is(wheel["zoom"] / 1.15))
        assert out["zoom"] == pytest.approx(wheel["zoom"] / 1.15, rel=0.01)
        back = canvas_after(lambda: (xdo("keydown", "ctrl"), time.sleep(0.3), xdo("key", "equal"), time.sleep(0.3),
                                     xdo("keyup", "ctrl")), zoom_is(wheel["zoom"]))
        assert back["zoom"] == pytest.approx(wheel["zoom"], rel=0.01)
        one = canvas_after(lambda: (xdo("keydown", "ctrl"), time.sleep(0.3), xdo("key", "0"), time.sleep(0.3),
                                    xdo("keyup", "ctrl")), zoom_is(1.0))
        assert one["zoom"] == 1.0 and len(one["on_screen"]) < DEMO_NODES
        fitted = canvas_after(lambda: xdo("key", "f"), lambda c: len(c["on_screen"]) == DEMO_NODES)
        time.sleep(1.5)
        fitted = wait_for(state_file, lambda s: s["canvas"])  # settled
        assert len(fitted["on_screen"]) == DEMO_NODES
        # pan with the middle button: the nodes and the Data group's frame move together
        def pan():
            xdo("mousemove", 300, 900)  # empty canvas below the Data group, whatever the layout
            xdo("mousedown", 2)
            for i in range(1, 11):
                time.sleep(0.1)
                xdo("mousemove", 300 + 12 * i, 900 - 15 * i)
            time.sleep(0.3)
            xdo("mouseup", 2)
        panned = canvas_after(pan, lambda c: c["node_rects"]["4"] != fitted["node_rects"]["4"])
        time.sleep(1.5)
        panned = wait_for(state_file, lambda s: s["canvas"])  # settled
        moved = [panned["node_rects"]["4"][i] - fitted["node_rects"]["4"][i] for i in (0, 1)]
        assert abs(moved[0]) > 50 and abs(moved[1]) > 50, "the middle button did not pan"
        group_moved = [panned["group_frames"][0][i + 2] - fitted["group_frames"][0][i + 2] for i in (0, 1)]
        assert group_moved == pytest.approx(moved, abs=2)  # the frame's far corner moved with the nodes
        assert inside(panned["node_rects"]["4"], panned["group_frames"][0], slack=2)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    state = json.loads(state_file.read_text())
    assert not state["dirty"]  # zoom and pan are view state
