"""Epoch planning (buckets, shuffling, leftovers, resume) and loading planned items."""
import hashlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from app.ml.data.augment import AugmentSettings
from app.ml.data.batches import load_item, iter_loaded, plan_epoch, plan_validation, stack_batch
from app.ml.data.bucketing import BucketSettings
from app.ml.data.concept import ConceptSettings, scan_dataset
from app.ml.data.errors import DataError
from data_helpers import run_python, write_gradient, write_image

SD = BucketSettings("64", quantization=8)


def dataset(*settings):
    return scan_dataset(list(settings))


def test_batches_are_single_bucket_and_deterministic(shapes):
    ds = dataset(ConceptSettings("shapes", shapes))
    plan = plan_epoch(ds, SD, 2, seed=3, epoch=0)
    assert plan.iterations > 3
    for batch in plan.batches:
        assert len(batch) == 2 and len({i.bucket for i in batch}) == 1
    again = plan_epoch(ds, SD, 2, seed=3, epoch=0)
    assert again == plan
    other = plan_epoch(ds, SD, 2, seed=3, epoch=1)
    assert [i.path for i in other.items] != [i.path for i in plan.items]  # reshuffled each epoch
    hist = plan.bucket_histogram()
    assert sum(hist.values()) == len(plan.items)
    assert set(hist) <= {(64, 64), (72, 56), (56, 72), (80, 56), (56, 80)}


def test_every_sample_is_either_batched_or_reported_as_dropped(shapes):
    ds = dataset(ConceptSettings("shapes", shapes))
    plan = plan_epoch(ds, SD, 4, seed=0, epoch=0, leftover="drop")
    batched = [str(i.path) for i in plan.items]
    assert plan.report.dropped_files  # 18 images over several buckets cannot all fill batches of 4
    assert sorted(batched + plan.report.dropped_files) == sorted(str(s.path) for s in ds.concepts[0].samples)
    msgs = " ".join(plan.report.messages())
    for name in plan.report.dropped_files:
        assert name.rsplit("/", 1)[1] in msgs
    logged = []
    plan_epoch(ds, SD, 4, seed=0, epoch=0, log=logged.append)
    assert any("leftover" in m for m in logged)


def test_leftover_repeat_fills_batches_from_same_bucket(tmp_path):
    for i in range(3):
        write_image(tmp_path / f"sq{i}.png", (64, 64), seed=i)
    write_image(tmp_path / "wide.png", (128, 64), seed=9)
    ds = dataset(ConceptSettings("c", tmp_path))
    plan = plan_epoch(ds, SD, 4, seed=0, epoch=0, leftover="repeat")
    assert plan.iterations == 2 and not plan.report.dropped
    wide = [b for b in plan.batches if b[0].bucket != (64, 64)][0]
    assert {i.path.name for i in wide} == {"wide.png"} and len(wide) == 4
    rep = Counter(i.path.name for i in plan.report.repeated)
    assert rep["wide.png"] == 3 and sum(rep.values()) == 4  # 3 copies of wide + 1 square to make 4
    dropped = plan_epoch(ds, SD, 4, seed=0, epoch=0, leftover="drop")
    assert sorted(dropped.report.dropped_files) == sorted(str(tmp_path / n) for n in
                                                         ["sq0.png", "sq1.png", "sq2.png", "wide.png"])
    assert dropped.iterations == 0


def test_resume_plans_and_loads_same_epoch_in_fresh_process(shapes):
    aug = AugmentSettings(rotation=10, brightness=0.2, hue=0.05)
    ds = dataset(ConceptSettings("shapes", shapes, augment=aug))
    continuous = None
    for epoch in range(4):  # a continuous run plans every epoch in turn
        continuous = plan_epoch(ds, SD, 2, seed=42, epoch=epoch)
    here = [(i.path.name, i.caption, i.crop, hashlib.sha256(load_item(i).image.tobytes()).hexdigest())
            for i in continuous.items]
    code = f"""
import hashlib
from app.ml.data.augment import AugmentSettings
from app.ml.data.batches import load_item, plan_epoch
from app.ml.data.bucketing import BucketSettings
from app.ml.data.concept import ConceptSettings, scan_dataset
ds = scan_dataset([ConceptSettings("shapes", {str(shapes)!r}, augment=AugmentSettings(rotation=10, brightness=0.2, hue=0.05))])
plan = plan_epoch(ds, BucketSettings("64", quantization=8), 2, seed=42, epoch=3)
for i in plan.items:
    print(i.path.name, i.caption, *i.crop, hashlib.sha256(load_item(i).image.tobytes()).hexdigest())
"""
    there = [line.split() for line in run_python(code).splitlines()]
    assert [[n, *c.split(), *map(str, crop), h] for n, c, crop, h in here] == there


def test_load_item_range_shape_and_flip_follows_mask(tmp_path):
    write_gradient(tmp_path / "g.png", (64, 64))
    Image.open(tmp_path / "g.png").convert("L").save(tmp_path / "g-masklabel.png")
    ds = dataset(ConceptSettings("g", tmp_path, augment=AugmentSettings(flip="fixed")))
    item = plan_epoch(ds, SD, 1, seed=0, epoch=0).items[0]
    out = load_item(item)
    assert out.image.shape == (3, 64, 64) and out.image.dtype == np.float32
    assert out.image.min() == -1.0 and out.image.max() == 1.0
    assert out.image[0, :, :8].mean() > 0.9  # flipped: the white half is now on the left
    assert out.mask.shape == (64, 64) and out.mask[:, :8].mean() > 0.9 and out.mask[:, -8:].mean() < 0.1
    unflipped = load_item(item, augment_settings=AugmentSettings(flip="off"))
    assert unflipped.image[0, :, :8].mean() < -0.9


