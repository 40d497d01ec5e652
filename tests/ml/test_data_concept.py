"""Concept scanning, reports, balancing (repeats / samples) and what each epoch contains."""
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from app.ml.data.concept import (
    Concept,
    ConceptSettings,
    Dataset,
    ScanReport,
    Sample,
    combine,
    concept_epoch_samples,
    epoch_samples,
    iterations_per_epoch,
    scan_concept,
    scan_dataset,
    validation_samples,
)
from app.ml.data.errors import DataError
from data_helpers import write_image, write_truncated_jpeg


def fake_concept(n, index=0, **settings) -> Concept:
    """A concept of n samples without files (epoch composition needs no pixels)."""
    s = ConceptSettings(name=settings.pop("name", f"c{index}"), folder="/nowhere", **settings)
    samples = tuple(
        Sample(Path(f"/nowhere/{i}.png"), f"{i}.png", (64, 64), ("x",), "file", None, s.repeats, index, i)
        for i in range(n)
    )
    return Concept(s, index, samples, ScanReport(s.name, "/nowhere", images=n, files=n))


def test_report_counts_and_problems_name_files(tmp_path):
    for i in range(4):
        write_image(tmp_path / f"img{i}.png", seed=i)
    (tmp_path / "img0.txt").write_text("zero")
    (tmp_path / "img1.txt").write_text("one")
    write_image(tmp_path / "img0-masklabel.png")
    write_truncated_jpeg(tmp_path / "broken.jpg")
    (tmp_path / "fake.webp").write_bytes(b"RIFF\x00\x00")
    c = scan_concept(ConceptSettings("mix", tmp_path, on_bad_image="skip"))
    r = c.report
    assert (r.files, r.images) == (6, 4)
    assert (r.captions_found, r.captions_missing) == (2, 2)
    assert (r.masks_found, r.masks_missing) == (1, 3)
    assert sorted(Path(p.path).name for p in r.skipped) == ["broken.jpg", "fake.webp"]
    assert all(p.concept == "mix" for p in r.problems)
    summary = r.summary()
    assert "broken.jpg" in summary and "fake.webp" in summary and "4 of 6" in summary
    assert [s.rel for s in c.samples] == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert c.samples[0].mask_path is not None and c.samples[1].mask_path is None


def test_on_bad_image_error_fails_listing_every_bad_file(tmp_path):
    write_image(tmp_path / "ok.png")
    write_truncated_jpeg(tmp_path / "b1.jpg")
    (tmp_path / "b2.png").write_bytes(b"nope")
    with pytest.raises(DataError) as e:
        scan_concept(ConceptSettings("strict", tmp_path, on_bad_image="error"))
    msg = str(e.value)
    assert "b1.jpg" in msg and "b2.png" in msg and "strict" in msg and "ok.png" not in msg


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images") as e:
        scan_concept(ConceptSettings("e", tmp_path / "empty"))
    assert "concept 'e'" in str(e.value) and str(tmp_path / "empty") in str(e.value)
    with pytest.raises(DataError, match="does not exist") as e:
        scan_concept(ConceptSettings("m", tmp_path / "missing"))
    assert "concept 'm'" in str(e.value)
    (tmp_path / "allbad").mkdir()
    (tmp_path / "allbad" / "x.png").write_bytes(b"zz")
    with pytest.raises(DataError, match="no usable images"):
        scan_concept(ConceptSettings("b", tmp_path / "allbad"))


def test_kohya_repeats_multiply_concept_repeats(tmp_path):
    write_image(tmp_path / "3_dog" / "a.png")
    write_image(tmp_path / "b.png")
    c = scan_concept(ConceptSettings("d", tmp_path, repeats=2.0))
    reps = {s.rel: s.repeats for s in c.samples}
    assert reps == {"3_dog/a.png": 6.0, "b.png": 2.0}
    counts = Counter(concept_epoch_samples(c, seed=0, epoch=0))
    assert counts == {0: 6, 1: 2}


