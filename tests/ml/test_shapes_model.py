"""``builtin:shapes-sd`` draws the coloured shape a prompt names, and the demo LoRA teaches it green.

Colours are judged per pixel against the generator's palette (``app.ml.data.demo.COLOURS``) plus the
light background, over several seeds, so one odd sample cannot decide a test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml.data.demo import COLOURS
from app.ml.models import load_model
from app.ml.sampling import sample_images

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "presets" / "tiny_demo.json"
PALETTE = {**COLOURS, "background": (225, 225, 225)}
SEEDS = 4


def colour_shares(image) -> dict[str, float]:
    """Share of the image's pixels nearest each palette colour."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], dtype=np.float32)
    nearest = np.argmin(((px[:, None, :] - ref[None]) ** 2).sum(-1), axis=1)
    return {n: float((nearest == i).mean()) for i, n in enumerate(names)}


def fill_ratio(image, colour: str) -> float:
    """How much of the bounding box of the ``colour`` pixels they fill: square 1, circle 0.79, triangle 0.5."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    names = list(PALETTE)
    ref = np.array([PALETTE[n] for n in names], dtype=np.float32)
    mask = np.argmin(((px[..., None, :] - ref) ** 2).sum(-1), axis=-1) == names.index(colour)
    ys, xs = np.nonzero(mask)
    if len(ys) < 20:
        return float("nan")
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(mask.sum() / box)


def samples(model, prompt: str, seeds: int = SEEDS, adapters=None):
    return sample_images(model, [prompt], width=64, height=64, steps=20, cfg=4.0, seed=7, sampler="euler",
                         images_per_prompt=seeds, adapters=adapters).images


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    return load_model("builtin:shapes-sd")


def test_loads_through_load_model_with_its_own_vae_factor(base):
    record = json.loads((ROOT / "app" / "ml" / "models" / "assets" / "shapes_sd" / "model.json").read_text())
    assert base.family.id == "sd15"
    assert base.vae_scaling_factor == pytest.approx(record["vae_scaling_factor"])
    assert base.unet.dtype == torch.float32
    again = load_model("builtin:shapes-sd")
    assert again.identity == base.identity  # the same weights every load


@pytest.mark.parametrize("colour,shape", [("red", "circle"), ("blue", "square"), ("yellow", "triangle")])
def test_base_draws_the_colour_it_is_asked_for(base, colour, shape):
    shares = [colour_shares(img) for img in samples(base, f"{colour} {shape}")]
    for s in shares:
        others = max(v for k, v in s.items() if k not in (colour, "background"))
        assert s[colour] > 0.05 and s[colour] > 3 * others, (colour, shape, shares)


def test_base_draws_different_shapes(base):
    ratios = {shape: np.nanmean([fill_ratio(img, "blue") for img in samples(base, f"blue {shape}")])
              for shape in ("square", "circle", "triangle")}
    assert ratios["square"] > ratios["circle"] + 0.05 > ratios["triangle"] + 0.1, ratios



def corner_fill(image) -> float:
    """How much of the four corner ninths of the drawn shape's bounding box is drawn: a cross leaves
    them empty (0), a square fills them (1), circles and blobs lie between (about 0.4-0.5)."""
    px = np.asarray(image.convert("RGB"), dtype=np.float32)
    ink = np.abs(px - np.median(px.reshape(-1, 3), axis=0)).sum(-1) > 120  # far from the background
    ys, xs = np.nonzero(ink)
    if len(ys) < 20:
        return float("nan")
    m = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    a, b = max(1, m.shape[0] // 3), max(1, m.shape[1] // 3)
    return float(np.mean([m[:a, :b].mean(), m[:a, -b:].mean(), m[-a:, :b].mean(), m[-a:, -b:].mean()]))


def test_corner_fill_tells_a_cross_from_other_shapes():
    from app.ml.data.demo import shape_image

    rng = np.random.default_rng(0)
    fill = {s: corner_fill(shape_image(rng, COLOURS["blue"], s, 64, 64)) for s in ("cross", "circle", "square")}
    assert fill["cross"] < 0.05 and fill["circle"] > 0.3 and fill["square"] > 0.9, fill


def test_demo_lora_teaches_cross(base, tmp_path):
    """The demo recipe's training (presets/tiny_demo.json without its Sample nodes) turns the blobs the
    base draws for the unknown word "cross" into crosses of the asked colour."""
    from app.engine.executor import Executor
    from app.graph.recipe import load_recipe
    from app.graph.registry import load_registry

    prompts = ("red cross", "blue cross")
    before = {p: [corner_fill(img) for img in samples(base, p, seeds=3)] for p in prompts}

    reg = load_registry(include_user=False)
    graph, problems = load_recipe(PRESET, reg)
    assert not problems
    train = next(nid for nid, n in graph.nodes.items() if n.type == "TrainLoop")
    result = Executor(reg).run(graph, targets=[train], recipe_dir=PRESET.parent, workspace=tmp_path)
    assert result.status == "done", result
    trained = result.outputs[train]["model"]
    pairs = trained.adapter_pairs()
    after_images = {p: samples(trained.base, p, seeds=3, adapters=pairs) for p in prompts}
    after = {p: [corner_fill(img) for img in imgs] for p, imgs in after_images.items()}
    print(f"corner fill before {before}, after {after}")
    pooled_before = [v for p in prompts for v in before[p]]
    pooled_after = [v for p in prompts for v in after[p]]
    assert min(pooled_before) > 0.3, before  # the base draws blobs, not crosses
    assert np.nanmedian(pooled_after) < 0.25 and sum(v < 0.25 for v in pooled_after) >= 4, after  # most are crosses
    blue = [colour_shares(img) for img in after_images["blue cross"]]
    assert all(s["blue"] > 0.1 for s in blue), blue  # and in the asked colour


def test_missing_or_foreign_weights_name_the_file_and_the_script(tmp_path):
    from safetensors.torch import save_file

    from app.ml.models.families import ModelLoadError
    from app.ml.models.tiny import _load_trained_weights, shapes_sd_spec

    spec = shapes_sd_spec()
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ModelLoadError, match=r"unet\.safetensors is missing; rebuild it with .*train_shapes_sd\.py"):
        _load_trained_weights(spec, {"unet": module}, tmp_path)
    save_file({"other.weight": torch.zeros(2, 2)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unet\.safetensors does not fit the model"):
        _load_trained_weights(spec, {"unet": module}, tmp_path)
