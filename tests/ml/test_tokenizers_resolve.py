"""Where tokenizers come from: the LoadModel tokenizer param, beside the model, else the Hugging Face hub.

The hub is never reached: the one function that calls huggingface_hub is replaced by a fake that
writes the (tiny, generated) tokenizer files into a temporary HF cache the way huggingface_hub lays
them out, so the rest of the path - finding the snapshot, loading it, padding - runs for real.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import pytest
from safetensors.torch import save_file

from app.ml.models import ModelLoadError, load_model
from app.ml.models import tokenizers as toks
from app.ml.models.families import HUB_TOKENIZERS, SD15, SDXL
from app.ml.models.original_layout import bundle_to_original_state_dict
from app.ml.models.tiny import CONFIGS, TINY_TOKENIZER_DIR

CLIP_L = "openai/clip-vit-large-patch14"
CLIP_BIGG = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


# --------------------------------------------------------------------------------------------- helpers

@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache, online unless a test says otherwise."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


def cache_snapshot(cache: Path, repo_id: str, source: Path = TINY_TOKENIZER_DIR) -> Path:
    """Put ``source``'s files where huggingface_hub keeps a snapshot of ``repo_id``."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123456789abcdef"
    snap.mkdir(parents=True)
    for f in source.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snap


class FakeHub:
    """Stands in for ``tokenizers.snapshot_download``: records calls, "downloads" into the cache."""

    def __init__(self, fail: Exception | None = None):
        self.calls: list[dict] = []
        self.fail = fail

    def __call__(self, repo_id, *, allow_patterns, cache_dir, local_files_only):
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls.append(dict(repo_id=repo_id, allow_patterns=list(allow_patterns), cache_dir=Path(cache_dir),
                               local_files_only=local_files_only))
        snaps = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        if snaps.is_dir():
            return str(next(snaps.iterdir()))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        if self.fail is not None:
            raise self.fail
        return str(cache_snapshot(Path(cache_dir), repo_id))

    def downloads(self):
        return [c for c in self.calls if not c["local_files_only"]]


@pytest.fixture
def fake_hub(monkeypatch):
    hub = FakeHub()
    monkeypatch.setattr(toks, "snapshot_download", hub)
    return hub


def single_file(bundle, folder: Path) -> tuple[Path, Path]:
    """A tiny original-layout checkpoint with nothing beside it, and its weightless config folder."""
    folder.mkdir(parents=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in bundle_to_original_state_dict(bundle).items()}, str(path))
    cfg = folder.parent / (folder.name + "-configs")
    bundle.unet.save_config(str(cfg / "unet"))
    bundle.vae.save_config(str(cfg / "vae"))
    for spec, te in zip(bundle.family.text_encoders, bundle.text_encoders):
        te.config.save_pretrained(str(cfg / spec.name))
    return path, cfg


def tokenizer_copy(dest: Path) -> Path:
    shutil.copytree(TINY_TOKENIZER_DIR, dest)
    return dest


def find(family, checkpoint, **kw):
    return toks.find_tokenizers(family, CONFIGS / family.config_dir, checkpoint=checkpoint, **kw)


# --------------------------------------------------------------------------------------------- order

def test_beside_the_checkpoint_is_used_without_the_hub(tmp_path, hf_cache, fake_hub):
    ckpt = tmp_path / "models" / "model.safetensors"
    tokenizer_copy(tmp_path / "models" / "tokenizer")
    _, origins = find(SD15, ckpt)
    assert origins == [str(tmp_path / "models" / "tokenizer")]
    assert fake_hub.calls == []


def test_the_tokenizer_param_wins_over_the_one_beside_the_model(tmp_path, hf_cache, fake_hub):
    ckpt = tmp_path / "models" / "model.safetensors"
    tokenizer_copy(tmp_path / "models" / "tokenizer")
    chosen = tokenizer_copy(tmp_path / "my-tokenizer")
    _, origins = find(SD15, ckpt, user_path=chosen)
    assert origins == [str(chosen)]
    assert fake_hub.calls == []


