"""Augment node: settings per concept without a rescan, previews that re-roll, and draws that are
the same in another process and after a resume."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from dataset_node_helpers import ROOT, graph, png_size, run

AUG = {"flip": "random", "rotation": 10.0, "brightness": 0.2, "contrast": 0.1, "saturation": 0.2, "hue": 0.05}


def pipeline(folder, aug=None):
    nodes = [("1", "Concept", {"folder": str(folder), "name": "things"}),
             ("2", "Augment", {**AUG, **(aug or {})}),
             ("3", "Bucketer", {"resolution": "64", "quantization": 8, "batch_size": 2, "leftovers": "keep"})]
    links = [("1", "dataset", "2", "dataset"), ("2", "dataset", "3", "datasets")]
    return graph(nodes, links)


def test_augment_maps_params_onto_each_concept_without_rescanning(mixed):
    r, _ = run(pipeline(mixed, {"flip": "always", "mode": "fixed", "crop_jitter": False, "resolution": "96"}),
               targets=["1", "3"])
    assert r.status == "done", r.error()
    ds = r.output("3").dataset
    s = ds.concepts[0].settings
    a = s.augment
    assert a.flip == "fixed" and a.rotation == 10.0 and a.crop_jitter is False
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.2, 0.1, 0.2, 0.05)
    assert {a.rotation_mode, a.brightness_mode, a.contrast_mode, a.saturation_mode, a.hue_mode} == {"fixed"}
    assert s.resolution == "96"
    assert ds.concepts[0].samples is r.output("1").concepts[0].samples  # the scanned samples, no rescan
    assert r.output("1").concepts[0].settings.augment.flip == "random"  # the input is not changed
    labels = r.previews("3")["histogram"]["labels"]
    assert "96x96" in labels  # the resolution override reached the Bucketer


def test_augment_preview_is_a_grid_of_draws_that_rerolls_with_the_seed(mixed):
    g = pipeline(mixed, {"preview_images": 2, "preview_draws": 3, "seed": 5})
    r, ex = run(g, targets=["2"])
    p = r.previews("2")
    assert set(p) == {"images"}
    imgs = p["images"]
    assert len(imgs["images"]) == 2 * (3 + 1) and len(imgs["captions"]) == 8
    assert "original" in imgs["captions"][0] and "epoch 1" in imgs["captions"][1]
    assert all(max(png_size(b)) <= 160 for b in imgs["images"])
    assert len(set(imgs["images"][1:4])) == 3  # the draws differ from each other

    again, _ = run(g, targets=["2"])  # new executor, same seed: identical preview
    assert again.previews("2")["images"]["images"] == imgs["images"]
    g.set_param("2", "seed", 6)
    rerolled, _ = run(g, ex, targets=["2"])
    new = rerolled.previews("2")["images"]["images"]
    assert new[0] == imgs["images"][0]  # the original is the original
    assert new[1:4] != imgs["images"][1:4]
    g.set_param("2", "preview_images", 0)
    none, _ = run(g, ex, targets=["2"])
    assert "images" not in none.previews("2")


DIGEST = """
import hashlib, json, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {here!r})
from app.ml.data.batches import load_item, plan_epoch, stack_batch
from dataset_node_helpers import graph, run
from test_augment_node import pipeline
r, _ = run(pipeline({folder!r}))
b = r.output("3")
out = {{}}
for epoch in {epochs!r}:
    plan = plan_epoch(b.dataset, b.settings, b.batch_size, 42, epoch, b.leftover)
    h = hashlib.sha256()
    for batch in plan.batches:
        images, _ = stack_batch([load_item(it) for it in batch])
        h.update(json.dumps([[str(it.path), it.crop, it.augment_params.key(), it.caption] for it in batch]).encode())
        h.update(images.tobytes())
    out[epoch] = h.hexdigest()
print(json.dumps(out))
"""


def _digests(folder, epochs, subprocess_=False):
    code = DIGEST.format(root=str(ROOT), here=os.path.dirname(__file__), folder=str(folder), epochs=list(epochs))
    if subprocess_:
        env = dict(os.environ, PYTHONHASHSEED="123")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        return {int(k): v for k, v in json.loads(out.stdout).items()}
    ns: dict = {}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, "<digest>", "exec"), ns)
    return {int(k): v for k, v in json.loads(buf.getvalue()).items()}


def test_augmentation_is_reproducible_across_processes_and_after_resume(mixed):
    continuous = _digests(mixed, [0, 1, 2])  # epochs 1..3 in one process, in order
    resumed = _digests(mixed, [2], subprocess_=True)  # a fresh process that starts at epoch 3
    assert resumed[2] == continuous[2]
    assert len(set(continuous.values())) == 3  # and the epochs really differ
