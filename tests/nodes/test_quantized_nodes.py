"""Quantized base weights through the real executor: LoadModel's denoiser_quant / text_encoder_quant, a
full fine-tune refused by name, sampling and LoRA saves on a quantized base, LoadLoRA's precision warning."""

import json

import pytest
import torch
import torch.nn as nn

from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry

from test_training_nodes import DEMO, lora_recipe, recipe


@pytest.fixture(scope="module")
def reg():
    return load_registry(include_user=False)


def _run(reg, data: dict, workspace, targets=None):
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems, problems
    events = []
    result = Executor(reg).run(graph, targets=targets, workspace=workspace, emit=events.append)
    return result, events


def _logs(events) -> list[str]:
    return [e["message"] for e in events if e["event"] in ("log", "warning")]


def _quantized(module) -> dict[str, str]:
    from app.ml.memory.quant import QuantizedLinear

    return {n: m.fmt for n, m in module.named_modules() if isinstance(m, QuantizedLinear)}


@pytest.mark.parametrize("source,fmt", [("builtin:tiny-sd", "nf4"), ("builtin:tiny-flux", "fp8")])
def test_load_model_quantizes_per_component_and_keeps_the_family_layers(reg, tmp_path, source, fmt):
    data = recipe({"1": ("LoadModel", {"source": source, "unet_dtype": "bf16", "denoiser_quant": fmt}),
                   "2": ("LoadModel", {"source": source, "unet_dtype": "bf16"})}, [])
    result, events = _run(reg, data, tmp_path / "ws")
    assert result.status == "done"
    quant, plain = result.outputs["1"]["model"].base, result.outputs["2"]["model"].base
    den = quant.family.denoiser
    assert quant.quant == {den: fmt} and plain.quant == {}
    assert quant.precisions[den] == fmt and quant.precisions["text_encoder"] == "fp32" == plain.precisions["text_encoder"]
    layers = _quantized(quant.denoiser)
    linears = [n for n, m in plain.denoiser.named_modules() if type(m) is nn.Linear]
    assert layers and set(layers.values()) == {fmt}
    # the family's input/output projections and embedders stay as they were
    kept = {n for n in linears if n not in layers}
    if den == "transformer":
        assert {"x_embedder", "context_embedder", "proj_out", "norm_out.linear"} <= kept
        assert any(n.startswith("time_text_embed.") for n in kept)
        assert "single_transformer_blocks.0.proj_out" in layers
    else:
        assert kept == {"time_embedding.linear_1", "time_embedding.linear_2"}
    assert not _quantized(quant.text_encoders[0])  # text encoders: not asked
    # convs, norms and embeddings are untouched
    assert all(type(m) is not nn.Linear or n in kept for n, m in quant.denoiser.named_modules())
    # the identities follow the storage: caches of the two never mix
    assert quant.identities[den] != plain.identities[den] and quant.identity != plain.identity
    assert quant.vae_identity == plain.vae_identity and quant.text_identity == plain.text_identity
    # the log says what was quantized and the memory before and after
    line = next(m for m in _logs(events) if m.startswith(f"{den} quantized to {fmt}"))
    assert "Linear layers" in line and "MiB" in line and "kept in full precision" in line


def test_text_encoder_quant_changes_the_text_identity_and_encodes_close(reg, tmp_path):
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-flux", "text_encoder_quant": "int8"}),
                   "2": ("LoadModel", {"source": "builtin:tiny-flux"})}, [])
    result, _ = _run(reg, data, tmp_path / "ws")
    quant, plain = result.outputs["1"]["model"].base, result.outputs["2"]["model"].base
    assert quant.quant == {"text_encoder": "int8", "text_encoder_2": "int8"}
    assert _quantized(quant.text_encoders[1]) and not _quantized(quant.denoiser)
    # T5's wo stays as transformers keeps it (fp32), the rest of T5 is int8
    assert not any(n.endswith("DenseReluDense.wo") for n in _quantized(quant.text_encoders[1]))
    assert quant.text_identity != plain.text_identity and quant.identities["transformer"] == plain.identities["transformer"]
    a = quant.encode_prompts(["a red circle"])["prompt_embeds"]
    b = plain.encode_prompts(["a red circle"])["prompt_embeds"]
    assert ((a - b).norm() / b.norm()).item() < 0.05


def test_fp8_block_size_is_a_param_and_part_of_the_identity(reg, tmp_path):
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": "fp8", "fp8_block_size": 0}),
                   "2": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": "fp8", "fp8_block_size": 16})}, [])
    result, _ = _run(reg, data, tmp_path / "ws")
    per_tensor, blocks = result.outputs["1"]["model"].base, result.outputs["2"]["model"].base
    from app.ml.memory.quant import QuantizedLinear

    sizes = {m.block_size for m in per_tensor.unet.modules() if isinstance(m, QuantizedLinear)}
    assert sizes == {0}
    layers = [m for m in blocks.unet.modules() if isinstance(m, QuantizedLinear)]
    assert {m.block_size for m in layers if m.in_features > 16} == {16}  # rows of 16 are one block: per tensor
    assert per_tensor.identities["unet"] != blocks.identities["unet"]


def test_full_finetune_of_a_quantized_component_is_refused_by_name(reg, tmp_path):
    data = lora_recipe(DEMO, {"max_steps": 2}, adapter=False)
    data["nodes"]["1"]["params"]["denoiser_quant"] = "nf4"
    result, events = _run(reg, data, tmp_path / "ws")
    assert result.status == "error" and result.error_node == "6"
    message = next(e["message"] for e in events if e["event"] == "node_error")
    assert message.startswith("TrainLoop: the unet (nf4 from LoadModel)"), message
    assert "denoiser_quant" in message and "LoRAInject" in message

    # the text encoder alone quantized: a UNet-only fine-tune still runs; training the encoder too is refused
    data = lora_recipe(DEMO, {"max_steps": 1}, adapter=False)
    data["nodes"]["1"]["params"]["text_encoder_quant"] = "fp8"
    result, _ = _run(reg, data, tmp_path / "ws2")
    assert result.status == "done"
    data["nodes"]["6"]["params"]["train_text_encoder"] = True
    result, events = _run(reg, data, tmp_path / "ws3")
    assert result.status == "error"
    message = next(e["message"] for e in events if e["event"] == "node_error")
    assert "the text_encoder (fp8 from LoadModel)" in message


def test_quantized_linear_keeps_its_format_when_the_model_is_cast(reg, tmp_path):
    from app.ml.models import load_model

    bundle = load_model("builtin:tiny-sd", quant={"unet": "nf4"})
    before = {n: t.clone() for n, t in bundle.unet.named_buffers()}
    bundle.unet.to(torch.bfloat16)
    assert set(_quantized(bundle.unet).values()) == {"nf4"}
    assert before.keys() == dict(bundle.unet.named_buffers()).keys()
