"""Masks node and app/ml/data/masking.py: a tiny random-weight CLIPSeg saved as a model folder and loaded
through transformers' own classes (no download), and masks from the alpha channel. Masks have the image's
size and the values the settings ask for; files are written beside the images only when asked and an
existing mask is never replaced without a backup."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "nodes"))

from dataset_node_helpers import graph, run, write_image  # noqa: E402

TOKENIZER = HERE.parents[1] / "app" / "ml" / "models" / "assets" / "tiny_clip_tokenizer"


def make_tiny_clipseg(folder: Path) -> Path:
    import torch
    from transformers import (CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor, CLIPTokenizer,
                              ViTImageProcessor)

    tok = CLIPTokenizer.from_pretrained(str(TOKENIZER))
    proc = CLIPSegProcessor(image_processor=ViTImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = CLIPSegConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=37, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=32, reduce_dim=16, extract_layers=[1], decoder_num_attention_heads=2,
        decoder_intermediate_size=37)
    torch.manual_seed(0)
    CLIPSegForImageSegmentation(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clipseg(tmp_path_factory):
    return make_tiny_clipseg(tmp_path_factory.mktemp("models") / "tiny-clipseg")


def make_images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(folder / f"img{i}.png", (40 + 12 * i, 30), seed=i)
    return folder


def masks_graph(folder, **params):
    p = {"source": "clipseg", "prompt": "a red circle", "batch_size": 2}
    p.update(params)
    return graph([("c", "Concept", {"folder": str(folder)}), ("m", "Masks", p)],
                 links=[("c", "dataset", "m", "dataset")])


def mask_of(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "L"
        return np.asarray(im)


def test_clipseg_masks_flow_in_the_dataset_at_each_images_size(tmp_path, clipseg):
    data = make_images(tmp_path / "data")
    before = sorted(p.name for p in data.iterdir())
    r, _ = run(masks_graph(data, model_folder=str(clipseg), threshold=0.0), workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    samples = r.output("m").concepts[0].samples
    for s in samples:
        m = mask_of(s.mask_path)
        with Image.open(s.path) as im:
            assert m.shape == (im.size[1], im.size[0])
        assert set(np.unique(m)) == {255}  # threshold 0: every pixel is learned
        assert (tmp_path / "ws") in s.mask_path.parents  # kept in the workspace
    assert sorted(p.name for p in data.iterdir()) == before
    prev = r.previews("m")["images"]
    assert len(prev["images"]) == 3 and "learned" in prev["captions"][0]
    assert len([e for e in r.of("preview", "m") if e["kind"] == "images"]) == 1
    # the same model and prompt: threshold 1.0 + invert learns everything too; threshold 1.0 alone nothing
    r, _ = run(masks_graph(data, model_folder=str(clipseg), threshold=1.0), workspace=tmp_path / "ws")
    assert all(set(np.unique(mask_of(s.mask_path))) == {0} for s in r.output("m").concepts[0].samples)
    r, _ = run(masks_graph(data, model_folder=str(clipseg), threshold=1.0, invert=True), workspace=tmp_path / "ws")
    assert all(set(np.unique(mask_of(s.mask_path))) == {255} for s in r.output("m").concepts[0].samples)


def test_clipseg_scores_are_probabilities_of_the_image_size(clipseg):
    from app.ml.data.masking import load_segmenter

    seg = load_segmenter(clipseg)
    imgs = [Image.new("RGB", (50, 20), (200, 0, 0)), Image.new("RGB", (17, 33), (0, 0, 200))]
    out = seg.scores(imgs, "a red circle")
    assert [o.shape for o in out] == [(20, 50), (33, 17)]
    assert all(0.0 <= o.min() <= o.max() <= 1.0 for o in out)
    one = seg.scores(imgs[:1], "a red circle")  # one image: the model drops the batch axis
    assert one[0].shape == (20, 50)
    np.testing.assert_allclose(one[0], out[0], atol=1e-5)


def test_alpha_masks_written_beside_images_never_clobber(tmp_path):
    ws = tmp_path / "ws"
    data = ws / "data"
    data.mkdir(parents=True)
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 128
    rgba[5:15, 10:20, 3] = 255  # an opaque 10x10 square
    Image.fromarray(rgba, "RGBA").save(data / "cut.png")
    write_image(data / "plain.png", (24, 24))  # no alpha: warned about, keeps no mask
    r, _ = run(masks_graph(data, source="alpha", threshold=0.5, write_beside=str(data)), workspace=ws)
    assert r.status == "done", r.error()
    m = mask_of(data / "cut-masklabel.png")
    assert m.shape == (20, 30) and int((m == 255).sum()) == 100 and set(np.unique(m)) == {0, 255}
    assert not (data / "plain-masklabel.png").exists()
    assert any("no alpha channel" in w and "plain.png" in w for w in r.logs("m", "warning"))
    by_name = {s.path.name: s for s in r.output("m").concepts[0].samples}
    assert by_name["cut.png"].mask_path == data / "cut-masklabel.png" and by_name["plain.png"].mask_path is None

    # remaking every mask with dilate: the first mask is kept as a backup
    first = (data / "cut-masklabel.png").read_bytes()
    r, _ = run(masks_graph(data, source="alpha", threshold=0.5, dilate=2, images="all", write_beside=str(data)),
               workspace=ws)
    assert r.status == "done", r.error()
    assert (data / "cut-masklabel.png.bak").read_bytes() == first
    assert int((mask_of(data / "cut-masklabel.png") == 255).sum()) == 14 * 14
    assert not list(data.glob(".nodetrainer-tmp-*"))


def test_finish_mask_threshold_dilate_blur_invert():
    from app.ml.data.masking import MaskSettings, finish_mask

    score = np.zeros((16, 16), np.float32)
    score[6:10, 6:10] = 0.9
    hard = finish_mask(score, MaskSettings(threshold=0.5))
    assert hard.dtype == np.uint8 and int((hard == 255).sum()) == 16 and set(np.unique(hard)) == {0, 255}
    assert int((finish_mask(score, MaskSettings(threshold=0.5, dilate=1)) == 255).sum()) == 36
    soft = finish_mask(score, MaskSettings(threshold=0.5, blur=1.5))
    assert 0 < soft[5, 5] < 255 and soft[0, 0] == 0
    np.testing.assert_array_equal(finish_mask(score, MaskSettings(threshold=0.5, invert=True)), 255 - hard)
    with pytest.raises(ValueError):
        MaskSettings(threshold=1.5)


@pytest.mark.parametrize("case", ["missing", "not_clipseg"])
def test_bad_mask_model_folder_is_a_clear_error(tmp_path, case):
    data = make_images(tmp_path / "data", 1)
    model = tmp_path / "model"
    if case == "not_clipseg":
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "blip"}')
    r, _ = run(masks_graph(data, model_folder=str(model)), workspace=tmp_path / "ws")
    err = r.error()
    assert r.status == "error" and err["node"] == "m" and str(model) in err["message"]
    assert ("not found" if case == "missing" else "not CLIPSeg") in err["message"]


def test_an_unavailable_device_for_clipseg_is_a_clear_error(clipseg):
    import torch

    from app.ml.data.errors import DataError
    from app.ml.data.masking import load_segmenter

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DataError, match="cannot use device 'cuda'") as err:
        load_segmenter(clipseg, "cuda")
    assert str(clipseg) in str(err.value)


def test_many_masks_show_one_preview_of_the_first_eight_as_soon_as_they_exist(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(10):
        rgba = np.full((16, 16 + i, 4), 128, np.uint8)
        rgba[..., 3] = 255 if i % 2 else 0
        Image.fromarray(rgba, "RGBA").save(data / f"img{i}.png")
    (data / "img9.png").unlink()
    for i in range(3):
        write_image(data / f"plain{i}.png", (16, 16))  # no alpha: named in the warning
    r, _ = run(masks_graph(data, source="alpha", batch_size=3), workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    events = [e for e in r.events if e.get("node") == "m" and e["event"] in ("preview", "progress")]
    images = [i for i, e in enumerate(events) if e["event"] == "preview" and e["kind"] == "images"]
    assert len(images) == 1 and len(events[images[0]]["images"]) == 8
    assert events[images[0]]["captions"][0].endswith("% learned")
    assert any(e["event"] == "progress" for e in events[images[0] + 1:])  # sent before the run ended
    warning = next(w for w in r.logs("m", "warning") if "no alpha channel" in w)
    assert warning.startswith("3 images have no alpha channel") and "plain0.png" in warning


def test_dataset_tools_share_their_preview_and_error_steps():
    from nodes import dataset_tools as tools

    sent = []

    class Ctx:
        def preview(self, kind, **payload):
            sent.append((kind, payload))

    shown = tools._Shown(Ctx())
    img = Image.new("RGB", (300, 200))
    for i in range(tools.PREVIEW_IMAGES - 1):
        shown.add(img, f"t{i}")
    shown.send()
    assert not sent  # not yet: fewer than PREVIEW_IMAGES and not the end
    shown.add(img, "last")
    shown.add(img, "one too many")
    shown.send()
    shown.send(final=True)
    assert len(sent) == 1 and len(sent[0][1]["images"]) == tools.PREVIEW_IMAGES
    assert sent[0][1]["captions"][-1] == "last" and not shown.wants()
    few = tools._Shown(Ctx())
    few.add(img, "only")
    few.send(final=True)
    assert len(sent) == 2 and sent[1][1]["captions"] == ["only"]
    assert tools._names([Path(f"{i}.png") for i in range(12)]) == "0.png, 1.png, 2.png, 3.png, 4.png, 5.png, " \
                                                                    "6.png, 7.png, 8.png, 9.png ..."
    err = tools._device_failure("mask generation", "cuda", RuntimeError("CUDA out of memory\ntrace"))
    assert str(err) == "mask generation failed on cuda (CUDA out of memory); lower batch_size or use another device"
