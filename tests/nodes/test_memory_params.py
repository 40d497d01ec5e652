"""TrainLoop's memory params through the real executor: block swap, activation offload and the fused
backward pass reach the loop, the run reports its peak memory, and impossible settings are refused
naming the node and the numbers."""

import json

from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from tests.nodes.test_training_nodes import DEMO, lora_recipe


def run(tmp_path, train, adapter=True, optimizer=None):
    reg = load_registry(include_user=False)
    data = lora_recipe(DEMO, {"max_steps": 2, **train}, save=None, adapter=adapter, optimizer=optimizer)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    events = []
    result = Executor(reg).run(graph, emit=events.append, workspace=tmp_path)
    logs = [e["message"] for e in events if e["event"] == "log" and e["node"] == "6"]
    return result, logs


def test_the_params_are_declared_with_kohyas_names():
    spec = load_registry(include_user=False).get("TrainLoop")
    params = {p.name: p for p in spec.inputs}
    assert params["blocks_to_swap"].default == 0
    assert params["offload_activations"].default is False and params["fused_backward"].default is False


def test_swap_and_offload_train_and_the_peak_is_reported(tmp_path):
    result, logs = run(tmp_path, {"blocks_to_swap": 2, "offload_activations": True, "gradient_checkpointing": True})
    assert result.status == "done", result.error
    out = result.outputs["6"]["run"]
    assert out["steps"] == 2 and out["peak_bytes"] > 0
    assert any(m.startswith("block swap: 2 of 4 denoiser blocks streamed from RAM") for m in logs), logs
    assert any(m.startswith("peak device memory: ") for m in logs), logs


def test_too_many_blocks_to_swap_is_refused_naming_the_node_and_the_count(tmp_path):
    result, _ = run(tmp_path, {"blocks_to_swap": 4})
    assert result.status == "error" and result.error_node == "6"
    assert "TrainLoop's blocks_to_swap is 4" in result.error and "4 swappable blocks (2 down_blocks + 2 up_blocks)" in result.error


def test_fused_backward_with_accumulation_is_refused(tmp_path):
    # validate says it before anything loads (the Trainer's own refusal: tests/ml/memory/test_fused_backward.py)
    result, _ = run(tmp_path, {"fused_backward": True, "grad_accumulation": 2}, adapter=False)
    assert result.status == "invalid" and result.executed == []
    (problem,) = result.problems
    assert problem.node_id == "6" and "fused_backward" in problem.message and "grad_accumulation = 2" in problem.message


def test_a_fused_full_finetune_runs(tmp_path):
    result, _ = run(tmp_path, {"fused_backward": True, "clip_grad_norm": 0.0}, adapter=False,
                    optimizer={"optimizer": "adafactor", "lr": 1e-3})
    assert result.status == "done", result.error
    assert result.outputs["6"]["run"]["steps"] == 2
