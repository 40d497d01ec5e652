"""validate says what TrainLoop would refuse at start: a full fine-tune of quantized weights, fused backward
with gradient accumulation."""

import json
from pathlib import Path

from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from app.graph.validate import validate

DEMO = Path(__file__).resolve().parents[2] / "presets" / "tiny_demo.json"


def _problems(edit):
    data = json.loads(DEMO.read_text())
    edit(data)
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    return [str(p) for p in problems + validate(graph, reg)]


def _full_finetune(data):
    """LoRAInject taken out: LoadModel feeds TrainLoop directly."""
    del data["nodes"]["5"]
    data["links"] = [l for l in data["links"] if "5" not in (l["from_node"], l["to_node"])]
    data["links"].append({"id": 99, "from_node": "1", "from_output": "model", "to_node": "7", "to_input": "model"})


def test_a_full_finetune_of_a_quantized_model_is_a_validation_problem():
    def edit(data):
        _full_finetune(data)
        data["nodes"]["1"]["params"]["denoiser_quant"] = "nf4"

    found = [p for p in _problems(edit) if "stores it quantized" in p]
    assert len(found) == 1 and "TrainLoop" in found[0] and "denoiser_quant = nf4" in found[0], found
    assert "add a LoRAInject" in found[0]


def test_qlora_and_a_plain_full_finetune_are_fine():
    def qlora(data):
        data["nodes"]["1"]["params"].update(denoiser_quant="nf4", text_encoder_quant="fp8")

    def text_encoder_quantized_unet_trained(data):
        _full_finetune(data)
        data["nodes"]["1"]["params"]["text_encoder_quant"] = "nf4"  # not trained: train_text_encoder is off

    for edit in (qlora, _full_finetune, text_encoder_quantized_unet_trained):
        assert not [p for p in _problems(edit) if "quantized" in p or "fused_backward" in p], edit.__name__


def test_fused_backward_with_accumulation_is_a_validation_problem():
    def edit(data):
        data["nodes"]["7"]["params"].update(fused_backward=True, grad_accumulation=2)

    found = [p for p in _problems(edit) if "fused_backward" in p]
    assert len(found) == 1 and "grad_accumulation = 2" in found[0], found
