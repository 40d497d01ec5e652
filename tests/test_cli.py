"""launch.py as a user runs it: exit codes, messages, events file, overrides, targets, Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, STUBS

MISSION = ["LoadModel", "Concept", "Augment", "Bucketer", "LoRAInject", "Optimizer", "TrainLoop", "Sample", "Save"]


def cli(*args, stubs=True, timeout=120, **kw):
    base = [sys.executable, str(ROOT / "launch.py")] + (["--nodes-dir", str(STUBS)] if stubs else [])
    return subprocess.run(base + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def recipe(tmp_path, nodes, links=(), name="r.json"):
    data = {"format_version": 1,
            "nodes": {nid: {"type": t, "version": 1, "params": p} for nid, t, p in nodes},
            "links": [{"id": i + 1, "from_node": a, "from_output": b, "to_node": c, "to_input": d}
                      for i, (a, b, c, d) in enumerate(links)]}
    path = tmp_path / name
    path.write_text(json.dumps(data, indent=2))
    return path


def test_help():
    out = cli("--help", stubs=False)
    assert out.returncode == 0 and "validate" in out.stdout and "run" in out.stdout


def test_nodes_lists_the_catalogue_as_text_and_json():
    text = cli("nodes", stubs=False)
    assert text.returncode == 0
    for t in MISSION:
        assert f"(type {t}," in text.stdout
    data = json.loads(cli("nodes", "--json", stubs=False).stdout)
    by_type = {d["type"]: d for d in data}
    assert set(MISSION) <= set(by_type)
    rank = next(i for i in by_type["LoRAInject"]["inputs"] if i["name"] == "rank")
    assert rank["type"] == "INT" and rank["default"] == 16 and rank["min"] == 1 and rank["tooltip"]
    algo = next(i for i in by_type["LoRAInject"]["inputs"] if i["name"] == "algorithm")
    assert algo["choices"] == ["lora", "locon", "loha", "lokr", "dora"]
    assert by_type["TrainLoop"]["outputs"][0] == {"name": "model", "type": "MODEL", "tooltip": "the trained model"}
    assert {i["name"]: i["kind"] for i in by_type["TrainLoop"]["inputs"]}["buckets"] == "socket"


def test_validate_valid_preset():
    out = cli("validate", ROOT / "presets" / "tiny_demo.json", stubs=False)
    assert out.returncode == 0 and "valid" in out.stdout


def test_validate_prints_every_problem_naming_nodes(tmp_path):
    path = recipe(tmp_path, [("1", "TestConst", {"value": 5000}), ("2", "TestAdd", {}),
                             ("3", "Nope", {}), ("4", "TestFlag", {"mode": "zz"})])
    out = cli("validate", path)
    assert out.returncode == 2
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5
    assert lines[0].startswith("node 1 (TestConst): param 'value'")
    assert any(l.startswith("node 2 (TestAdd): required input") for l in lines)
    assert any(l.startswith("node 3 (Nope): unknown node type") for l in lines)
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content,expect", [
    ("", "the file is empty"), ("{not json", "not valid JSON"), ('{"a": 1}', "not a NodeTrainer recipe"),
    ('{"format_version": 7, "nodes": {}}', "newer NodeTrainer"), ("\x89PNG\r\n", "not valid JSON"),
])
def test_validate_malformed_files_get_one_clear_line(tmp_path, content, expect):
    path = tmp_path / "bad.json"
    path.write_text(content)
    out = cli("validate", path)
    assert out.returncode == 2
    assert expect in out.stderr and len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_validate_missing_file(tmp_path):
    out = cli("validate", tmp_path / "nope.json")
    assert out.returncode == 2 and "no such file" in out.stderr


def test_run_done_with_events_file(tmp_path):
    target = tmp_path / "out.txt"
    path = recipe(tmp_path, [("1", "TestConst", {"value": 3}), ("2", "TestSlow", {"steps": 3, "step_s": 0}),
                             ("3", "TestWrite", {"path": "out.txt"})],
                  [("1", "out", "3", "data")])
    events = tmp_path / "ev.jsonl"
    out = cli("run", path, "--events", events, "--workspace", tmp_path / "ws")
    assert out.returncode == 0, out.stderr
    assert target.read_text() == "3\n"  # relative to the recipe
    ev = [json.loads(l) for l in events.read_text().splitlines()]
    assert ev[0]["event"] == "run_start" and ev[-1]["event"] == "run_done" and ev[-1]["status"] == "done"
    assert {"node_start", "node_done", "progress", "metric"} <= {e["event"] for e in ev}
    assert "[1/3] TestConst (node 1)" in out.stderr and "Finished" in out.stderr


def test_run_set_and_target(tmp_path):
    out_file = tmp_path / "o.txt"
    path = recipe(tmp_path, [("1", "TestConst", {"value": 3}), ("2", "TestWrite", {"path": str(out_file)}),
                             ("3", "TestFail", {})], [("1", "out", "2", "data")])
    out = cli("run", path, "--set", "1.value=42", "--target", "2")
    assert out.returncode == 0, out.stderr
    assert out_file.read_text() == "42\n"
    bad = cli("run", path, "--set", "1.value=abc", "--target", "2")
    assert bad.returncode == 2 and "--set 1.value: 'abc' is not a whole number" in bad.stderr
    bad = cli("run", path, "--set", "testconst.value=1")
    assert bad.returncode == 2 and "did you mean TestConst (node 1)?" in bad.stderr and "2 (TestWrite)" in bad.stderr
    bad = cli("run", path, "--set", "1.nope=1")
    assert bad.returncode == 2 and "has no param 'nope'" in bad.stderr
    bad = cli("run", path, "--set", "1.value=5000")
    assert bad.returncode == 2 and "above the maximum" in bad.stderr
    bad = cli("run", path, "--target", "77")
    assert bad.returncode == 2 and "no node '77'" in bad.stderr


def test_run_failed_node_exits_1_naming_it(tmp_path):
    path = recipe(tmp_path, [("1", "TestConst", {}), ("2", "TestFail", {"message": "cannot read x.png"})],
                  [("1", "out", "2", "data")])
    events = tmp_path / "ev.jsonl"
    out = cli("run", path, "--events", events)
    assert out.returncode == 1
    assert "ERROR in TestFail (node 2): cannot read x.png" in out.stderr
    err = [json.loads(l) for l in events.read_text().splitlines() if '"node_error"' in l][0]
    assert "Traceback" in err["traceback"]


def test_run_invalid_exits_2_without_running(tmp_path):
    marker = tmp_path / "o.txt"
    path = recipe(tmp_path, [("1", "TestConst", {}), ("2", "TestWrite", {"path": str(marker)}), ("3", "TestAdd", {})],
                  [("1", "out", "2", "data")])
    out = cli("run", path)
    assert out.returncode == 2 and "node 3 (TestAdd)" in out.stderr and not marker.exists()


def test_run_unimplemented_builtin_says_so(tmp_path):
    path = recipe(tmp_path, [("1", "TestPending", {})])
    out = cli("run", path)
    assert out.returncode == 1 and "not implemented yet" in out.stderr


@pytest.mark.parametrize("worker", [False, True])
def test_ctrl_c_stops_at_the_next_check_and_exits_130(tmp_path, worker):
    marker = tmp_path / "running"
    path = recipe(tmp_path, [("1", "TestSlow", {"steps": 100000, "step_s": 0.001, "marker": str(marker)})])
    args = [sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(STUBS), "run", str(path)]
    proc = subprocess.Popen(args + (["--worker"] if worker else []), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Stopping at the next check" in err and "Stopped by the user" in err


def test_run_through_the_worker(tmp_path):
    out_file = tmp_path / "o.txt"
    path = recipe(tmp_path, [("1", "TestConst", {"value": 8}), ("2", "TestWrite", {"path": str(out_file)})],
                  [("1", "out", "2", "data")])
    out = cli("run", path, "--worker")
    assert out.returncode == 0, out.stderr
    assert out_file.read_text() == "8\n"


def test_editor_without_a_display_explains_instead_of_aborting():
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "gui"], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 2 and "needs a display" in out.stderr
