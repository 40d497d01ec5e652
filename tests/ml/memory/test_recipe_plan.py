"""A recipe's memory plan before anything loads: the breakdown of a known recipe checked by hand, the
same plan from a diffusers folder, a single file's header counts, quantization and block swap read
from the nodes, sizes parsed, and fit proposals that fit."""
from __future__ import annotations

import copy
import json

import pytest

from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from app.ml.memory.recipe_plan import PlanError, parse_size, plan_graph

RECIPE = {
    "format_version": 1, "meta": {"title": "plan test"},
    "nodes": {
        "1": {"type": "LoadModel", "version": 1, "params": {"source": "builtin:tiny-sd", "unet_dtype": "fp32"}},
        "2": {"type": "Concept", "version": 1, "params": {"folder": "data"}},
        "3": {"type": "Bucketer", "version": 2, "params": {"resolution": "64x64", "batch_size": 2}},
        "4": {"type": "Cache", "version": 1, "params": {"cache_text": True}},
        "5": {"type": "LoRAInject", "version": 1, "params": {"rank": 4, "alpha": 4.0, "unet_layers": "attn-only",
                                                             "text_encoder_layers": "none"}},
        "6": {"type": "Optimizer", "version": 1, "params": {"optimizer": "adamw"}},
        "7": {"type": "TrainLoop", "version": 2, "params": {"train_dtype": "fp32", "gradient_checkpointing": False}},
    },
    "links": [
        {"id": 1, "from_node": "1", "from_output": "model", "to_node": "5", "to_input": "model"},
        {"id": 2, "from_node": "2", "from_output": "dataset", "to_node": "3", "to_input": "datasets"},
        {"id": 3, "from_node": "1", "from_output": "model", "to_node": "3", "to_input": "model"},
        {"id": 4, "from_node": "1", "from_output": "model", "to_node": "4", "to_input": "model"},
        {"id": 5, "from_node": "3", "from_output": "buckets", "to_node": "4", "to_input": "buckets"},
        {"id": 6, "from_node": "5", "from_output": "model", "to_node": "7", "to_input": "model"},
        {"id": 7, "from_node": "4", "from_output": "buckets", "to_node": "7", "to_input": "buckets"},
        {"id": 8, "from_node": "6", "from_output": "optimizer", "to_node": "7", "to_input": "optimizer"},
    ],
    "ui": {},
}


@pytest.fixture(scope="module")
def registry():
    return load_registry([])


def _plan(registry, recipe_dir=None, links=(), **changes):
    data = copy.deepcopy(RECIPE)
    for nid, params in changes.items():
        if params is None:
            data["nodes"].pop(nid)
            data["links"] = [l for l in data["links"] if nid not in (l["from_node"], l["to_node"])]
        else:
            data["nodes"][nid]["params"].update(params)
    for i, (a, out, b, inp) in enumerate(links):
        data["links"].append({"id": 100 + i, "from_node": a, "from_output": out, "to_node": b, "to_input": inp})
    graph, problems = loads_recipe(json.dumps(data), registry=registry)
    assert not problems
    return plan_graph(graph, registry, recipe_dir)[0]


def test_breakdown_of_a_known_recipe_matches_a_hand_computation(registry):
    from diffusers import UNet2DConditionModel

    from app.ml.models.families.sd import ACTIVATION_PROFILES
    from app.ml.models.tiny import tiny_spec

    p = _plan(registry)
    parts = p.plan.parts
    unet = sum(t.numel() for t in UNet2DConditionModel(**tiny_spec("tiny-sd").unet).parameters())
    assert parts["weights unet (fp32)"] == 4 * unet
    # latents and text cached: the VAE and text encoder stay in RAM
    assert not any(k.startswith(("weights vae", "weights text_encoder")) for k in parts)
    # LoRA rank 4 on attn-only: every BasicTransformerBlock's attn1 (q, k, v, out: C -> C) and attn2
    # (q, out: C -> C; k, v: 32 -> C, the text width): 5 blocks at C = 16 (2 down, 3 up), 1 at 32 (mid)
    r = 4
    per_16 = 4 * r * (16 + 16) + 2 * r * (16 + 16) + 2 * r * (32 + 16)
    per_32 = 4 * r * (32 + 32) + 2 * r * (32 + 32) + 2 * r * (32 + 32)
    adapter = 5 * per_16 + per_32
    assert adapter == 7808
    assert parts["adapter weights (fp32)"] == 4 * adapter and parts["adapter gradients (fp32)"] == 4 * adapter
    assert parts["optimizer state (adamw)"] == 8 * adapter
    # activations: the profile's bytes per latent pixel (a first step's) x 8 x 8 latents x batch 2
    prof = next(q for q in ACTIVATION_PROFILES if q.name == "tiny-sd")
    assert parts["activations"] == pytest.approx(prof.base * prof.first_step * 64 * 2)
    # adapted layers' inputs (fp32, batch 2): per block the normed input (q, k, v share it), attn1's
    # output, norm2's output, attn2's output (64 tokens x 16 at level 0; 16 x 32 in the mid block);
    # the text (77 x 32) once: every block reads the same tensor
    inputs = 5 * 4 * 2 * 64 * 16 * 4 + 4 * 2 * 16 * 32 * 4 + 2 * 77 * 32 * 4
    assert parts["activations (adapted layers' inputs)"] == pytest.approx(inputs * prof.adapter_factor)
    assert p.peak == pytest.approx(4 * unet + 16 * adapter + prof.base * prof.first_step * 128
                                   + inputs * prof.adapter_factor)


