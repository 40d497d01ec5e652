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
    assert result.status != "invalid", [e for e in events if e["event"] not in ("log", "progress")]
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


def test_load_model_offers_the_formats_quant_knows(reg):
    from app.ml.memory.quant import CHOICES

    inputs = {i.name: i for i in reg.get("LoadModel").inputs}
    assert inputs["denoiser_quant"].choices == inputs["text_encoder_quant"].choices == CHOICES
    assert inputs["denoiser_quant"].default == inputs["text_encoder_quant"].default == "none"


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
    from app.ml.memory.quant import QuantError
    from app.ml.models import load_model
    from app.ml.train.trainables import FullFinetune

    def refused_before_running(data, workspace):
        graph, problems = loads_recipe(json.dumps(data), registry=reg)
        assert not problems
        result = Executor(reg).run(graph, workspace=workspace)
        assert result.status == "invalid" and result.executed == [], result  # validate says it: nothing loaded
        return [(p.node_id, p.message) for p in result.problems]

    data = lora_recipe(DEMO, {"max_steps": 2}, adapter=False)
    data["nodes"]["1"]["params"]["denoiser_quant"] = "nf4"
    (node, message), = refused_before_running(data, tmp_path / "ws")
    assert node == "6" and "denoiser_quant = nf4" in message and "LoRAInject" in message
    # TrainLoop refuses it too when it starts (a model that reaches it some other way)
    with pytest.raises(QuantError) as err:
        FullFinetune(load_model("builtin:tiny-sd", quant={"unet": "nf4"}))
    assert str(err.value).startswith("TrainLoop: the unet (nf4 from LoadModel)") and "LoRAInject" in str(err.value)

    # the text encoder alone quantized: a UNet-only fine-tune still runs; training the encoder too is refused
    data = lora_recipe(DEMO, {"max_steps": 1}, adapter=False)
    data["nodes"]["1"]["params"]["text_encoder_quant"] = "fp8"
    result, _ = _run(reg, data, tmp_path / "ws2")
    assert result.status == "done"
    data["nodes"]["6"]["params"]["train_text_encoder"] = True
    (node, message), = refused_before_running(data, tmp_path / "ws3")
    assert node == "6" and "text_encoder_quant = fp8" in message
    with pytest.raises(QuantError, match=r"the text_encoder \(fp8 from LoadModel\)"):
        FullFinetune(load_model("builtin:tiny-sd", quant={"text_encoder": "fp8"}), train_text_encoders=True)


def test_quantized_linear_keeps_its_format_when_the_model_is_cast(reg, tmp_path):
    from app.ml.models import load_model

    bundle = load_model("builtin:tiny-sd", quant={"unet": "nf4"})
    before = {n: t.clone() for n, t in bundle.unet.named_buffers()}
    bundle.unet.to(torch.bfloat16)
    assert set(_quantized(bundle.unet).values()) == {"nf4"}
    assert before.keys() == dict(bundle.unet.named_buffers()).keys()


def _storage(module) -> dict[str, torch.Tensor]:
    from app.ml.memory.quant import QuantizedLinear

    return {f"{n}.{i}": t.clone() for n, m in module.named_modules() if isinstance(m, QuantizedLinear)
            for i, t in enumerate(m.storage())}


@pytest.mark.parametrize("source,fmt,algorithm", [("builtin:tiny-sd", "nf4", "lora"), ("builtin:tiny-sd", "fp8", "dora"),
                                                  ("builtin:tiny-flux", "nf4", "dora"), ("builtin:tiny-flux", "fp8", "lora")])
