"""The run queue survives its runner: a runner killed with SIGKILL leaves its entry 'interrupted',
and one action queues it again from its newest backup, which the next runner finishes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from app.cli import main
from app.engine.queue import QueueError, RunQueue
from tests.conftest import ROOT
from tests.experiments_recipe import events, tiny_recipe


def test_queue_add_list_move_cancel_persist(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    qfile = tmp_path / "q" / "queue.json"
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--workspace", str(tmp_path / "a")]) == 0
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--workspace", str(tmp_path / "sw"),
                 "--sweep", "LoRAInject.rank=2,4"]) == 0
    q = RunQueue(qfile)  # a new reader: everything came from the file
    entries = q.entries()
    assert [e["state"] for e in entries] == ["queued"] * 3
    assert [os.path.basename(e["workspace"]) for e in entries] == ["a", "rank=2", "rank=4"]
    assert entries[2]["recipe"]["nodes"]["5"]["params"]["rank"] == 4  # the snapshot holds the override
    assert main(["queue", "--file", str(qfile), "move", "3", "1"]) == 0
    assert main(["queue", "--file", str(qfile), "cancel", "1"]) == 0
    assert [(e["id"], e["state"]) for e in RunQueue(qfile).entries()] == [(3, "queued"), (1, "cancelled"), (2,
                                                                                                            "queued")]
    capsys.readouterr()
    assert main(["queue", "--file", str(qfile), "list"]) == 0
    out = capsys.readouterr().out
    assert "cancelled" in out and "rank=4" in out
    # the same workspace twice while waiting: the second gets its own
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--workspace",
                 str(tmp_path / "sw" / "rank=2")]) == 0
    assert RunQueue(qfile).entries()[-1]["workspace"].endswith("rank=2-2")
    with pytest.raises(QueueError, match="no entry 99"):
        q.cancel(99)
    # an invalid recipe is refused: nothing queued
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--set", "LoRAInject.rank=0"]) == 2
    assert len(RunQueue(qfile).entries()) == 4


def test_killed_runner_leaves_interrupted_entry_that_resumes_from_its_backup(tmp_path):
    recipe = tiny_recipe(tmp_path, trainloop={"max_steps": 400, "backup_every": 2, "backup_unit": "steps"})
    qfile, ws = tmp_path / "queue.json", tmp_path / "ws"
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--workspace", str(ws)]) == 0
    runner = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "queue", "--file", str(qfile), "run"],
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while not list(ws.glob("TrainLoop_7/backups/*/backup.json")):
            assert runner.poll() is None, runner.communicate()[1]
            assert time.monotonic() < deadline, "no backup was written"
            time.sleep(0.05)
        entry = RunQueue(qfile).get(1)
        assert entry["state"] == "running" and entry["pid"] == runner.pid
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=30)
    finally:
        if runner.poll() is None:
            runner.kill()
    q = RunQueue(qfile)
    entry = q.get(1)
    assert entry["state"] == "interrupted", entry
    assert "queue resume 1" in entry["message"]
    # one action: queued again, first, from the newest backup
    assert main(["queue", "--file", str(qfile), "resume", "1"]) == 0
    entry = q.get(1)
    assert entry["state"] == "queued"
    backup = entry["recipe"]["nodes"]["7"]["params"]["resume_from"]
    assert backup.startswith(str(ws)) and (os.path.isfile(os.path.join(backup, "backup.json")))
    step = json.loads(open(os.path.join(backup, "backup.json")).read())["step"]
    # finish it quickly: the snapshot is what runs, so shorten it there
    q.update(1, recipe={**entry["recipe"], "nodes": {**entry["recipe"]["nodes"], "7": {
        **entry["recipe"]["nodes"]["7"], "params": {**entry["recipe"]["nodes"]["7"]["params"],
                                                    "max_steps": step + 2}}}})
    assert main(["queue", "--file", str(qfile), "run"]) == 0
    entry = q.get(1)
    assert (entry["state"], entry["exit_code"]) == ("done", 0), entry
    assert isinstance(entry["last_loss"], float)
    assert (entry["step"], entry["total"]) == (step + 2, step + 2)  # training steps (not the samples' count)
    assert json.loads((ws / "recipe.json").read_text())["nodes"]["7"]["params"]["resume_from"] == backup
    steps = [e["values"]["step"] for e in events(ws / "events.jsonl")
             if e["event"] == "metric" and "loss" in e.get("values", {})]
    assert steps[-2:] == [step + 1, step + 2]  # the resumed run went on from the backup's step


def test_queued_sweep_runs_share_upstream_work_in_one_runner(tmp_path):
    recipe = tiny_recipe(tmp_path)
    qfile, ws = tmp_path / "queue.json", tmp_path / "ws"
    assert main(["queue", "--file", str(qfile), "add", str(recipe), "--workspace", str(ws),
                 "--sweep", "LoRAInject.rank=2,4"]) == 0
    assert main(["queue", "--file", str(qfile), "run"]) == 0
    assert [e["state"] for e in RunQueue(qfile).entries()] == ["done", "done"]
    first, second = events(ws / "rank=2" / "events.jsonl"), events(ws / "rank=4" / "events.jsonl")
    assert {e["type"] for e in first if e["event"] == "node_cached"} == set()
    assert {e["type"] for e in second if e["event"] == "node_cached"} >= {"LoadModel", "Concept", "Bucketer",
                                                                          "Optimizer"}
    assert json.loads((ws / "rank=4" / "recipe.json").read_text())["nodes"]["5"]["params"]["rank"] == 4
