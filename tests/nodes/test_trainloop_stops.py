"""TrainLoop never loses finished training to a stop, and refuses a wrong resume_from before it samples."""

import json

import nodes.training as training
from app.engine.errors import Cancelled
from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from tests.nodes.test_training_nodes import DEMO, lora_recipe


def _run(data, tmp_path):
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    events = []
    status = Executor(reg).run(graph, emit=events.append, workspace=tmp_path / "ws").status
    return status, events


def test_a_stop_during_the_after_samples_keeps_the_trained_lora(tmp_path, monkeypatch):
    calls = []
    real = training._sample_during_training

    def sample(ctx, *args):
        calls.append(args[-2])  # the step
        if len(calls) == 2:  # "before" went through; "after" is stopped as it starts
            raise Cancelled("stopped by the user")
        return real(ctx, *args)

    monkeypatch.setattr(training, "_sample_during_training", sample)
    data = lora_recipe(DEMO, {"max_steps": 3, "sample_prompts": "red circle", "sample_steps": 2}, save=None)
    status, events = _run(data, tmp_path)
    assert status == "cancelled"
    assert calls == [0, 3]
    saved = list((tmp_path / "ws").rglob("saves/step_0000003.safetensors"))
    assert len(saved) == 1, [e.get("message") for e in events if e["event"] == "log"]
    assert any(e["event"] == "log" and str(saved[0]) in e["message"] for e in events)


def test_a_wrong_resume_from_is_refused_before_any_sample(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(training, "_sample_during_training", lambda *a: calls.append(a))
    not_a_backup = tmp_path / "lora.safetensors"
    not_a_backup.write_bytes(b"\0" * 16)
    data = lora_recipe(DEMO, {"max_steps": 3, "sample_prompts": "red circle", "resume_from": str(not_a_backup)},
                       save=None)
    status, events = _run(data, tmp_path)
    assert status == "error"
    errors = [e["message"] for e in events if e["event"] == "node_error"]
    assert errors and str(not_a_backup) in errors[0] and "backup.json" in errors[0], errors
    assert calls == []  # refused before the "before" samples
