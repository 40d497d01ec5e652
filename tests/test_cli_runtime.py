"""The demo run from the command line as a user stops it: Ctrl-C within seconds at any point (model
loading, the "before" samples, training), the command that resumes, and a clear line when a node
kills the process."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

DEMO = ROOT / "presets" / "tiny_demo.json"
TINY = ["--set", "LoadModel.source=builtin:tiny-sd"]  # whatever base the demo ships with: the smallest
BOUND_S = 15.0  # generous: the machine may be busy with other work


def _events(path):
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            pass
    return out


def interrupt_when(tmp_path, ready, *extra, timeout=300):
    """Run the demo, send SIGINT once ``ready(events)`` holds; (seconds from SIGINT to exit, rc, stderr)."""
    events = tmp_path / "events.jsonl"
    cmd = [sys.executable, str(ROOT / "launch.py"), "run", str(DEMO), "--events", str(events),
           "--workspace", str(tmp_path / "ws"), *TINY, *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready(_events(events)):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    latency = time.monotonic() - t0
    print(f"SIGINT to exit: {latency:.1f} s")
    return latency, proc.returncode, err


def started(node):
    return lambda evs: any(e.get("event") == "node_start" and e.get("node") == node for e in evs)


# long samples (each one far longer than the bound) so that only a check between sampler steps is in time
LONG_SAMPLES = {"1": [], "2": ["--set", "Sample before.steps=500", "--set", "Sample before.width=192",
                                "--set", "Sample before.height=192"],
                "7": ["--set", "TrainLoop.sample_steps=200", "--set", "Bucketer.resolution=192"]}


@pytest.mark.parametrize("node", ["1", "2", "7"], ids=["LoadModel", "Sample-before", "TrainLoop-start"])
def test_ctrl_c_stops_within_seconds(tmp_path, node):
    """At LoadModel (imports and components), in the "before" Sample node, and as TrainLoop starts
    (its own "before" samples run first)."""
    latency, rc, err = interrupt_when(tmp_path, started(node), *LONG_SAMPLES[node])
    assert rc == 130, err
    assert latency < BOUND_S, f"{latency:.1f} s from SIGINT to exit"
    assert "Stopped by the user" in err


def test_ctrl_c_in_training_prints_the_command_that_resumes(tmp_path):
    def training(evs):
        return any(e.get("event") == "metric" and e.get("node") == "7" and "loss" in e.get("values", {}) for e in evs)

    latency, rc, err = interrupt_when(tmp_path, training, "--set", "TrainLoop.epochs=3")
    assert rc == 130, err
    assert latency < BOUND_S, f"{latency:.1f} s from SIGINT to exit"
    line = next(l for l in err.splitlines() if l.startswith("To resume: "))
    command = shlex.split(line[len("To resume: "):])
    assert command[-2] == "--set" and command[-1].startswith("TrainLoop.resume_from=")
    backup = command[-1].split("=", 1)[1]
    assert os.path.isfile(os.path.join(backup, "backup.json"))
    assert "TrainLoop.epochs=3" in command  # the user's own settings come along
    # the printed command runs as it is and continues from the backup
    if command[0] == "python":
        command[0] = sys.executable
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert f"resumed from {backup}" in out.stderr


def test_demo_says_its_leftovers_once_and_its_lora_names_the_trained_resolution(tmp_path):
    from safetensors import safe_open

    events = tmp_path / "events.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "run", str(DEMO), "--target", "Save",
                          "--set", "TrainLoop.epochs=1", "--set", "TrainLoop.sample_prompts=", *TINY,
                          "--set", "Bucketer.batch_size=5",  # 24 images: 4 left over, 1 repeated
                          "--events", str(events), "--workspace", str(tmp_path / "ws")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    logs = [e for e in _events(events) if e.get("event") == "log"]
    repeated = [e for e in logs if "repeated to fill batches" in e.get("message", "")]
    assert len(repeated) == 1, [(e["node"], e["message"][:60]) for e in repeated]
    assert out.stderr.count("repeated to fill batches") == 1
    lora = next((tmp_path / "ws").rglob("*.safetensors"))
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.resolution"] == "64x64"  # the demo trains at 64 px, not SD 1.5's 512
    assert meta["ss_resolution"] == "(64, 64)"


CRASH = '''
import ctypes
import os
import signal

from app.graph.spec import Enum, node

@node(type="Crash", category="test", description="Dies in native code.",
      inputs=[Enum("how", ["segfault", "signal", "abort"])], outputs=[])
def crash(ctx, how):
    ctx.log("about to crash")
    if how == "segfault":
        ctypes.string_at(0)
    elif how == "abort":
        os.abort()
    else:
        os.kill(os.getpid(), signal.SIGSEGV)
'''


@pytest.mark.parametrize("how,sig", [("segfault", "SIGSEGV"), ("signal", "SIGSEGV"), ("abort", "SIGABRT")])
def test_a_node_that_kills_the_process_is_named_and_exits_1(tmp_path, how, sig):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "crash.py").write_text(CRASH)
    recipe = tmp_path / "crash.json"
    recipe.write_text(json.dumps({"format_version": 1, "links": [], "nodes": {
        "3": {"type": "Crash", "version": 1, "title": "Native call", "params": {"how": how}}}}))
    events = tmp_path / "events.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(plugins), "run", str(recipe),
                          "--events", str(events), "--workspace", str(tmp_path / "ws")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, (out.returncode, out.stderr)
    assert f"ERROR in Native call (node 3, Crash): the process was killed by signal {sig} while running this node" \
        in out.stderr
    assert "crash.py" in out.stderr  # faulthandler's traceback shows the node function
    evs = _events(events)
    assert [e["node"] for e in evs if e["event"] == "node_error"] == ["3"]
    assert evs[-1]["event"] == "run_done" and evs[-1]["status"] == "error"


def test_ctrl_c_typed_at_a_terminal_is_one_stop(tmp_path):
    """The terminal signals its whole foreground process group: the run's process must see one Ctrl-C
    (a cooperative stop), not a second one passed on by the command's own process."""
    import pty
    import select

    from tests.conftest import STUBS

    marker = tmp_path / "running"
    recipe = tmp_path / "slow.json"
    recipe.write_text(json.dumps({"format_version": 1, "links": [], "nodes": {"1": {
        "type": "TestSlow", "version": 1, "params": {"steps": 100000, "step_s": 0.001, "marker": str(marker)}}}}))
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(STUBS), "run",
                                  str(recipe), "--workspace", str(tmp_path / "ws")])
    out, sent, deadline = b"", False, time.monotonic() + 120
    while time.monotonic() < deadline:
        if not sent and marker.exists():
            os.write(fd, b"\x03")  # Ctrl-C, as typed
            sent = True
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert sent and os.waitstatus_to_exitcode(status) == 130, text
    assert "Stopped by the user" in text and "Interrupted" not in text
