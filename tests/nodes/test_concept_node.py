"""Concept node through the real executor: what it finds, what it reports, how it fails."""
from __future__ import annotations

from dataset_node_helpers import bump_mtime, graph, png_size, run, write_image


def concept(folder, **params):
    return graph([("1", "Concept", {"folder": str(folder), "name": "things", **params})])


def test_concept_scans_mixed_folder_and_reports_everything(mixed):
    r, _ = run(concept(mixed))
    assert r.status == "done", r.error()
    ds = r.output("1")
    (c,) = ds.concepts
    assert c.name == "things" and len(c.samples) == 9
    assert {s.path.name for s in c.samples}.isdisjoint({"broken.png", "notanimage.jpg"})
    by_name = {s.path.stem: s for s in c.samples}
    assert by_name["tall"].caption_lines == ("things",) and by_name["tall"].caption_source == "concept_name"
    assert by_name["port_a"].mask_path is not None

    logs = "\n".join(r.logs("1"))
    assert "9 of 11 images usable" in logs
    assert "concept name 'things'" in logs  # the fallback is said out loud
    warnings = r.logs("1", "warning")
    assert any("broken.png" in w and "things" in w for w in warnings)
    assert any("notanimage.jpg" in w for w in warnings)
    assert any("wide.txt" in w and "empty" in w for w in warnings)

    p = r.previews("1")
    assert set(p) == {"images", "table", "text"}
    imgs = p["images"]
    assert 1 <= len(imgs["images"]) <= 8 and len(imgs["captions"]) == len(imgs["images"])
    assert all(max(png_size(b)) <= 96 for b in imgs["images"])
    rows = dict((k, v) for k, v in p["table"]["rows"])
    assert rows["masks found"] == 1
    assert rows["iterations / epoch (batch 1)"] == 9
    assert "broken.png" in rows["skipped files"] and "notanimage.jpg" in rows["skipped files"]
    assert "concept name" in rows["captions"]
    assert "broken.png" in p["text"]["text"]


def test_caption_sources_repeats_and_kohya_folders(tmp_path):
    root = tmp_path / "data"
    for i in range(4):
        write_image(root / "3_dog" / f"good_boy_{i}.png", (64, 64), seed=i)
    write_image(root / "cat_sitting.png", (64, 96), seed=9)
    (tmp_path / "all.txt").write_text("a photo\nanother photo\n")

    r, _ = run(concept(root, prompt_source="filename", repeats=1.5))
    assert r.status == "done", r.error()
    (c,) = r.output("1").concepts
    caps = {s.path.name: s.caption_lines for s in c.samples}
    assert caps["good_boy_0.png"] == ("good boy 0",) and caps["cat_sitting.png"] == ("cat sitting",)
    assert {s.repeats for s in c.samples} == {4.5, 1.5}
    rows = dict(r.previews("1")["table"]["rows"])
    assert rows["iterations / epoch (batch 1)"] == 4 * 4 + 2 + 1  # 4 x floor(4.5) + half of 4, then floor(1.5) (+ 0 of 0.5 in epoch 1)

    r, _ = run(concept(root, prompt_source="concept_file", caption_file=str(tmp_path / "all.txt")))
    assert r.status == "done", r.error()
    assert {s.caption_lines for s in r.output("1").concepts[0].samples} == {("a photo", "another photo")}

    r, _ = run(concept(root, balancing="samples", samples_per_epoch=3))
    assert dict(r.previews("1")["table"]["rows"])["iterations / epoch (batch 1)"] == 3

    # missing captions: the kohya folder's name is the fallback, and the preview says so
    r, _ = run(concept(root))
    assert "concept name 'dog', 'things'" in dict(r.previews("1")["table"]["rows"])["captions"]


def test_text_augmentation_and_settings_reach_the_dataset(mixed):
    r, _ = run(concept(mixed, keep_tags=1, shuffle_tags=True, tag_dropout=0.2, caption_dropout=0.1,
                       delimiter=";", loss_weight=0.5, concept_type="prior"))
    s = r.output("1").concepts[0].settings
    assert (s.text_augment.keep_tags, s.text_augment.shuffle_tags, s.text_augment.tag_dropout,
            s.text_augment.caption_dropout, s.text_augment.delimiter) == (1, True, 0.2, 0.1, ";")
    assert s.loss_weight == 0.5 and s.concept_type == "prior"


def test_bad_images_with_error_policy_fail_naming_file_node_and_concept(mixed):
    r, _ = run(concept(mixed, on_bad_image="error"))
    assert r.status == "error"
    err = r.error()
    assert err["node"] == "1" and err["type"] == "Concept"
    assert "broken.png" in err["message"] and "notanimage.jpg" in err["message"]
    assert "concept 'things'" in err["message"] and "on_bad_image='error'" in err["message"]
    assert r.result.error.startswith("node 1 (Concept):")
    assert "Traceback" not in err["message"]


def test_missing_caption_error_policy_names_the_image(mixed):
    r, _ = run(concept(mixed, missing_caption="error"))
    assert r.status == "error"
    msg = r.error()["message"]
    assert "tall.png" in msg and "no caption" in msg and "wide.png" in msg  # the empty caption too


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    r, _ = run(concept(tmp_path / "nope"))
    assert r.status == "error" and "does not exist" in r.error()["message"]
    assert str(tmp_path / "nope") in r.error()["message"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("hi")
    r, _ = run(concept(tmp_path / "empty"))
    assert r.status == "error" and "contains no images" in r.error()["message"]


def test_editing_an_image_reruns_concept(mixed):
    g = concept(mixed)
    r, ex = run(g)
    assert r.ran("1")
    r, _ = run(g, ex)
    assert not r.ran("1") and "1" in r.result.cached
    write_image(mixed / "square_a.png", (64, 64), seed=99)
    bump_mtime(mixed / "square_a.png")
    r, _ = run(g, ex)
    assert r.ran("1")
