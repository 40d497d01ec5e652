"""The kohya ``ss_*`` training keys A1111's metadata viewer shows, on LoRAs saved by Save and by TrainLoop's
periodic saves: each value checked against the recipe, the generated captions and the Bucketer's plan."""

import json
import time
from collections import Counter

from PIL import Image
from safetensors import safe_open

from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from app.ml.train.data_source import BucketSource
from tests.nodes.test_training_nodes import lora_recipe

CAPTIONS = ["red, circle, small", "blue, square", "red, square, big", "green, circle"]
SIZES = [(48, 32), (32, 48), (40, 40), (48, 32)]
OPTIMIZER = {"optimizer": "adamw", "lr": 3e-3, "text_encoder_lr": 7e-4, "weight_decay": 0.0}
SAVE_TEXT = {"title": "Shapes v1", "author": "Ada", "description": "tiny test shapes", "trigger_phrase": "shp style"}


def _data(tmp_path):
    folder = tmp_path / "3_shapes"  # kohya's N_name folder: 3 repeats
    folder.mkdir()
    for i, (caption, size) in enumerate(zip(CAPTIONS, SIZES)):
        Image.new("RGB", size, (60 * i, 90, 200 - 40 * i)).save(folder / f"img_{i}.png")
        (folder / f"img_{i}.txt").write_text(caption)
    return folder


def _meta(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _run(tmp_path, train, save=None):
    recipe = lora_recipe(_data(tmp_path), {"epochs": 2, "seed": 5, **train}, batch=2, res="32",
                         optimizer=OPTIMIZER)
    recipe["nodes"]["3"]["params"]["bucketing"] = "on"
    if save is not None:
        recipe["nodes"]["7"]["params"].update(save)
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(recipe), registry=reg)
    assert not problems
    started = time.time()
    targets = ["3", "6"] + (["7"] if "7" in recipe["nodes"] else [])
    result = Executor(reg).run(graph, targets, workspace=tmp_path / "ws")
    assert result.status == "done"
    return result, started


def _check_training_keys(meta, buckets, started, *, seed, max_steps, epochs):
    assert meta["ss_clip_skip"] == "None"
    assert meta["ss_num_train_images"] == str(3 * len(CAPTIONS))
    assert json.loads(meta["ss_dataset_dirs"]) == {"3_shapes": {"n_repeats": 3, "img_count": len(CAPTIONS)}}
    counted = Counter(t.strip() for c in CAPTIONS for t in c.split(","))
    assert json.loads(meta["ss_tag_frequency"]) == {"3_shapes": dict(counted)}
    plan = BucketSource(buckets, seed).plan(0)
    per_bucket = Counter(it.bucket for it in plan.items)
    info = json.loads(meta["ss_bucket_info"])
    assert {tuple(b["resolution"]): b["count"] for b in info["buckets"].values()} == dict(per_bucket)
    assert len(per_bucket) > 1  # the three aspect ratios do not share one bucket
    sizes = {f"img_{i}.png": s for i, s in enumerate(SIZES)}
    errors = list({it.path.name: abs(it.bucket[0] / it.bucket[1] - sizes[it.path.name][0] / sizes[it.path.name][1])
                   for it in plan.items}.values())  # per image, without repeats, as kohya
    assert abs(info["mean_img_ar_error"] - sum(errors) / len(errors)) < 1e-9
    assert started - 1 <= float(meta["ss_training_started_at"]) <= time.time()
    assert float(meta["ss_learning_rate"]) == OPTIMIZER["lr"] and float(meta["ss_unet_lr"]) == OPTIMIZER["lr"]
    assert float(meta["ss_text_encoder_lr"]) == OPTIMIZER["text_encoder_lr"]
    assert meta["ss_optimizer"] == OPTIMIZER["optimizer"]
    assert meta["ss_seed"] == str(seed)
    assert meta["ss_max_train_steps"] == str(max_steps) and meta["ss_num_epochs"] == str(epochs)
    assert meta["ss_batch_size_per_device"] == "2"
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"


def test_save_writes_kohya_training_keys_and_user_text(tmp_path):
    result, started = _run(tmp_path, {}, save=SAVE_TEXT)
    meta = _meta(tmp_path / "ws" / "lora.safetensors")
    steps = result.outputs["6"]["run"]["steps"]
    _check_training_keys(meta, result.outputs["3"]["buckets"], started, seed=5, max_steps=steps, epochs=2)
    assert meta["modelspec.title"] == "Shapes v1" and meta["ss_output_name"] == "Shapes v1"
    assert meta["modelspec.author"] == "Ada" and meta["modelspec.description"] == "tiny test shapes"
    assert meta["modelspec.trigger_phrase"] == "shp style"


def test_save_title_defaults_to_the_file_name(tmp_path):
    _run(tmp_path, {"max_steps": 1})
    meta = _meta(tmp_path / "ws" / "lora.safetensors")
    assert meta["modelspec.title"] == "lora" and meta["ss_output_name"] == "lora" and "modelspec.author" not in meta
    assert meta["ss_seed"] == "5" and meta["ss_max_train_steps"] == "1"  # the training keys, without user text too


def test_periodic_saves_carry_the_training_keys(tmp_path):
    result, started = _run(tmp_path, {"max_steps": 3, "save_every": 2, "save_unit": "steps"})
    meta = _meta(tmp_path / "ws" / "TrainLoop_6" / "saves" / "step_0000002.safetensors")
    steps_per_epoch = -(-3 * len(CAPTIONS) // 2)
    _check_training_keys(meta, result.outputs["3"]["buckets"], started, seed=5, max_steps=3,
                         epochs=-(-3 // steps_per_epoch))
