"""Caption sources, missing-caption policies and text augmentation."""
import numpy as np
import pytest

from app.ml.data.captions import (
    TextAugment,
    augment_caption,
    caption_from_filename,
    caption_path_for,
    read_caption_lines,
)
from app.ml.data.concept import ConceptSettings, scan_concept
from app.ml.data.errors import DataError
from app.ml.data.rng import rng_for
from data_helpers import write_image


def test_caption_pairing_and_filename_source(tmp_path):
    assert caption_path_for(tmp_path / "photo.png") == tmp_path / "photo.txt"
    assert caption_from_filename("x/sunset_beach.png") == "sunset beach"
    assert caption_from_filename("a__b  c.jpg") == "a b c"


def test_per_image_captions_and_photo_png_txt_does_not_pair(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat\n")
    write_image(tmp_path / "photo.png")
    (tmp_path / "photo.png.txt").write_text("never used")
    c = scan_concept(ConceptSettings("pets", tmp_path))
    by = {s.rel: s for s in c.samples}
    assert by["a.png"].caption_lines == ("a cat",)
    assert by["photo.png"].caption_lines == ("pets",)  # fallback: concept name
    assert by["photo.png"].caption_source == "concept_name"
    assert c.report.captions_found == 1 and c.report.captions_missing == 1
    assert any("no caption" in n for n in c.report.notes)
    with pytest.raises(DataError) as e:
        scan_concept(ConceptSettings("pets", tmp_path, missing_caption="error"))
    msg = str(e.value)
    assert "photo.png" in msg and "rename it to photo.txt" in msg and "pets" in msg


def test_missing_caption_policies(tmp_path):
    write_image(tmp_path / "5_ohwx man" / "x.png")
    c = scan_concept(ConceptSettings("people", tmp_path))
    assert c.samples[0].caption_lines == ("ohwx man",)  # kohya folder name wins over concept name
    c = scan_concept(ConceptSettings("people", tmp_path, missing_caption="empty"))
    assert c.samples[0].caption_lines == ("",)


def test_empty_caption_file_is_a_reported_problem(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("  \n\n")
    c = scan_concept(ConceptSettings("c", tmp_path))
    assert [p.path for p in c.report.problems] == [str(tmp_path / "a.txt")]
    assert "empty" in c.report.problems[0].message
    assert c.report.captions_missing == 1


def test_non_utf8_caption_is_reported(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf\xe9")
    c = scan_concept(ConceptSettings("c", tmp_path))
    assert "UTF-8" in c.report.problems[0].message and c.report.problems[0].path.endswith("a.txt")


def test_concept_file_and_filename_sources(tmp_path):
    write_image(tmp_path / "sunset_beach.png")
    (tmp_path / "all.txt").write_text("style one\nstyle two\n")
    c = scan_concept(ConceptSettings("s", tmp_path, prompt_source="concept_file", caption_file="all.txt"))
    assert c.samples[0].caption_lines == ("style one", "style two")
    c = scan_concept(ConceptSettings("s", tmp_path, prompt_source="filename"))
    assert c.samples[0].caption_lines == ("sunset beach",)
    with pytest.raises(DataError, match="missing.txt"):
        scan_concept(ConceptSettings("s", tmp_path, prompt_source="concept_file", caption_file="missing.txt"))


def test_multiline_caption_one_line_per_epoch_deterministic(tmp_path):
    from app.ml.data.batches import plan_epoch
    from app.ml.data.bucketing import BucketSettings
    from app.ml.data.concept import Dataset

    write_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n")
    assert read_caption_lines(tmp_path / "a.txt") == ["one", "two", "three"]
    ds = Dataset((scan_concept(ConceptSettings("c", tmp_path)),))
    bs = BucketSettings("64", quantization=8)
    caps = [plan_epoch(ds, bs, 1, seed=5, epoch=e).items[0].caption for e in range(30)]
    assert set(caps) == {"one", "two", "three"}
    assert caps == [plan_epoch(ds, bs, 1, seed=5, epoch=e).items[0].caption for e in range(30)]


def test_tag_shuffle_keeps_first_tags_and_is_pure():
    text = "ohwx, man, red shirt, smiling, outdoors, hat"
    aug = TextAugment(shuffle_tags=True, keep_tags=2)
    outs = {augment_caption(text, aug, rng_for(1, e, 0, "t")) for e in range(40)}
    assert len(outs) > 5
    for o in outs:
        tags = o.split(", ")
        assert tags[:2] == ["ohwx", "man"] and sorted(tags) == sorted(text.split(", "))
    assert augment_caption(text, aug, rng_for(1, 3, 0, "t")) == augment_caption(text, aug, rng_for(1, 3, 0, "t"))


def test_tag_and_caption_dropout_rates():
    text = ",".join(f"t{i}" for i in range(10))
    aug = TextAugment(keep_tags=1, tag_dropout=0.3, delimiter=",")
    kept = [len(augment_caption(text, aug, rng_for(0, e, 0, "t")).split(", ")) - 1 for e in range(500)]
    assert abs(np.mean(kept) / 9 - 0.7) < 0.05
    assert all(augment_caption(text, aug, rng_for(0, e, 0, "t")).startswith("t0") for e in range(50))
    aug = TextAugment(caption_dropout=0.2)
    empty = sum(augment_caption("a, b", aug, rng_for(0, e, 0, "t")) == "" for e in range(1000))
    assert 150 < empty < 250


def test_custom_delimiter_and_validation():
    aug = TextAugment(shuffle_tags=True, keep_tags=1, delimiter="|")
    out = augment_caption("a|b|c|d", aug, rng_for(0, 0, 0, "t"))
    assert out.startswith("a| ") and sorted(out.split("| ")) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError):
        TextAugment(tag_dropout=1.5)
