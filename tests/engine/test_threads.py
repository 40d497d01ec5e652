"""One thread policy for every way a recipe runs: never more torch threads than free cores."""

import json
import os
import subprocess
import sys

import pytest

from app.engine import threads
from tests.conftest import ROOT

PROBE = '''
from app.graph.spec import node

@node(type="ThreadProbe", category="test", description="Logs torch's thread count.", inputs=[], outputs=[])
def probe(ctx):
    import torch
    ctx.log(f"threads={torch.get_num_threads()}")
'''


def test_free_cores_minus_load_and_reserve():
    assert threads.thread_count(environ={}, cores=8, load=0.2)[0] == 8
    assert threads.thread_count(environ={}, cores=8, load=2.6)[0] == 5
    assert threads.thread_count(environ={}, cores=2, load=1.2)[0] == 1
    assert threads.thread_count(environ={}, cores=2, load=7.0)[0] == 1  # at least one
    assert threads.thread_count(environ={}, cores=4, load=0.0, reserve=1)[0] == 3  # the editor keeps one
    assert threads.thread_count(environ={"LOCAL_WORLD_SIZE": "2"}, cores=8, load=0.0)[0] == 4


def test_explicit_settings_win_and_bad_ones_are_explained():
    assert threads.thread_count(environ={"OMP_NUM_THREADS": "3"}, cores=2, load=5.0) == (3, "OMP_NUM_THREADS=3")
    env = {"NODETRAINER_THREADS": "2", "OMP_NUM_THREADS": "5"}
    assert threads.thread_count(environ=env, cores=8, load=0.0)[0] == 2
    with pytest.raises(ValueError, match="NODETRAINER_THREADS='many'"):
        threads.thread_count(environ={"NODETRAINER_THREADS": "many"})


def _probe_run(tmp_path, *extra, **env_extra):
    plugins = tmp_path / "plugins"
    plugins.mkdir(exist_ok=True)
    (plugins / "probe.py").write_text(PROBE)
    recipe = tmp_path / "probe.json"
    recipe.write_text(json.dumps({"format_version": 1, "nodes": {"1": {"type": "ThreadProbe", "version": 1}},
                                  "links": []}))
    env = {k: v for k, v in os.environ.items() if k not in threads.OVERRIDE_VARS}
    env.update(env_extra)
    events = tmp_path / "events.jsonl"
    out = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--nodes-dir", str(plugins), "run", str(recipe),
                          "--events", str(events), "--workspace", str(tmp_path / "ws"), *extra],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    logs = [json.loads(line)["message"] for line in events.read_text().splitlines()
            if json.loads(line).get("event") == "log"]
    return int(next(m for m in logs if m.startswith("threads=")).split("=")[1]), out.stderr


@pytest.mark.parametrize("worker", [False, True], ids=["in-process", "worker"])
def test_cli_runs_use_the_policy(tmp_path, worker):
    """torch alone would take one thread per core; the policy's override takes one."""
    n, _ = _probe_run(tmp_path, *(["--worker"] if worker else []), NODETRAINER_THREADS="1")
    assert n == 1
    n, err = _probe_run(tmp_path, "-v", *(["--worker"] if worker else []))
    assert 1 <= n <= threads.available_cores()
    assert "CPU thread(s)" in err


def test_editor_worker_keeps_a_core_for_the_editor():
    from app.engine.client import WorkerClient

    env = {k: v for k, v in os.environ.items() if k not in threads.OVERRIDE_VARS}
    client = WorkerClient(env=env)
    try:
        ready = client.start()
    finally:
        client.shutdown()
    assert "1 kept for the editor" in ready["threads_why"]
    assert 1 <= ready["threads"] <= max(1, threads.available_cores() - 1)
