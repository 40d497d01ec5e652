"""Bucketer node: bucket sizes follow the rule, nearest aspect, leftovers by name, clear errors."""
from __future__ import annotations

import math

import pytest
from dataset_node_helpers import graph, run, write_image

from app.ml.data.bucketing import ASPECTS, bucket_sizes


def pipeline(folder, bucketer=None, concept=None, model=None):
    nodes = [("1", "Concept", {"folder": str(folder), "name": "things", **(concept or {})}),
             ("2", "Bucketer", {"resolution": "64", "quantization": 8, **(bucketer or {})})]
    links = [("1", "dataset", "2", "datasets")]
    if model:
        nodes.append(("3", "LoadModel", {"source": model}))
        links.append(("3", "model", "2", "model"))
    return graph(nodes, links)


def nearest(size, buckets):
    w, h = size
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - math.log(w / h)))


@pytest.mark.parametrize("res,q", [(512, 8), (1024, 8), (512, 64), (1024, 64)])
def test_bucket_sizes_follow_the_rule_and_images_take_the_nearest_aspect(mixed, res, q):
    r, _ = run(pipeline(mixed, {"resolution": str(res), "quantization": q}))
    assert r.status == "done", r.error()
    allowed = bucket_sizes(res, q, ASPECTS)
    for w, h in allowed:  # the rule: multiples of q, about res*res pixels, the aspect set
        assert w % q == 0 and h % q == 0
        assert abs(w * h / res**2 - 1) < 2.5 * q / min(w, h)
    p = r.previews("2")
    assert set(p) == {"histogram", "table", "text"}
    hist = p["histogram"]
    assert sum(hist["counts"]) == 9 and {tuple(map(int, l.split("x"))) for l in hist["labels"]} <= set(allowed)
    sizes = {s.path.name: s.size for s in r.output("2", "buckets").dataset.concepts[0].samples}
    rows = p["table"]["rows"]
    assert len(rows) == 9
    for name, concept, bucket, resize, crop, note in rows:
        b = tuple(map(int, bucket.split("x")))
        assert b == nearest(sizes[name], allowed), name
        rw, rh = map(int, resize.split("x"))
        assert rw >= b[0] and rh >= b[1]  # scaled to cover, then cropped
        left, top, right, bottom = map(int, crop.split(","))
        assert (right - left, bottom - top) == b
    buckets_by_file = {row[0]: row[2] for row in rows}
    if (res, q) == (512, 8):
        assert buckets_by_file["port_a.png"] == "416x624" and buckets_by_file["square_a.png"] == "512x512"
        assert buckets_by_file["wide.png"] == "1024x256"
    if (res, q) == (1024, 64):
        assert buckets_by_file["land_a.png"] == "1280x832" and buckets_by_file["wide.png"] == "2048x512"
    # every image is smaller than its bucket here: each is named in a warning (skip mode)
    assert any("upscaled" in m and "square_a.png" in m for m in r.logs("2", "warning"))


def test_quantization_comes_from_the_connected_model_family(mixed):
    r, _ = run(pipeline(mixed, {"resolution": "1024", "quantization": 0}, model="builtin:tiny-sdxl"))
    assert r.status == "done", r.error()
    b = r.output("2")
    assert b.settings.q == 64
    assert any("quantization 64 from the sdxl model family" in m for m in r.logs("2"))
    r, _ = run(pipeline(mixed, {"resolution": "512", "quantization": 0}, model="builtin:tiny-sd"))
    assert r.output("2").settings.q == 8
    r, _ = run(pipeline(mixed, {"resolution": "512", "quantization": 0}))
    assert r.output("2").settings.q == 8
    assert any("no model connected" in m for m in r.logs("2", "warning"))


def test_aspect_sets_and_bucketing_off(mixed):
    r, _ = run(pipeline(mixed, {"aspects": "square"}))
    assert r.previews("2")["histogram"]["labels"] == ["64x64"]
    r, _ = run(pipeline(mixed, {"aspects": "moderate"}))
    assert "128x32" not in r.previews("2")["histogram"]["labels"]  # 4:1 is not moderate
    r, _ = run(pipeline(mixed, {"bucketing": "off", "resolution": "64"}))
    assert r.previews("2")["histogram"]["labels"] == ["64x64"]