def test_fractional_repeats_take_share_per_epoch_and_rotate():
    c = fake_concept(5000, repeats=0.0072)
    per_epoch = [concept_epoch_samples(c, 1, e) for e in range(20)]
    assert all(len(p) == 36 for p in per_epoch)
    assert per_epoch[0] != per_epoch[1]
    seen = [i for p in per_epoch for i in p]
    assert len(set(seen)) == len(seen)  # rotates through images before repeating any
    c = fake_concept(7, repeats=1.3)
    counts = [len(concept_epoch_samples(c, 0, e)) for e in range(100)]
    assert set(counts) <= {9, 10} and np.mean(counts) == pytest.approx(9.1, abs=0.01)
    # every image appears at least once per epoch (integer part), all share the extra ones
    per_image = Counter(i for e in range(100) for i in concept_epoch_samples(c, 0, e))
    assert min(per_image.values()) >= 100 and max(per_image.values()) - min(per_image.values()) <= 1


def test_samples_per_epoch_balancing():
    c = fake_concept(10, balancing="samples", samples_per_epoch=4)
    eps = [concept_epoch_samples(c, 0, e) for e in range(5)]
    assert all(len(e) == 4 for e in eps)
    first_two = eps[0] + eps[1]
    assert len(set(first_two)) == 8  # no image twice before all have been seen
    assert set(Counter(i for e in eps for i in e).values()) == {2}  # 20 draws = two full cycles
    c = fake_concept(3, balancing="samples", samples_per_epoch=7)
    assert sorted(Counter(concept_epoch_samples(c, 0, 0)).values()) == [2, 2, 3]


def test_epoch_is_pure_function_of_seed_and_epoch():
    c = fake_concept(100, repeats=0.35)
    ds = Dataset((c,))
    assert epoch_samples(ds, 7, 4) == epoch_samples(ds, 7, 4)
    assert epoch_samples(ds, 7, 4) != epoch_samples(ds, 8, 4)


def test_validation_concepts_are_not_trained_and_prior_is():
    ds = combine([fake_concept(3, name="main"), fake_concept(2, name="val", concept_type="validation"),
                  fake_concept(4, name="prior", concept_type="prior", loss_weight=0.5)])
    pairs = epoch_samples(ds, 0, 0)
    assert {ci for ci, _ in pairs} == {0, 2}
    assert validation_samples(ds) == [(1, 0), (1, 1)]
    assert iterations_per_epoch(ds, 2) == 4  # 7 samples / 2, upper bound before bucketing
    assert [c.index for c in ds.concepts] == [0, 1, 2]
    assert all(s.concept_index == 2 for s in ds.concepts[2].samples)


def test_scan_dataset_progress_and_unique_names(tmp_path):
    write_image(tmp_path / "a" / "x.png")
    write_image(tmp_path / "b" / "y.png")
    calls = []
    ds = scan_dataset([ConceptSettings("a", tmp_path / "a"), ConceptSettings("b", tmp_path / "b")],
                      progress=lambda v, t: calls.append((v, t)))
    assert calls[-1] == (2, 2) and ds.sample(1, 0).rel == "y.png" and ds.sample(1, 0).concept_index == 1
    with pytest.raises(DataError, match="unique"):
        scan_dataset([ConceptSettings("a", tmp_path / "a"), ConceptSettings("a", tmp_path / "b")])


def test_scan_can_be_cancelled(tmp_path):
    from app.ml.data.errors import DataCancelled

    for i in range(3):
        write_image(tmp_path / f"{i}.png")
    with pytest.raises(DataCancelled):
        scan_concept(ConceptSettings("c", tmp_path), check_cancel=lambda: True)


def test_settings_are_validated_with_concept_name():
    with pytest.raises(ValueError, match="concept 'x'.*balancing"):
        ConceptSettings("x", ".", balancing="weird")
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ConceptSettings("x", ".", balancing="samples")
