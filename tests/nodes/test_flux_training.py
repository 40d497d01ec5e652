"""Flux through the real executor: tiny-flux learns red from blue as tiny-sd does, LoRA training with the
flow objective, gradient checkpointing and exact resume, a LoRA saved and continued in every layout."""

import json
from pathlib import Path

import torch

from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry

from test_training_nodes import DEMO, colour_fields, lora_recipe, recipe


def _run(data: dict, workspace: Path, targets=None):
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems, problems
    ex = Executor(reg)
    return ex, graph, ex.run(graph, targets=targets, workspace=workspace)


def flux_lora_recipe(train: dict, **kw) -> dict:
    data = lora_recipe(DEMO, {"max_steps": 4, **train}, res="32", **kw)
    data["nodes"]["1"]["params"]["source"] = "builtin:tiny-flux"
    data["nodes"]["3"]["params"]["quantization"] = 16
    return data


def separation(handle, class_means, res, seeds=40) -> dict[str, float]:
    """Share of seeds whose sampled latent lies nearer its own class's mean latent (Flux dev's guidance 3.5)."""
    from app.ml.sampling import sample_images

    out = {}
    for colour, other in (("red", "blue"), ("blue", "red")):
        result = sample_images(handle.base, [f"{colour} circle"], width=res, height=res, steps=20, cfg=3.5,
                               seed=100, sampler="euler", images_per_prompt=seeds)
        near = [float((z.flatten() - class_means[colour]).norm() < (z.flatten() - class_means[other]).norm())
                for z in result.latents]
        out[colour] = sum(near) / len(near)
    return out


def test_tiny_flux_learns_red_from_blue(tmp_path):
    """The same proof of learning as tiny-sd's, with the flow objective (sigmoid timesteps, resolution shift,
    guidance 1.0 into the embedder: the Flux family's defaults)."""
    from app.ml.data.batches import load_item, plan_epoch

    folder = tmp_path / "colours"
    colour_fields(folder)
    data = recipe({
        "1": ("LoadModel", {"source": "builtin:tiny-flux"}),
        "2": ("Concept", {"folder": str(folder), "name": "colours"}),
        "3": ("Bucketer", {"resolution": "16", "quantization": 16, "batch_size": 4, "bucketing": "off"}),
        "4": ("Optimizer", {"optimizer": "adamw", "lr": 2e-3, "weight_decay": 0.0}),
        "6": ("TrainLoop", {"max_steps": 1500, "train_dtype": "fp32", "gradient_checkpointing": False, "seed": 1}),
    }, [("1", "model", "6", "model"), ("2", "dataset", "3", "datasets"), ("3", "buckets", "6", "buckets"),
        ("4", "optimizer", "6", "optimizer")])
    ex, graph, before = _run(data, tmp_path / "ws", targets=["1", "3"])
    base, buckets = before.outputs["1"]["model"], before.outputs["3"]["buckets"]
    assert base.base.family.id == "flux-dev"
    latents = {"red": [], "blue": []}
    for it in plan_epoch(buckets.dataset, buckets.settings, 1, 0, 0, "keep").items:
        pixels = torch.from_numpy(load_item(it).image)[None]
        latents[it.caption.split()[0]].append(base.base.encode_images(pixels)[0].flatten())
    means = {k: torch.stack(v).mean(0) for k, v in latents.items()}
    untrained = separation(base, means, 16)
    assert min(untrained.values()) < 0.9, untrained
    result = ex.run(graph, workspace=tmp_path / "ws")
    assert result.status == "done"
    trained = separation(result.outputs["6"]["model"], means, 16)
    print(f"learning margins: before {untrained}, after {trained}")
    assert trained["red"] >= 0.9 and trained["blue"] >= 0.9, trained


def test_flux_lora_trains_and_gradient_checkpointing_gives_the_same_losses(tmp_path):
    _, _, plain = _run(flux_lora_recipe({}, save=None), tmp_path / "a")
    _, _, ckpt = _run(flux_lora_recipe({"gradient_checkpointing": True}, save=None), tmp_path / "b")
    assert plain.status == ckpt.status == "done"
    a, b = plain.outputs["6"]["run"]["losses"], ckpt.outputs["6"]["run"]["losses"]
    assert len(a) == 4 and all(x == x for x in a)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5), (a, b)


def test_flux_lora_resumes_exactly(tmp_path):
    train = {"max_steps": 6, "backup_every": 3, "backup_unit": "steps", "backups_kept": 5}
    _, _, full = _run(flux_lora_recipe(train, save=None), tmp_path / "full")
    assert full.status == "done"
    backup = next((tmp_path / "full").rglob("step_0000003"))
    data = flux_lora_recipe({**train, "resume_from": str(backup)}, save=None)
    _, _, resumed = _run(data, tmp_path / "resumed")
    assert resumed.status == "done"
    assert resumed.outputs["6"]["run"]["losses"] == full.outputs["6"]["run"]["losses"][3:]