def test_a_tokenizer_param_without_a_tokenizer_is_an_error_not_skipped(tmp_path, hf_cache, fake_hub):
    ckpt = tmp_path / "models" / "model.safetensors"
    tokenizer_copy(tmp_path / "models" / "tokenizer")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="tokenizer param") as e:
        find(SD15, ckpt, user_path=empty)
    assert str(empty) in str(e.value) and "vocab.json + merges.txt" in str(e.value)
    with pytest.raises(ModelLoadError, match="does not exist"):
        find(SD15, ckpt, user_path=tmp_path / "nowhere")


def test_sdxl_one_clip_folder_serves_both_encoders_with_their_own_padding(tmp_path, hf_cache, fake_hub):
    """SDXL's tokenizer_2 is CLIP-L's vocabulary padded with "!": one folder, two pad tokens."""
    folder = tokenizer_copy(tmp_path / "clip")
    (tok1, tok2), origins = find(SDXL, tmp_path / "model.safetensors", user_path=folder)
    assert origins == [str(folder), str(folder)]
    assert (tok1.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")
    ids1 = tok1("red", padding="max_length", max_length=77).input_ids
    ids2 = tok2("red", padding="max_length", max_length=77).input_ids
    assert ids1[:3] == ids2[:3] and ids1[-1] == tok1.eos_token_id and ids2[-1] == tok2.convert_tokens_to_ids("!")


def test_sdxl_tokenizer_and_tokenizer_2_subfolders(tmp_path, hf_cache, fake_hub):
    folder = tmp_path / "toks"
    tokenizer_copy(folder / "tokenizer")
    tokenizer_copy(folder / "tokenizer_2")
    _, origins = find(SDXL, tmp_path / "model.safetensors", user_path=folder)
    assert origins == [str(folder / "tokenizer"), str(folder / "tokenizer_2")]


# --------------------------------------------------------------------------------------------- the hub

def test_a_missing_tokenizer_is_fetched_once_into_the_hf_cache_and_then_used(sd, tmp_path, hf_cache, fake_hub):
    path, cfg = single_file(sd, tmp_path / "m")
    lines: list[str] = []
    loaded = load_model(path, config=cfg, log=lines.append)

    (call,) = fake_hub.downloads()
    assert call["repo_id"] == CLIP_L and call["cache_dir"] == hf_cache
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= set(call["allow_patterns"])
    assert not any(p.endswith((".safetensors", ".bin", ".msgpack", ".h5")) or "*" in p for p in call["allow_patterns"])
    snapshot = hf_cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "0123456789abcdef"
    assert any(CLIP_L in line and str(hf_cache) in line and "once" in line for line in lines), lines
    for prompt in ("a red circle", "ohwx dog on a blue background"):
        assert loaded.tokenizers[0](prompt).input_ids == sd.tokenizers[0](prompt).input_ids
    assert loaded.identities["tokenizer"]  # the cached files identify the tokenizer

    fake_hub.calls.clear()  # a second load uses the cached copy and downloads nothing
    again, origins = find(SD15, path)
    assert fake_hub.downloads() == [] and origins == [str(snapshot)]


def test_sdxl_fetches_clip_l_and_bigg_and_pads_the_second_with_bang(tmp_path, hf_cache, fake_hub):
    (tok1, tok2), _ = find(SDXL, tmp_path / "model.safetensors")
    assert [c["repo_id"] for c in fake_hub.downloads()] == [CLIP_L, CLIP_BIGG]
    assert (tok1.pad_token, tok2.pad_token) == ("<|endoftext|>", "!")


def test_the_hub_table_holds_the_repo_ids(tmp_path):
    assert HUB_TOKENIZERS["clip-l"].repo_id == CLIP_L
    assert HUB_TOKENIZERS["clip-bigg"].repo_id == CLIP_BIGG
    assert HUB_TOKENIZERS["t5-xxl"].repo_id == "google/t5-v1_1-xxl"
    assert [te.hub_tokenizer for te in SDXL.text_encoders] == ["clip-l", "clip-bigg"]


def test_offline_a_cached_copy_is_used_with_no_network(tmp_path, hf_cache, monkeypatch):
    """The real huggingface_hub, offline, finds the cached snapshot; any socket use would fail the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = cache_snapshot(hf_cache, CLIP_L)

    def no_network(*a, **k):
        raise AssertionError("the network was used")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    (tok,), origins = find(SD15, tmp_path / "model.safetensors")
    assert origins == [str(snapshot)] and tok("red").input_ids[1] > 0


def test_offline_and_uncached_says_what_to_download_and_where(sd, tmp_path, hf_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, cfg = single_file(sd, tmp_path / "m")
    with pytest.raises(ModelLoadError) as e:
        load_model(path, config=cfg)
    msg = str(e.value)
    for part in ("model.safetensors", CLIP_L, "vocab.json merges.txt", str(tmp_path / "m" / "tokenizer"),
                 "tokenizer param", "HF_HUB_OFFLINE", str(hf_cache)):
        assert part in msg, (part, msg)
    assert "open_clip" not in msg and "pip install" not in msg


def test_a_failed_download_gives_the_same_advice(tmp_path, hf_cache, monkeypatch):
    hub = FakeHub(fail=ConnectionError("Name or service not known"))
    monkeypatch.setattr(toks, "snapshot_download", hub)
    with pytest.raises(ModelLoadError) as e:
        find(SD15, tmp_path / "m" / "model.safetensors")
    msg = str(e.value)
    assert "Name or service not known" in msg and CLIP_L in msg and str(tmp_path / "m" / "tokenizer") in msg


# --------------------------------------------------------------------------------------------- the node

def _diffusers_folder(bundle, folder: Path) -> Path:
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0], bundle.unet,
                                   PNDMScheduler.from_config(dict(bundle.scheduler_config)), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return folder


def _run_load_model(tmp_path, params):
    from app.engine.executor import Executor
    from app.graph.model import Graph
    from app.graph.registry import load_registry

    reg = load_registry(include_user=False)
    g = Graph()
    g.add_node("LoadModel", reg.get("LoadModel").version, params, node_id="1")
    events = []
    result = Executor(reg).run(g, emit=events.append, workspace=tmp_path / "ws")
    return result, events


def test_load_model_node_fetches_a_missing_tokenizer_and_logs_it(sd, tmp_path, hf_cache, fake_hub):
    folder = _diffusers_folder(sd, tmp_path / "model")
    shutil.rmtree(folder / "tokenizer")
    result, events = _run_load_model(tmp_path, {"source": str(folder)})
    assert result.status == "done", [e.get("message") for e in events if e["event"] == "node_error"]
    logs = [e["message"] for e in events if e["event"] == "log"]
    assert any(CLIP_L in m for m in logs), logs
    assert [c["repo_id"] for c in fake_hub.downloads()] == [CLIP_L]


def test_load_model_node_tokenizer_param_wins_over_the_folders_own(sd, tmp_path, hf_cache, fake_hub):
    folder = _diffusers_folder(sd, tmp_path / "model")
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    result, events = _run_load_model(tmp_path, {"source": str(folder), "tokenizer": str(empty)})
    errors = [e["message"] for e in events if e["event"] == "node_error"]
    assert result.status == "error" and errors and "tokenizer param" in errors[0] and str(empty) in errors[0]
    assert fake_hub.calls == []


def test_an_unlimited_model_max_length_in_a_saved_config_reads_as_clips_77(tmp_path, hf_cache, fake_hub):
    folder = tmp_path / "model"
    tokenizer_copy(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer_config.json").write_text(
        '{"model_max_length": 1000000000000000019884624838656, "pad_token": "!"}')
    (tok,), _ = toks.find_tokenizers(SD15, folder, checkpoint=folder)
    assert tok.model_max_length == 77 and tok.pad_token == "!"