def test_qlora_trainloop_trains_samples_and_saves_on_a_quantized_base(reg, tmp_path, source, fmt, algorithm):
    """TrainLoop with an adapter on an nf4 / fp8 base: finite losses, the adapter changes, the quantized storage
    does not; samples before, during and after training; the saved LoRA records the base precision."""
    from safetensors import safe_open

    data = lora_recipe(DEMO, {"max_steps": 3, "train_dtype": "bf16", "sample_prompts": "red circle", "sample_steps": 2,
                              "sample_every": 2, "sample_unit": "steps", "gradient_checkpointing": fmt == "fp8"},
                       res="32", save="qlora.safetensors")
    data["nodes"]["1"]["params"].update(source=source, denoiser_quant=fmt, text_encoder_quant=fmt)
    data["nodes"]["5"]["params"].update(algorithm=algorithm, text_encoder_layers="attn-only")
    if "flux" in source:
        data["nodes"]["3"]["params"]["quantization"] = 16
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    ex = Executor(reg)
    first = ex.run(graph, targets=["1", "5"], workspace=tmp_path / "ws")
    base, untrained = first.outputs["1"]["model"].base, first.outputs["5"]["model"].adapters[0]
    before = _storage(base.denoiser), _storage(base.text_encoders[0])
    start = {k: v.clone() for k, v in untrained.state_dict().items()}
    events = []
    result = ex.run(graph, targets=["6", "7"], workspace=tmp_path / "ws", emit=events.append)
    assert result.status == "done", [e["message"] for e in events if e["event"] == "node_error"]
    losses = [e["values"]["loss"] for e in events if e["event"] == "metric" and "loss" in e["values"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    trained = result.outputs["6"]["model"].adapters[0]
    assert any(not torch.equal(v, start[k]) for k, v in trained.state_dict().items())
    for got, want in zip((_storage(base.denoiser), _storage(base.text_encoders[0])), before):
        assert got.keys() == want.keys() and got and all(torch.equal(got[k], want[k]) for k in want)
    samples = sorted(p.name for p in (tmp_path / "ws").rglob("*.png"))
    assert len(samples) >= 3, samples  # before, at step 2, after
    saved = next((tmp_path / "ws").rglob("qlora.safetensors"))
    with safe_open(str(saved), "pt") as f:
        meta = f.metadata()
    recorded = json.loads(meta["nodetrainer_base_precision"])
    assert recorded[base.family.denoiser] == fmt and recorded["text_encoder"] == fmt and "vae" not in recorded
    assert meta["ss_fp8_base"] == str(fmt == "fp8")


@pytest.fixture(scope="module")
def nf4_lora(tmp_path_factory):
    """A LoRA trained (briefly) on an nf4 tiny-sd, saved by the Save node, and one trained on the plain base."""
    reg = load_registry(include_user=False)
    out = {}
    for fmt in ("nf4", "none"):
        tmp = tmp_path_factory.mktemp(f"lora_{fmt}")
        data = lora_recipe(DEMO, {"max_steps": 2}, res="32", save=f"{fmt}.safetensors")
        data["nodes"]["1"]["params"]["denoiser_quant"] = fmt
        result, _ = _run(reg, data, tmp / "ws")
        assert result.status == "done"
        out[fmt] = next((tmp / "ws").rglob(f"{fmt}.safetensors"))
    return out


def test_a_lora_from_an_nf4_base_matches_in_layout_and_load_lora_warns_on_another_precision(reg, tmp_path, nf4_lora):
    from safetensors import safe_open

    with safe_open(str(nf4_lora["nf4"]), "pt") as a, safe_open(str(nf4_lora["none"]), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_shape() == b.get_slice(k).get_shape() for k in a.keys())
    # applied on the plain (fp32) base: loads, warns naming the file and both precisions, and samples
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}),
                   "2": ("LoadLoRA", {"path": str(nf4_lora["nf4"])}),
                   "3": ("ApplyLoRA", {"strength": 1.0, "text_encoder_strength": 1.0}),
                   "4": ("Sample", {"prompt": "red circle", "width": 64, "height": 64, "steps": 2, "seed": 1})},
                  [("1", "model", "2", "model"), ("1", "model", "3", "model"), ("2", "lora", "3", "lora"),
                   ("3", "model", "4", "model")])
    result, events = _run(reg, data, tmp_path / "ws")
    assert result.status == "done"
    warnings = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"]
    line = next(m for m in warnings if "was trained on a base with" in m)
    assert line.startswith(f"{nf4_lora['nf4'].name} was trained on a base with unet nf4; this model has unet fp32")
    assert len(result.outputs["4"]["images"]["paths"]) == 1
    # the same file on an nf4 base, and the plain LoRA on the plain base: no warning
    for path, quant in ((nf4_lora["nf4"], "nf4"), (nf4_lora["none"], "none")):
        data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": quant}),
                       "2": ("LoadLoRA", {"path": str(path)})}, [("1", "model", "2", "model")])
        result, events = _run(reg, data, tmp_path / f"ws_{quant}")
        assert result.status == "done"
        assert not any("was trained on a base with" in e.get("message", "") for e in events)


def test_sample_node_on_a_quantized_base_with_a_lora(reg, tmp_path, nf4_lora):
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": "nf4", "text_encoder_quant": "fp8"}),
                   "2": ("LoadLoRA", {"path": str(nf4_lora["nf4"])}),
                   "3": ("ApplyLoRA", {"strength": 1.0, "text_encoder_strength": 1.0}),
                   "4": ("Sample", {"prompt": "red circle\nblue square", "width": 64, "height": 64, "steps": 3,
                                    "seed": 1})},
                  [("1", "model", "2", "model"), ("1", "model", "3", "model"), ("2", "lora", "3", "lora"),
                   ("3", "model", "4", "model")])
    result, _ = _run(reg, data, tmp_path / "ws")
    assert result.status == "done"
    from PIL import Image

    paths = result.outputs["4"]["images"]["paths"]
    assert len(paths) == 2 and all(Image.open(p).size == (64, 64) for p in paths)


