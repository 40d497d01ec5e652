"""Caption node and app/ml/data/captioning.py with a tiny random-weight BLIP saved as a model folder and
loaded through transformers' own classes (no download): every image gets a caption, files are written
only when asked and never clobbered, bad folders are clear errors; the ignore list and the text cache."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "nodes"))

from dataset_node_helpers import graph, registry, run, write_image  # noqa: E402

WORDS = "a photo of red green blue circle square cat dog on the with".split()


def make_tiny_blip(folder: Path) -> Path:
    """A BLIP captioner of the real classes, 32-wide, with a generated WordPiece vocabulary."""
    import torch
    from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor,
                              BlipProcessor)

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    proc = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37, encoder_hidden_size=32, bos_token_id=5, pad_token_id=0,
                         sep_token_id=3),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(cfg).save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def make_tiny_florence2(folder: Path) -> Path:
    """A Florence-2 (transformers-native classes: DaViT vision tower + BART) 32-wide, with a byte-level BPE
    tokenizer of single bytes (no merges) and the image token the processor needs."""
    import json

    import torch
    from transformers import (BartTokenizer, CLIPImageProcessor, Florence2Config, Florence2ForConditionalGeneration,
                              Florence2Processor)

    from app.ml.models.tokenizers import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    vocab["<mask>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = BartTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                            do_center_crop=False)
    ip.image_seq_length = 17  # 32 px / stride 4 / stride 2 = 4x4 patches, plus the pooled one
    proc = Florence2Processor(image_processor=ip, tokenizer=tok)
    cfg = Florence2Config(
        text_config=dict(model_type="bart", vocab_size=len(tok), d_model=32, encoder_layers=1, decoder_layers=1,
                         encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                         max_position_embeddings=128, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id),
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[16, 32], num_heads=[2, 2], num_groups=[2, 2],
                           window_size=2, projection_dim=32, drop_path_rate=0.0),
        image_token_id=tok.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(cfg)
    model.generation_config.min_new_tokens = 3  # random weights would often stop at once
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


def make_tiny_qwen25_vl(folder: Path) -> Path:
    """A Qwen2.5-VL (transformers' own classes) 32-wide: single-byte BPE tokenizer with Qwen's special tokens,
    the image processor with 28-pixel merged patches, one vision and one text layer."""
    import json

    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLImageProcessor

    from app.ml.models.tokenizers import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {}
    for ch in bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = Qwen2Tokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tok.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
                               temporal_patch_size=2)
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], bos_token_id=None),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=37, num_heads=2, out_hidden_size=32,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.min_new_tokens = 3
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return make_tiny_qwen25_vl(tmp_path_factory.mktemp("models") / "tiny-qwen25vl")


@pytest.fixture(scope="module")
def florence(tmp_path_factory):
    return make_tiny_florence2(tmp_path_factory.mktemp("models") / "tiny-florence2")


@pytest.fixture(scope="module")
def blip(tmp_path_factory):
    return make_tiny_blip(tmp_path_factory.mktemp("models") / "tiny-blip")


def make_images(folder: Path, n: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        write_image(folder / f"img{i}.png", (40 + 8 * i, 32), seed=i)
    return folder


def caption_graph(folder, model, **params):
    p = {"model_folder": str(model), "images": "missing_only", "batch_size": 3, "max_length": 8}
    p.update(params)
    return graph([("c", "Concept", {"folder": str(folder), "missing_caption": "concept_name"}),
                  ("cap", "Caption", p)],
                 links=[("c", "dataset", "cap", "dataset")])


def test_captions_flow_in_the_dataset_and_no_file_is_written(tmp_path, blip):
    data = make_images(tmp_path / "data")
    (data / "img0.txt").write_text("my own caption\n")
    before = sorted(p.name for p in data.iterdir())
    r, _ = run(caption_graph(data, blip, prefix="ohwx"), workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    ds = r.output("cap")
    by_name = {s.path.name: s for s in ds.concepts[0].samples}
    assert by_name["img0.png"].caption_lines == ("my own caption",)  # missing_only keeps the user's caption
    for name in ("img1.png", "img2.png", "img3.png"):
        s = by_name[name]
        assert s.caption_source == "generated"
        assert s.caption_lines[0].startswith("ohwx, ") and len(s.caption_lines[0]) > len("ohwx, ")
    assert sorted(p.name for p in data.iterdir()) == before  # nothing written beside the images
    prev = r.previews("cap")
    assert len(prev["images"]["images"]) == 3 and prev["images"]["captions"][0].startswith("ohwx")
    assert len([e for e in r.of("preview", "cap") if e["kind"] == "images"]) == 1  # one picture, not one a batch
    assert any("images/s" in m for m in r.logs("cap"))


def test_write_beside_writes_atomically_and_backs_up_replaced_captions(tmp_path, blip):
    ws = tmp_path / "ws"
    data = make_images(ws / "data")  # inside the workspace: allowed without --allow-output
    (data / "img0.txt").write_text("my own caption\n")
    r, _ = run(caption_graph(data, blip, images="all", write_beside=str(data), suffix="style"), workspace=ws)
    assert r.status == "done", r.error()
    for i in range(4):
        text = (data / f"img{i}.txt").read_text()
        assert text.endswith("style\n") and text.count("\n") == 1
    assert (data / "img0.txt.bak").read_text() == "my own caption\n"
    assert not list(data.glob(".nodetrainer-tmp-*"))
    # the same captions again: nothing rewritten, no second backup
    r, _ = run(caption_graph(data, blip, images="all", write_beside=str(data), suffix="style", max_length=8,
                             batch_size=2), workspace=ws)
    assert r.status == "done", r.error()
    assert sorted(p.name for p in data.glob("*.bak")) == ["img0.txt.bak"]
    # a changed caption: the first backup is kept, a second one is added
    (data / "img1.txt").write_text("edited by hand\n")
    r, _ = run(caption_graph(data, blip, images="all", write_beside=str(data), suffix="style", batch_size=1),
               workspace=ws)
    assert r.status == "done", r.error()
    assert (data / "img1.txt.bak").read_text() == "edited by hand\n"
    assert (data / "img0.txt.bak").read_text() == "my own caption\n"


def test_write_beside_outside_the_workspace_is_refused(tmp_path, blip):
    from app.graph.validate import validate

    data = make_images(tmp_path / "data")
    g = caption_graph(data, blip, write_beside=str(data))
    problems = validate(g, registry(), workspace=tmp_path / "ws", recipe_dir=tmp_path)
    assert any(p.node_id == "cap" and "write_beside" in p.message and "--allow-output" in p.message
               for p in problems), problems
    assert not [p for p in validate(g, registry(), workspace=tmp_path / "ws", recipe_dir=tmp_path,
                                    allow_output=[str(data)]) if p.node_id == "cap"]
    r, _ = run(g, workspace=tmp_path / "ws")
    assert r.status == "invalid" and "write_beside" in repr(r.events)  # refused before anything runs
    assert not list(data.glob("*.txt"))


@pytest.mark.parametrize("case", ["missing", "no_config", "not_captioner", "broken_weights", "remote_code"])
def test_bad_model_folder_is_a_clear_error(tmp_path, blip, case):
    import shutil

    data = make_images(tmp_path / "data", 2)
    model = tmp_path / "model"
    if case == "no_config":
        model.mkdir()
    elif case == "not_captioner":
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "clip"}')
    elif case == "remote_code":  # the original microsoft/Florence-2 layout
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "florence2", "auto_map": {}, '
                                           '"vision_config": {"model_type": "davit"}}')
    elif case == "broken_weights":
        shutil.copytree(blip, model)
        (model / "model.safetensors").write_bytes(b"not weights")
    r, _ = run(caption_graph(data, model), workspace=tmp_path / "ws")
    err = r.error()
    assert r.status == "error" and err["node"] == "cap"
    assert str(model) in err["message"]
    expected = {"missing": "not found", "no_config": "config.json is missing", "not_captioner": "not a supported",
                "broken_weights": "cannot load", "remote_code": "florence-community/Florence-2-base"}[case]
    assert expected in err["message"], err["message"]


def test_an_unavailable_device_is_a_clear_error(tmp_path, blip):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = make_images(tmp_path / "data", 1)
    r, _ = run(caption_graph(data, blip, device="cuda"), workspace=tmp_path / "ws")
    msg = r.error()["message"]
    assert r.status == "error" and "cannot use device 'cuda'" in msg and str(blip) in msg


def test_validate_reports_a_missing_model_folder(tmp_path):
    from app.graph.validate import validate

    data = make_images(tmp_path / "data", 1)
    problems = validate(caption_graph(data, tmp_path / "nope"), registry(), recipe_dir=tmp_path)
    assert any(p.node_id == "cap" and "model_folder" in p.message for p in problems), problems
    problems = validate(caption_graph(data, tmp_path / "nope", write_beside=str(tmp_path / "gone")), registry(),
                        recipe_dir=tmp_path, allow_output=[str(tmp_path)])
    assert any(p.node_id == "cap" and "'write_beside'" in p.message and "no such folder" in p.message
               for p in problems), problems
    (tmp_path / "empty-model").mkdir()
    problems = validate(caption_graph(data, tmp_path / "empty-model"), registry(), recipe_dir=tmp_path)
    assert any(p.node_id == "cap" and "config.json is missing" in p.message for p in problems), problems


def test_captioner_batches_give_one_caption_per_image(blip):
    from PIL import Image

    from app.ml.data.captioning import clean_caption, detect_model_type, load_captioner

    assert detect_model_type(blip) == "blip"
    cap = load_captioner(blip)
    imgs = [Image.new("RGB", (30 + i, 20), (i * 40, 0, 0)) for i in range(5)]
    out = cap.caption(imgs, max_length=6)
    assert len(out) == 5 and all(isinstance(t, str) and t for t in out)
    assert clean_caption("  a  cat </s> ", "ohwx", "photo") == "ohwx, a cat, photo"
    assert clean_caption("a cat", "", "", " ") == "a cat"


# ---- the ignore list the dataset browser writes ----------------------------------------------

def test_concept_honours_the_ignore_list(tmp_path):
    from app.ml.data.concept import ConceptSettings, read_ignore_list, scan_concept, write_ignore_list

    data = make_images(tmp_path / "data", 3)
    (data / "sub").mkdir()
    write_image(data / "sub" / "x.png", (32, 32))
    write_ignore_list(data, ["img1.png", "sub/x.png"])
    assert read_ignore_list(data) == ["img1.png", "sub/x.png"]
    c = scan_concept(ConceptSettings(name="c", folder=data))
    assert sorted(s.rel for s in c.samples) == ["img0.png", "img2.png"]
    assert any("2 images are excluded" in n for n in c.report.notes)
    assert any("left out 2 images listed in .nodetrainer-ignore" in w and "sub/x.png" in w
               for w in c.report.entry_warnings())
    write_ignore_list(data, ["img0.png", "img1.png", "img2.png", "sub/x.png"])
    from app.ml.data.errors import DataError

    with pytest.raises(DataError, match="every image is excluded"):
        scan_concept(ConceptSettings(name="c", folder=data))


def test_text_cache_re_encodes_exactly_the_edited_caption(tmp_path):
    """Text cache entries are keyed by caption text: editing one caption makes exactly one new entry."""
    import numpy as np

    from app.ml.data.cache import TextCache
    from app.ml.data.concept import ConceptSettings, scan_concept

    data = make_images(tmp_path / "data", 4)
    for i in range(4):
        (data / f"img{i}.txt").write_text(f"caption {i}\n")

    def captions():
        c = scan_concept(ConceptSettings(name="c", folder=data))
        return [s.caption_lines[0] for s in c.samples]

    def enc(texts):
        return [np.zeros(2, np.float32) for _ in texts]

    cache = TextCache(tmp_path / "cache", "enc")
    cache.get_or_encode(captions(), enc)
    assert cache.misses == 4
    (data / "img2.txt").write_text("caption two, edited\n")
    cache = TextCache(tmp_path / "cache", "enc")
    cache.get_or_encode(captions(), enc)
    assert (cache.misses, cache.hits) == (1, 3)


@pytest.mark.parametrize("task", ["short", "detailed", "more_detailed"])
def test_florence2_captions_through_the_node(tmp_path, florence, task):
    from app.ml.data.captioning import detect_model_type

    assert detect_model_type(florence) == "florence2"
    data = make_images(tmp_path / "data", 3)
    r, _ = run(caption_graph(data, florence, florence_task=task, prefix="ohwx", max_length=6, batch_size=2),
               workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    caps = [s.caption_lines[0] for s in r.output("cap").concepts[0].samples]
    assert len(caps) == 3 and all(c.startswith("ohwx, ") and len(c) > len("ohwx, ") for c in caps)
    assert all("<" not in c for c in caps)  # no special tokens left in a caption
    assert any("Florence-2" in m for m in r.logs("cap"))


def test_an_empty_model_caption_keeps_the_old_one_and_says_so(tmp_path, blip, monkeypatch):
    from app.ml.data import captioning

    data = make_images(tmp_path / "data", 2)
    monkeypatch.setattr(captioning.Captioner, "caption", lambda self, imgs, **kw: ["", "a dog"][:len(imgs)])
    r, _ = run(caption_graph(data, blip, batch_size=2), workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    by_name = {s.path.name: s for s in r.output("cap").concepts[0].samples}
    assert by_name["img0.png"].caption_source == "concept_name" and by_name["img1.png"].caption_lines == ("a dog",)
    assert any("empty caption" in w and "img0.png" in w for w in r.logs("cap", "warning"))


@pytest.mark.parametrize("style", ["sentence", "tags"])
def test_qwen25_vl_captions_through_the_node(tmp_path, qwen, style):
    data = make_images(tmp_path / "data", 3)
    r, _ = run(caption_graph(data, qwen, vlm_style=style, suffix="style", max_length=6, batch_size=2),
               workspace=tmp_path / "ws")
    assert r.status == "done", r.error()
    caps = [s.caption_lines[0] for s in r.output("cap").concepts[0].samples]
    assert len(caps) == 3 and all(c.endswith(", style") and len(c) > len(", style") for c in caps)
    assert all("<|" not in c for c in caps)
    assert any("Qwen2.5-VL" in m for m in r.logs("cap"))


def test_qwen_prompts_and_tag_answers(qwen, monkeypatch):
    from PIL import Image

    from app.ml.data.captioning import VLM_PROMPTS, load_captioner, tags_from_text

    assert tags_from_text("1. red hair\n2. Red hair, smiling; - outdoors.\n* blue sky") == \
        "red hair, smiling, outdoors, blue sky"
    cap = load_captioner(qwen, vlm_style="tags")
    seen = []
    real = cap.tokenizer.__class__.__call__

    def spy(self, texts, **kw):
        seen.extend(texts)
        return real(self, texts, **kw)

    monkeypatch.setattr(cap.tokenizer.__class__, "__call__", spy)
    out = cap.caption([Image.new("RGB", (60, 40)), Image.new("RGB", (30, 90))], max_length=4)
    assert len(out) == 2
    assert all(VLM_PROMPTS["tags"] in t and t.count("<|vision_start|>") == 1 for t in seen)
    # each image gets one <|image_pad|> per merged 28x28 patch, so the two prompts differ in length
    assert len({t.count("<|image_pad|>") for t in seen}) == 2
    # big images are shrunk to VLM_MAX_PIXELS (the model's default would allow 12.8 MP)
    from app.ml.data import captioning

    monkeypatch.setattr(captioning, "VLM_MAX_PIXELS", 28 * 28 * 4)
    seen.clear()
    cap.caption([Image.new("RGB", (300, 200))], max_length=3)
    assert seen[0].count("<|image_pad|>") <= 4
    monkeypatch.undo()
    monkeypatch.setattr(cap.tokenizer.__class__, "__call__", spy)
    cap = load_captioner(qwen, vlm_prompt="Name the main colour.")
    seen.clear()
    cap.caption([Image.new("RGB", (60, 40))], max_length=3)
    assert "Name the main colour." in seen[0] and VLM_PROMPTS["sentence"] not in seen[0]


def test_caption_and_mask_files_share_one_replace_rule(tmp_path):
    """Text and bytes are written by one rule: the same content is left alone, other content is backed
    up first (backups never replace each other), and a failed write names the file."""
    from app.ml.data.captioning import write_file_bytes, write_text_file
    from app.ml.data.errors import DataError

    txt, png = tmp_path / "a.txt", tmp_path / "a-masklabel.png"
    assert write_text_file(txt, "one\n\n") is None and txt.read_bytes() == b"one\n"
    assert write_text_file(txt, "one") is None  # the same content: not written, no backup
    assert write_text_file(txt, "two").name == "a.txt.bak" and txt.read_text() == "two\n"
    assert write_text_file(txt, "three").name == "a.txt.1.bak"
    assert (tmp_path / "a.txt.bak").read_text() == "one\n" and (tmp_path / "a.txt.1.bak").read_text() == "two\n"
    assert write_file_bytes(png, b"\x89x") is None and write_file_bytes(png, b"\x89x") is None
    assert write_file_bytes(png, b"\x89y").read_bytes() == b"\x89x" and png.read_bytes() == b"\x89y"
    with pytest.raises(DataError, match="cannot write") as err:
        write_text_file(txt / "b.txt", "x")  # a.txt is a file, not a folder
    assert "b.txt" in str(err.value)


def test_model_load_and_device_failures_read_the_same_for_every_model(tmp_path):
    from app.ml.data.captioning import load_failure, to_device
    from app.ml.data.errors import DataError

    assert load_failure(OSError("no file named model.safetensors\nmore")) == "OSError: no file named model.safetensors"
    assert load_failure(KeyError()) == "KeyError" and len(load_failure(ValueError("x" * 999))) == 300

    class Model:
        evaluated = False

        def to(self, device):
            if device != "cpu":
                raise RuntimeError("Torch not compiled with CUDA enabled\ntrace")

        def eval(self):
            self.evaluated = True

    m = Model()
    to_device(m, "cpu", tmp_path)
    assert m.evaluated
    with pytest.raises(DataError, match="cannot use device 'cuda' \\(Torch not compiled with CUDA enabled\\)") as err:
        to_device(Model(), "cuda", tmp_path)
    assert str(tmp_path) in str(err.value)
