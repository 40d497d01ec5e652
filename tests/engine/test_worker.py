"""The worker process: runs, keeps its cache between runs, cancels, and survives crashes of its own."""

import time

import pytest

from app.engine.client import WorkerClient
from app.graph.recipe import to_data
from tests.conftest import STUBS


@pytest.fixture
def worker():
    client = WorkerClient(nodes_dirs=[STUBS])
    client.start()
    yield client
    client.shutdown()
    client.kill()


def run(client, graph, **kw):
    events = []
    run_id = client.run(to_data(graph), **kw)
    done = client.wait_run(run_id, on_event=events.append, timeout=60)
    return done, events


def nodes_with(events, kind):
    return [e["node"] for e in events if e["event"] == kind]


def test_worker_runs_and_keeps_its_cache_between_runs(worker, build):
    g = build(("1", "TestConst", {"value": 2}), ("2", "TestAdd", {"bias": 1}), links=[("1", "out", "2", "items")])
    done, ev = run(worker, g)
    assert done["status"] == "done" and nodes_with(ev, "node_start") == ["1", "2"]
    done, ev = run(worker, g)
    assert nodes_with(ev, "node_cached") == ["1", "2"] and nodes_with(ev, "node_start") == []
    g.set_param("2", "bias", 5)
    done, ev = run(worker, g)
    assert nodes_with(ev, "node_cached") == ["1"] and nodes_with(ev, "node_start") == ["2"]


def test_invalid_recipe_is_reported_not_run(worker, build):
    g = build(("1", "TestAdd", {"bias": 5000}))
    done, ev = run(worker, g)
    assert done["status"] == "invalid"
    msgs = [p["message"] for p in done["problems"]]
    assert any("above the maximum" in m for m in msgs) and any("not connected" in m for m in msgs)


def test_cancel_stops_a_running_node(worker, build, tmp_path):
    marker = tmp_path / "running"
    g = build(("1", "TestSlow", {"steps": 100000, "step_s": 0.001, "marker": str(marker)}))
    run_id = worker.run(to_data(g))
    deadline = time.monotonic() + 30
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    worker.cancel()
    done = worker.wait_run(run_id, timeout=30)
    assert done["status"] == "cancelled"
    done, _ = run(worker, build(("1", "TestConst", {})))
    assert done["status"] == "done"  # the same worker goes on


def test_python_error_does_not_end_the_worker(worker, build):
    pid = worker.proc.pid
    done, ev = run(worker, build(("1", "TestFail", {"message": "nope"})))
    assert done["status"] == "error" and [e["message"] for e in ev if e["event"] == "node_error"] == ["nope"]
    assert worker.alive and worker.proc.pid == pid


@pytest.mark.parametrize("how,expect", [("exit", "exit code 3"), ("segfault", "SIGSEGV"), ("kill", "SIGKILL")])
def test_crash_is_reported_on_the_node_and_a_fresh_worker_starts(worker, build, how, expect):
    g = build(("1", "TestConst", {}), ("2", "TestCrash", {"how": how}), links=[("1", "out", "2", "data")])
    done, ev = run(worker, g)
    assert done["status"] == "error"
    errors = [e for e in ev if e["event"] == "node_error"]
    assert [e["node"] for e in errors] == ["2"] and expect in errors[0]["message"]
    died = [e for e in ev if e["event"] == "worker_died"]
    assert died and died[0]["node"] == "2"
    assert not worker.alive
    worker.restart()
    done, ev = run(worker, build(("1", "TestConst", {"value": 9}), ("2", "TestAdd", {}),
                                 links=[("1", "out", "2", "items")]))
    assert done["status"] == "done"


def test_events_stream_progress_and_metrics(worker, build):
    done, ev = run(worker, build(("1", "TestSlow", {"steps": 5, "step_s": 0.0})))
    assert [e["value"] for e in ev if e["event"] == "progress"][-1] == 5
    assert any(e["event"] == "metric" and "loss" in e["values"] for e in ev)
    assert all("run_id" in e and "t" in e for e in ev)


def test_shutdown_is_clean(build):
    client = WorkerClient(nodes_dirs=[STUBS])
    client.start()
    client.shutdown()
    assert client.proc.returncode == 0
    assert not [e for e in client.poll() if e["event"] == "worker_died"]


def test_one_shot_worker_caches_nothing_and_lets_the_last_reader_own_its_input(worker, build):
    g = build(("1", "TestConst", {"value": 2}), ("2", "TestOwn", {}), links=[("1", "out", "2", "data")])
    one_shot = WorkerClient(nodes_dirs=[STUBS], one_shot=True)
    one_shot.start()
    try:
        for client, exclusive, cached in ((one_shot, True, []), (worker, False, ["1", "2"])):
            done, ev = run(client, g)
            logs = [e["message"] for e in ev if e["event"] == "log" and e["node"] == "2"]
            assert done["status"] == "done" and f"exclusive={exclusive}" in logs, logs
            done, ev = run(client, g)  # a second run: the editor's worker has it all cached
            assert done["status"] == "done" and nodes_with(ev, "node_cached") == cached
    finally:
        one_shot.shutdown()
        one_shot.kill()