def _separation(handle, class_means, res, seeds=40) -> dict[str, float]:
    """test_training_nodes.separation with the handle's adapters attached (QLoRA trains an adapter, not the base)."""
    from app.ml.sampling import sample_images

    out = {}
    for colour, other in (("red", "blue"), ("blue", "red")):
        result = sample_images(handle.base, [f"{colour} circle"], width=res, height=res, steps=20, cfg=7.0, seed=100,
                               sampler="euler", images_per_prompt=seeds, adapters=handle.adapter_pairs(1.0))
        near = [float((z.flatten() - class_means[colour]).norm() < (z.flatten() - class_means[other]).norm())
                for z in result.latents]
        out[colour] = sum(near) / len(near)
    return out


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_qlora_learns_red_from_blue_on_a_quantized_base(tmp_path, fmt):
    """test_training_nodes' proof of learning on a quantized tiny-sd: the denoiser and text encoder stored in nf4 /
    fp8, which a full fine-tune cannot train, so a LoCon (3x3 convs too, as the full fine-tune trains them) on
    the UNet and a LoRA on the text encoder learn instead. The untrained base does not tell red from blue
    (test_training_learns_red_from_blue asserts it on the same data and seeds)."""
    from app.ml.data.batches import load_item, plan_epoch
    from test_training_nodes import colour_fields

    folder = tmp_path / "colours"
    colour_fields(folder)
    data = recipe({
        "1": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": fmt, "text_encoder_quant": fmt}),
        "2": ("Concept", {"folder": str(folder), "name": "colours"}),
        "3": ("Bucketer", {"resolution": "16", "quantization": 8, "batch_size": 4, "bucketing": "off"}),
        "4": ("Optimizer", {"optimizer": "adamw", "lr": LEARN_LR, "weight_decay": 0.0}),
        "5": ("LoRAInject", {"algorithm": "locon", "rank": 16, "alpha": 16.0, "unet_layers": "full",
                             "text_encoder_layers": "attn-mlp"}),
        "6": ("TrainLoop", {"max_steps": LEARN_STEPS, "train_dtype": "fp32", "gradient_checkpointing": False,
                            "seed": 1}),
    }, [("1", "model", "5", "model"), ("5", "model", "6", "model"), ("2", "dataset", "3", "datasets"),
        ("3", "buckets", "6", "buckets"), ("4", "optimizer", "6", "optimizer")])
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    ex = Executor(reg)
    before = ex.run(graph, targets=["1", "3"], workspace=tmp_path / "ws")
    base, buckets = before.outputs["1"]["model"].base, before.outputs["3"]["buckets"]
    assert base.quant == {"unet": fmt, "text_encoder": fmt}
    latents = {"red": [], "blue": []}
    for it in plan_epoch(buckets.dataset, buckets.settings, 1, 0, 0, "keep").items:
        latents[it.caption.split()[0]].append(base.encode_images(torch.from_numpy(load_item(it).image)[None])[0].flatten())
    means = {k: torch.stack(v).mean(0) for k, v in latents.items()}
    result = ex.run(graph, targets=["6"], workspace=tmp_path / "ws")
    assert result.status == "done"
    trained = _separation(result.outputs["6"]["model"], means, 16)
    print(f"{fmt} learning margins after {LEARN_STEPS} steps: {trained}")
    assert trained["red"] >= 0.9 and trained["blue"] >= 0.9, trained


# the full fine-tune's 1500 steps; rank 16 at 5e-3 measured 0.95 / 0.975 (nf4) and 0.925 / 0.975 (fp8), rank 8 missed
LEARN_STEPS, LEARN_LR = 1500, 5e-3


def test_lora_inject_continuing_a_qlora_on_another_precision_warns(reg, tmp_path, nf4_lora):
    """LoRAInject's init_from says it too, as LoadLoRA does: continuing an nf4-trained LoRA on a plain base."""
    for quant, warned in (("none", True), ("nf4", False)):
        data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd", "denoiser_quant": quant}),
                       "2": ("LoRAInject", {"init_from": str(nf4_lora["nf4"])})}, [("1", "model", "2", "model")])
        result, events = _run(reg, data, tmp_path / f"ws_{quant}")
        assert result.status == "done"
        notes = [e["message"] for e in events if e["event"] == "log" and e.get("level") == "warning"
                 and "was trained on a base with" in e["message"]]
        assert bool(notes) == warned, notes
        if warned:
            assert notes[0].startswith(f"{nf4_lora['nf4'].name} was trained on a base with unet nf4; this model has "
                                       "unet fp32")