def test_flux_lora_saved_in_each_layout_continues_training(tmp_path):
    from app.ml.adapters import load_adapter_file
    from app.ml.models import load_model

    flux = load_model("builtin:tiny-flux")
    for layout in ("kohya", "comfyui", "peft"):
        data = flux_lora_recipe({"max_steps": 2}, save=f"{layout}.safetensors")
        data["nodes"]["7"]["params"]["layout"] = layout
        _, _, result = _run(data, tmp_path / layout, targets=["6", "7"])
        assert result.status == "done", result
        path = next((tmp_path / layout).rglob(f"{layout}.safetensors"))
        trained = result.outputs["6"]["model"].adapters[-1]
        back = load_adapter_file(path, flux)
        ours = {e.name: e.module.delta_weight() for e in trained.entries()}
        theirs = {e.name: e.module.delta_weight() for e in back.entries()}
        assert set(ours) == set(theirs) and any(d.abs().max() > 0 for d in ours.values())
        for name in ours:
            assert torch.allclose(theirs[name], ours[name].cpu(), atol=1e-6), (layout, name)
        # LoRAInject's init_from reads it for further training
        cont = flux_lora_recipe({"max_steps": 1}, save=None)
        cont["nodes"]["5"]["params"]["init_from"] = str(path)
        _, _, again = _run(cont, tmp_path / f"{layout}_cont")
        assert again.status == "done", again


def test_sizes_that_are_not_multiples_of_16_are_refused_by_name(tmp_path):
    """Validation names them by node and param before anything loads."""
    data = flux_lora_recipe({"max_steps": 1}, save=None)
    data["nodes"]["3"]["params"].update({"resolution": "40", "quantization": 8})
    _, _, result = _run(data, tmp_path / "train")
    assert result.status == "invalid"
    text = str(result.__dict__)
    assert "'resolution' = 40: Flux.1 dev needs image sides that are multiples of 16 px (40 is not)" in text, text
    assert "'quantization' = 8: Flux.1 dev needs image sides that are multiples of 16 px" in text, text
    sample = recipe({"1": ("LoadModel", {"source": "builtin:tiny-flux"}),
                     "2": ("Sample", {"prompt": "red", "width": 72, "height": 64, "steps": 1, "seed": 1})},
                    [("1", "model", "2", "model")])
    _, _, result = _run(sample, tmp_path / "sample")
    assert result.status == "invalid" and "'width' = 72: Flux.1 dev needs image sides" in str(result.__dict__)


def test_sample_notes_that_flux_ignores_the_negative_prompt(tmp_path):
    events = []
    reg = load_registry(include_user=False)
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-flux"}),
                   "2": ("Sample", {"prompt": "red", "negative_prompt": "blurry", "width": 64, "height": 64,
                                    "steps": 2, "cfg": 3.5, "seed": 1})}, [("1", "model", "2", "model")])
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    assert Executor(reg).run(graph, emit=events.append, workspace=tmp_path).status == "done"
    logs = [e["message"] for e in events if e["event"] == "log" and e["node"] == "2"]
    assert any("negative prompt ignored" in m for m in logs), logs


def test_flux_validation_loss_and_ema(tmp_path):
    """Validation concepts give a deterministic flow-matching validation loss; EMA weights end up in the adapter."""
    data = flux_lora_recipe({"max_steps": 4, "validate_every": 2, "validate_unit": "steps", "ema": True,
                             "ema_decay": 0.5}, save=None)
    data["nodes"]["9"] = {"type": "Concept", "version": 1,
                          "params": {"folder": str(DEMO), "name": "held out", "concept_type": "validation"}}
    data["links"].append({"id": 99, "from_node": "9", "from_output": "dataset", "to_node": "3", "to_input": "datasets"})
    _, _, first = _run(data, tmp_path / "a", targets=["6"])
    _, _, again = _run(data, tmp_path / "b", targets=["6"])
    assert first.status == again.status == "done"
    val = first.outputs["6"]["run"]["validation"]
    assert [s for s, _ in val] == [2, 4] and all(v > 0 for _, v in val)
    assert val == again.outputs["6"]["run"]["validation"]  # fixed sigmas and noise: the same numbers


def test_sample_true_cfg_uses_the_negative_prompt(tmp_path):
    """Sample's true_cfg on Flux: real CFG with the negative prompt (noted in the log, recorded with the image)."""
    events = []
    reg = load_registry(include_user=False)
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-flux"}),
                   "2": ("Sample", {"prompt": "red", "negative_prompt": "blurry", "width": 64, "height": 64,
                                    "steps": 2, "cfg": 3.5, "seed": 1, "true_cfg": 3.0})}, [("1", "model", "2", "model")])
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    result = Executor(reg).run(graph, emit=events.append, workspace=tmp_path)
    assert result.status == "done"
    logs = [e["message"] for e in events if e["event"] == "log" and e["node"] == "2"]
    assert any("true CFG 3 with the negative prompt" in m for m in logs), logs
    assert not any("negative prompt ignored" in m for m in logs), logs