def test_uncached_components_and_checkpointing_enter_the_plan(registry):
    from app.ml.models.families.sd import ACTIVATION_PROFILES

    prof = next(q for q in ACTIVATION_PROFILES if q.name == "tiny-sd")
    p = _plan(registry, links=[("3", "buckets", "7", "buckets")],
              **{"4": None, "7": {"gradient_checkpointing": True, "train_dtype": "fp32"}})
    links = [l for l in p.plan.parts]
    assert any(k.startswith("weights vae") for k in links) and any(k.startswith("weights text_encoder") for k in links)
    assert p.plan.parts["activations (checkpointed)"] == pytest.approx(prof.ckpt_base * prof.first_step * 128)
    assert any("no Cache node" in n for n in p.notes)


def test_a_diffusers_folder_plans_as_its_builtin(registry, tmp_path):
    from app.ml.models import load_model
    from app.ml.save import save_diffusers

    folder = tmp_path / "tiny_sd"
    save_diffusers(load_model("builtin:tiny-sd"), folder)
    builtin = _plan(registry)
    p = _plan(registry, tmp_path, **{"1": {"source": "tiny_sd"}})
    assert p.plan.parts == builtin.plan.parts
    assert "tiny_sd" in p.model and not any("not measured" in n for n in p.notes)


def test_a_single_file_counts_its_header(registry, tmp_path):
    from safetensors import safe_open

    from app.ml.models import load_model
    from app.ml.save import save_single_file

    path = save_single_file(load_model("builtin:tiny-sd"), tmp_path / "tiny.safetensors")
    with safe_open(str(path), "pt") as f:
        unet = sum(f.get_slice(k).get_shape().numel() if hasattr(f.get_slice(k).get_shape(), "numel")
                   else _numel(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.diffusion_model."))
    p = _plan(registry, tmp_path, **{"1": {"source": path.name, "family": "sd15"}})
    assert p.plan.parts["weights unet (fp32)"] == 4 * unet
    assert any("the file's unet holds" in n for n in p.notes)


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def test_quantization_and_block_swap_are_read_from_the_nodes(registry):
    base = _plan(registry, **{"1": {"source": "builtin:tiny-flux", "unet_dtype": "bf16"},
                              "5": {"unet_layers": "attn-only"}})
    nf4 = _plan(registry, **{"1": {"source": "builtin:tiny-flux", "unet_dtype": "bf16", "denoiser_quant": "nf4"},
                             "5": {"unet_layers": "attn-only"}, "7": {"blocks_to_swap": 2}})
    assert "weights transformer (bf16)" in base.plan.parts and "weights transformer (nf4)" in nf4.plan.parts
    comp = next(c for c in nf4.recipe.components if c.name == "transformer")
    assert nf4.plan.parts["weights transformer (nf4)"] == pytest.approx(
        comp.linear_params * (0.5 + 4 / 64) + (comp.params - comp.linear_params) * 2)
    assert comp.linear_params < comp.params  # the family's quant_keep layers and the norms stay bf16
    # 4 blocks (2 double + 2 single), 2 swapped: resident 2 + 1 prefetched, a quarter of the blocks in RAM
    assert nf4.recipe.blocks == 4 and nf4.recipe.blocks_resident == 2
    assert nf4.plan.parts["block swap (weights in RAM)"] < 0
    assert nf4.peak < base.peak


def test_fit_through_the_recipe_and_sizes(registry):
    p = _plan(registry)
    target = p.peak * 0.8
    best = p.fit(target)
    assert best is not None and best.peak <= target and best.changes
    assert "to fit" in p.fit_text(target) and " -> " in p.fit_text(target)
    assert "nothing fits" in p.fit_text(1000)
    assert p.to_dict(target)["fit"]["fits"] is True
    assert parse_size("12GB") == 12e9 and parse_size("12 GiB") == 12 * 2**30 and parse_size("8000MB") == 8e9
    assert parse_size("11.5g") == 11.5e9
    assert parse_size("8") == 8e9 and parse_size("2B") == 2  # a bare number is GB, as a card's size is said
    with pytest.raises(ValueError, match="12 bananas"):
        parse_size("12 bananas")


def test_missing_links_are_named(registry):
    with pytest.raises(PlanError, match=r"TrainLoop \(node 7\): its model input is not linked"):
        _plan(registry, **{"5": None, "1": {}})


def test_the_run_log_sets_the_measured_peak_next_to_the_prediction(registry, monkeypatch):
    from app.ml.memory import recipe_plan
    from app.ml.memory.recipe_plan import gb, measured_vs_predicted

    plan = _plan(registry).plan
    step = sum(v for k, v in plan.parts.items() if not k.startswith(("weights ", "adapter weights")))
    tiny = measured_vs_predicted(RECIPE, None, "7", int(step * 1.1), "RSS growth over the loaded process")
    assert "(too small to compare: one-time costs dominate)" in tiny and "%" not in tiny, tiny
    monkeypatch.setattr(recipe_plan, "COMPARABLE_BYTES", 0)  # as if the run were big enough to compare
    line = measured_vs_predicted(RECIPE, None, "7", int(step * 1.1), "RSS growth over the loaded process")
    assert line.startswith(f"peak device memory: measured {gb(int(step * 1.1))} (RSS growth over the loaded "
                           f"process), predicted {gb(step)} beyond the loaded weights (-9%)"), line
    line = measured_vs_predicted(RECIPE, None, "7", int(plan.peak), "CUDA max_memory_allocated")
    assert f"predicted {gb(plan.peak)} (+0%)" in line
    broken = copy.deepcopy(RECIPE)
    broken["links"] = [l for l in broken["links"] if l["to_input"] != "buckets"]
    assert "no prediction (TrainLoop (node 7): its buckets input is not linked" in measured_vs_predicted(
        broken, None, "7", 1000, "RSS growth over the loaded process")