def test_crop_matches_plan_and_bucket_size(tmp_path):
    write_image(tmp_path / "wide.png", (200, 64), seed=1)  # 3.1:1, goes to a wide bucket
    ds = dataset(ConceptSettings("w", tmp_path, augment=AugmentSettings(flip="off", crop_jitter=True)))
    items = [plan_epoch(ds, SD, 1, seed=0, epoch=e).items[0] for e in range(10)]
    assert all(i.bucket == (112, 40) for i in items)  # the 1:3 bucket at R=64, q=8 (110.9 x 37.0)
    assert len({i.crop for i in items}) > 2  # jittered
    src = np.asarray(Image.open(tmp_path / "wide.png").resize(items[0].resize, Image.Resampling.LANCZOS))
    l, t, r, b = items[0].crop
    expected = src[t:b, l:r].astype(np.float32) / 127.5 - 1
    assert np.abs(load_item(items[0]).image.transpose(1, 2, 0) - expected).max() < 1e-5


def test_multi_resolution_draws_per_sample_and_concept_override(shapes, tmp_path):
    ds = dataset(ConceptSettings("shapes", shapes))
    bs = BucketSettings("32,64", quantization=8)
    plan = plan_epoch(ds, bs, 1, seed=0, epoch=0)
    areas = {i.bucket[0] * i.bucket[1] for i in plan.items}
    assert min(areas) < 40 * 40 < max(areas)  # some samples at 32, some at 64
    write_image(tmp_path / "o" / "a.png", (64, 64))
    ds2 = dataset(ConceptSettings("shapes", shapes), ConceptSettings("o", tmp_path / "o", resolution="32"))
    items = plan_epoch(ds2, SD, 1, seed=0, epoch=0).items
    assert {i.bucket for i in items if i.concept_index == 1} == {(32, 32)}


def test_loss_weight_and_prior_and_validation(shapes, tmp_path):
    write_image(tmp_path / "v" / "a.png", (64, 64))
    ds = dataset(ConceptSettings("shapes", shapes, loss_weight=0.5, concept_type="prior"),
                 ConceptSettings("val", tmp_path / "v", concept_type="validation"))
    plan = plan_epoch(ds, SD, 1, seed=0, epoch=0)
    assert {i.loss_weight for i in plan.items} == {0.5} and {i.concept_index for i in plan.items} == {0}
    val = plan_validation(ds, SD, 4)
    assert [i.path.name for i in val.items] == ["a.png"] and val.items[0].augment_params.is_identity


def test_upscaled_images_warn_or_fail(tmp_path):
    write_image(tmp_path / "tiny.png", (20, 20))
    write_image(tmp_path / "big.png", (80, 80))
    ds = dataset(ConceptSettings("c", tmp_path))
    plan = plan_epoch(ds, SD, 1, seed=0, epoch=0)
    assert [p.path.rsplit("/", 1)[1] for p in plan.report.problems] == ["tiny.png"]
    assert plan.report.problems[0].severity == "warning" and "upscaled" in plan.report.problems[0].message
    strict = dataset(ConceptSettings("c", tmp_path, on_bad_image="error"))
    with pytest.raises(DataError, match="tiny.png"):
        plan_epoch(strict, SD, 1, seed=0, epoch=0)
    no_up = plan_epoch(strict, BucketSettings("64", quantization=8, no_upscale=True), 1, seed=0, epoch=0)
    tiny = [i for i in no_up.items if i.path.name == "tiny.png"][0]
    assert tiny.bucket == (16, 16) and not no_up.report.problems


def test_bad_image_at_load_time_names_file(tmp_path):
    write_image(tmp_path / "a.png", (64, 64))
    ds = dataset(ConceptSettings("c", tmp_path))
    item = plan_epoch(ds, SD, 1, seed=0, epoch=0).items[0]
    write_image(tmp_path / "a.png", (64, 32))
    with pytest.raises(DataError, match="rescan") as e:
        load_item(item)
    assert "a.png" in str(e.value) and "concept 'c'" in str(e.value)
    (tmp_path / "a.png").write_bytes(b"broken after the scan")
    with pytest.raises(DataError, match="a.png") as e:
        load_item(item)
    assert "concept 'c'" in str(e.value)


def test_threaded_loader_matches_serial_and_stacks(shapes):
    ds = dataset(ConceptSettings("shapes", shapes, augment=AugmentSettings(rotation=5)))
    plan = plan_epoch(ds, SD, 2, seed=1, epoch=0)
    serial = [x.image for x in iter_loaded(plan.items)]
    threaded = [x.image for x in iter_loaded(plan.items, workers=2, prefetch=3)]
    assert len(serial) == len(plan.items) and all(np.array_equal(a, b) for a, b in zip(serial, threaded))
    images, masks = stack_batch([load_item(i) for i in plan.batches[0]])
    assert images.shape[0] == 2 and masks is None