def _square_folder(tmp_path, n):
    for i in range(n):
        write_image(tmp_path / "sq" / f"img_{i}.png", (64, 64), seed=i)
        (tmp_path / "sq" / f"img_{i}.txt").write_text(f"image {i}")
    write_image(tmp_path / "sq" / "lonely_wide.png", (128, 32), seed=50)
    return tmp_path / "sq"


def test_leftovers_are_reported_by_name(tmp_path):
    folder = _square_folder(tmp_path, 6)  # 6 squares + 1 wide, batch 4: 2 squares and the wide one left over
    r, _ = run(pipeline(folder, {"batch_size": 4, "leftovers": "drop"}))
    assert r.status == "done", r.error()
    warnings = r.logs("2", "warning")
    assert any("128x32" in w and "lonely_wide.png" in w and "skipped this epoch" in w for w in warnings)
    square = [w for w in warnings if "bucket 64x64" in w]
    assert len(square) == 1 and square[0].count("img_") == 2
    text = r.previews("2")["text"]["text"]
    assert "dropped this epoch (3)" in text and "lonely_wide.png" in text
    notes = {row[0]: row[5] for row in r.previews("2")["table"]["rows"]}
    assert len(notes) == 7 and notes["lonely_wide.png"].startswith("left over")
    assert sum(1 for n in notes.values() if n) == 3
    assert r.output("2").leftover == "drop"

    r, _ = run(pipeline(folder, {"batch_size": 4, "leftovers": "repeat"}))
    warnings = r.logs("2", "warning")
    assert any("repeated to fill batches" in w for w in warnings)
    assert "repeated to fill batches (5)" in r.previews("2")["text"]["text"]  # 3 for the wide one, 2 squares
    assert sum(r.previews("2")["histogram"]["counts"]) == 7  # the epoch's images, not the copies

    r, _ = run(pipeline(folder, {"batch_size": 4, "leftovers": "keep"}))
    assert not [w for w in r.logs("2", "warning") if "leftover" in w or "repeated" in w]
    assert sum(r.previews("2")["histogram"]["counts"]) == 7


def test_no_full_batch_is_an_error_that_says_why(tmp_path):
    folder = _square_folder(tmp_path, 3)
    r, _ = run(pipeline(folder, {"batch_size": 8}))
    assert r.status == "error"
    err = r.error()
    assert err["node"] == "2" and "no batch can be filled" in err["message"]
    assert "batch_size is 8" in err["message"] and "64x64: 3" in err["message"]
    r, _ = run(pipeline(folder, {"batch_size": 8}, {"concept_type": "validation"}))
    assert r.status == "error" and "validation" in r.error()["message"]


def test_several_datasets_combine_and_keep_their_settings(tmp_path, mixed):
    folder = _square_folder(tmp_path, 4)
    g = graph([("1", "Concept", {"folder": str(mixed), "name": "things", "loss_weight": 0.5}),
               ("2", "Concept", {"folder": str(folder), "repeats": 2.0}),
               ("3", "Bucketer", {"resolution": "64", "quantization": 8})],
              [("1", "dataset", "3", "datasets"), ("2", "dataset", "3", "datasets")])
    r, _ = run(g)
    assert r.status == "done", r.error()
    ds = r.output("3").dataset
    assert [c.name for c in ds.concepts] == ["things", "sq"]
    assert [c.settings.loss_weight for c in ds.concepts] == [0.5, 1.0]
    assert sum(r.previews("3")["histogram"]["counts"]) == 9 + 2 * 5
    g.set_param("2", "name", "things")
    r, _ = run(g)
    assert r.status == "error" and "unique" in r.error()["message"] and "different names" in r.error()["message"]


def test_small_images_fail_before_training_when_bad_images_are_errors(mixed):
    r, _ = run(pipeline(mixed, {"resolution": "512"}, {"on_bad_image": "skip"}))
    assert r.status == "done"
    g = graph([("1", "Concept", {"folder": str(mixed / "sub"), "name": "things", "on_bad_image": "error"}),
               ("2", "Bucketer", {"resolution": "512", "quantization": 8})], [("1", "dataset", "2", "datasets")])
    write_image(mixed / "sub" / "small.png", (100, 80))
    r, _ = run(g)
    assert r.status == "error"
    err = r.error()
    assert err["node"] == "2" and "small.png" in err["message"] and "upscaled" in err["message"]
    assert "concept 'things'" in err["message"]
