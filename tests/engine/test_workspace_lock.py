"""One run per workspace at a time, and no temp debris: a second run into a busy workspace stops at
once naming the first; a lock left by a dead process is taken over; what a killed run left is
removed by the next run, which says how much space that freed."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def slow_graph(build, marker: Path, step_s=0.05, steps=400):
    return build(("1", "TestSlow", {"steps": steps, "step_s": step_s, "marker": str(marker)}))


def test_second_run_into_a_busy_workspace_stops_at_once(tmp_path, registry, build):
    from app.engine.executor import Executor

    ws = tmp_path / "ws"
    first = Executor(registry)
    results = {}
    marker = tmp_path / "running"
    t = threading.Thread(target=lambda: results.setdefault(
        "first", first.run(slow_graph(build, marker), workspace=ws, run_id="firstrun")))
    t.start()
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        lock = json.loads((ws / ".nodetrainer.lock").read_text())
        assert lock["pid"] == os.getpid() and lock["run_id"] == "firstrun" and lock["host"] and lock["started"]
        events = []
        t0 = time.monotonic()
        second = Executor(registry).run(build(("1", "TestConst", {"value": 1})), emit=events.append, workspace=ws)
        assert time.monotonic() - t0 < 2  # at once, not after the first run
        assert second.status == "error" and not second.executed
        assert f"in use by another run (pid {os.getpid()}" in second.error and "another --workspace" in second.error
        assert events[-1]["event"] == "run_done" and events[-1]["status"] == "error"
    finally:
        first.cancel()
        t.join(30)
    assert results["first"].status == "cancelled"
    assert not (ws / ".nodetrainer.lock").exists()
    # runs one after another (the editor's worker) keep working; the workspace is free by run_done
    ex = Executor(registry)
    for v in (1, 2):
        seen = []
        emit = lambda e: seen.append((e["event"], (ws / ".nodetrainer.lock").exists()))  # noqa: E731
        assert ex.run(build(("1", "TestConst", {"value": v})), emit=emit, workspace=ws).status == "done"
        assert ("node_done", True) in seen and seen[-1] == ("run_done", False)


def test_second_cli_run_names_the_first(tmp_path):
    """Two `launch.py run` processes: the second exits at once with the first one's pid and recipe."""
    stubs = ROOT / "tests" / "stub_nodes"
    recipe = tmp_path / "slow.json"
    marker = tmp_path / "ws" / ".nodetrainer.lock"  # the first run holds the workspace
    recipe.write_text(json.dumps({"format_version": 1, "meta": {"title": "Slow one"}, "nodes": {
        "1": {"type": "TestSlow", "version": 1, "params": {"steps": 2000, "step_s": 0.01}}},
        "links": []}))
    cmd = [sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(stubs), "run", str(recipe),
           "--workspace", str(tmp_path / "ws")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()
        second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
        assert second.returncode == 1, second.stderr
        assert "in use by another run (pid " in second.stderr and "running Slow one" in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, registry, build):
    from app.engine.executor import Executor

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ws = tmp_path / "ws"
    ws.mkdir()
    import socket

    (ws / ".nodetrainer.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(),
                                                      "started": "2026-01-01 00:00:00", "recipe": "old",
                                                      "run_id": "gone"}))
    events = []
    r = Executor(registry).run(build(("1", "TestConst", {"value": 1})), emit=events.append, workspace=ws)
    assert r.status == "done"
    notes = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]
    assert any(f"took over the workspace lock of run gone (pid {dead.pid}" in n for n in notes), notes
    assert not (ws / ".nodetrainer.lock").exists()


def _killed_during(tmp_path: Path, code: str) -> None:
    """Run ``code`` in a process that SIGKILLs itself where the code says ``die()``."""
    script = ("import os, signal, sys\nsys.path.insert(0, %r)\n"
              "def die():\n    os.kill(os.getpid(), signal.SIGKILL)\n" % str(ROOT)) + code
    p = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, timeout=120)
    assert p.returncode == -signal.SIGKILL


def test_kill9_during_save_and_backup_then_the_next_run_cleans_up(tmp_path, registry, build):
    from app.engine.executor import Executor

    ws = tmp_path / "ws"
    # a Save killed while writing its LoRA (a full-size temp copy beside the target)
    _killed_during(tmp_path, f"""
from app.atomic import atomic_file
with atomic_file({str(ws / 'my_lora.safetensors')!r}) as t:
    t.tmp.write_bytes(b"x" * 300_000)
    die()
""")
    # a backup killed half-way (a temp folder beside backups/step_*)
    _killed_during(tmp_path, f"""
from app.atomic import atomic_folder
with atomic_folder({str(ws / 'TrainLoop_7' / 'backups' / 'step_0000020')!r}, overwrite=True) as t:
    (t.tmp / "trainable.safetensors").write_bytes(b"y" * 200_000)
    die()
""")
    # temp names of older versions, a 0-byte PNG temp among them
    (ws / "Sample_2" / ".sample_000_1.png.abcd1234.tmp").parent.mkdir(parents=True)
    (ws / "Sample_2" / ".sample_000_1.png.abcd1234.tmp").write_bytes(b"")
    (ws / "TrainLoop_7" / "backups" / ".tmp_step_0000010_999").mkdir()
    (ws / "TrainLoop_7" / "backups" / ".tmp_step_0000010_999" / "state.pt").write_bytes(b"z" * 1000)
    # what is not ours stays: a user's file, and a symlink with our prefix pointing outside
    (ws / "notes.tmp").write_text("mine")
    outside = tmp_path / "precious.safetensors"
    outside.write_bytes(b"p" * 10)
    (ws / ".nodetrainer-tmp-link").symlink_to(outside)
    leftovers = sorted(str(p.relative_to(ws)) for p in ws.rglob("*") if p.name.startswith("."))
    assert any(n.endswith(".tmp") or ".nodetrainer-tmp-" in n for n in leftovers), leftovers

    events = []
    r = Executor(registry).run(build(("1", "TestConst", {"value": 1})), emit=events.append, workspace=ws)
    assert r.status == "done"
    notes = [e["message"] for e in events if e["event"] == "log"]
    assert any("removed 4 temporary file(s) left by an interrupted run" in n and "(501.0 KB freed)" in n
               for n in notes), notes
    left = sorted(str(p.relative_to(ws)) for p in ws.rglob("*"))
    assert left == [".nodetrainer-tmp-link", "Sample_2", "TrainLoop_7", "TrainLoop_7/backups", "notes.tmp"], left
    assert outside.read_bytes() == b"p" * 10


def test_a_cancelled_or_failed_write_leaves_no_temp_file(tmp_path):
    import pytest

    from app.atomic import atomic_file, atomic_folder

    for exc in (KeyboardInterrupt, ValueError):
        with pytest.raises(exc):
            with atomic_file(tmp_path / "a.png") as t:
                t.tmp.write_bytes(b"1")
                raise exc()
        with pytest.raises(exc):
            with atomic_folder(tmp_path / "b") as t:
                (t.tmp / "x").write_bytes(b"1")
                raise exc()
    assert list(tmp_path.iterdir()) == []
    with atomic_file(tmp_path / "c.png") as t:
        assert t.tmp.name.startswith(".nodetrainer-tmp-c.png.")
