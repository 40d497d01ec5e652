"""The generated shapes dataset and the rng helpers."""
import hashlib

from app.ml.data.concept import ConceptSettings, scan_concept
from app.ml.data.demo import make_shapes_dataset
from app.ml.data.rng import purpose_id, rng_for, stable_key


def folder_hash(folder):
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_shapes_dataset_is_deterministic_captioned_and_mixed(tmp_path):
    paths = make_shapes_dataset(tmp_path / "a", n_per_class=2, size=64, seed=1)
    make_shapes_dataset(tmp_path / "b", n_per_class=2, size=64, seed=1)
    make_shapes_dataset(tmp_path / "c", n_per_class=2, size=64, seed=2)
    assert len(paths) == 12
    assert folder_hash(tmp_path / "a") == folder_hash(tmp_path / "b") != folder_hash(tmp_path / "c")
    c = scan_concept(ConceptSettings("shapes", tmp_path / "a"))
    caps = {s.caption_lines[0] for s in c.samples}
    assert caps == {f"{col} {sh}" for col in ("red", "blue") for sh in ("circle", "square", "triangle")}
    assert len({s.size for s in c.samples}) > 1 and c.report.captions_missing == 0


def test_red_images_are_red(tmp_path):
    import numpy as np
    from PIL import Image

    for p in make_shapes_dataset(tmp_path, n_per_class=2, size=48, seed=0):
        arr = np.asarray(Image.open(p)).astype(int)
        shape_px = arr[(arr.max(axis=2) - arr.min(axis=2)) > 100]  # strongly coloured pixels
        r, g, b = shape_px.mean(axis=0)
        assert (r > b) == p.name.startswith("red"), p.name


def test_rng_is_pure_and_purposes_are_separate():
    assert purpose_id("flip") == 2600395861  # crc32: same in every process and Python version
    a = rng_for(1, 2, (3, 4), "flip").random(3)
    assert (a == rng_for(1, 2, (3, 4), "flip").random(3)).all()
    assert not (a == rng_for(1, 2, (3, 4), "crop").random(3)).all()
    assert not (a == rng_for(1, 3, (3, 4), "flip").random(3)).all()
    assert not (a == rng_for(1, 2, (3, 4), "flip", variation=2).random(3)).all()
    assert not (rng_for(0, 0, (1, 2), "x").random() == rng_for(0, 0, (1, 2, 0), "x").random())
    assert stable_key("c", "a.png") == stable_key("c", "a.png") != stable_key("c", "b.png")
