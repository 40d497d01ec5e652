"""Flux's tokenizers resolve as CLIP's do for SD: the LoadModel tokenizer param, beside the model (or a config
folder), else the Hugging Face hub once (``google/t5-v1_1-xxl``, tokenizer files only), with the same offline
error. The hub is never reached: the one call into huggingface_hub is replaced by a fake that lays the tiny
generated T5 tokenizer out as a cached snapshot, so finding and loading the snapshot run for real."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from safetensors.torch import save_file

from app.ml.flux import keys
from app.ml.flux.t5_tokenizer import tiny_t5_tokenizer_dir
from app.ml.models import ModelLoadError, load_model
from app.ml.models import tokenizers as toks
from app.ml.models.families import HUB_TOKENIZERS

T5_REPO = "google/t5-v1_1-xxl"


@pytest.fixture(scope="module")
def ref():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def saved(ref, tmp_path_factory):
    """Split files with no tokenizer beside them, and a config folder holding only the CLIP tokenizer."""
    root = tmp_path_factory.mktemp("flux_tok")
    full = root / "full"
    ref.family.build_pipeline(ref).save_pretrained(str(full))
    config = root / "config"
    shutil.copytree(full, config)
    shutil.rmtree(config / "tokenizer_2")
    files = root / "files"
    files.mkdir()
    save_file(keys.diffusers_to_bfl(ref.denoiser.state_dict()), str(files / "flux1-dev.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.vae.state_dict().items()}, str(files / "ae.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.text_encoders[0].state_dict().items()}, str(files / "clip_l.safetensors"))
    t5 = {k: v.contiguous().clone() for k, v in ref.text_encoders[1].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(files / "t5xxl_fp16.safetensors"))
    return root


class FakeHub:
    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, repo_id, *, allow_patterns, cache_dir, local_files_only):
        from huggingface_hub.errors import LocalEntryNotFoundError

        self.calls.append(dict(repo_id=repo_id, allow_patterns=list(allow_patterns), local_files_only=local_files_only))
        snaps = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots"
        if snaps.is_dir():
            return str(next(snaps.iterdir()))
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        snap = snaps / "0123456789abcdef"
        snap.mkdir(parents=True)
        shutil.copy(tiny_t5_tokenizer_dir() / "spiece.model", snap / "spiece.model")  # what the real repo has
        return str(snap)

    def downloads(self):
        return [c for c in self.calls if not c["local_files_only"]]


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fake = FakeHub()
    monkeypatch.setattr(toks, "snapshot_download", fake)
    return fake


def _load(saved, **kw):
    return load_model(saved / "files" / "flux1-dev.safetensors", config=saved / "config", text_max_length=16, **kw)


def test_t5_tokenizer_is_fetched_once_from_the_hub_with_tokenizer_files_only(saved, ref, hub):
    lines: list[str] = []
    b = _load(saved, log=lines.append)
    assert [c["repo_id"] for c in hub.downloads()] == [T5_REPO]
    assert hub.downloads()[0]["allow_patterns"] == list(HUB_TOKENIZERS["t5-xxl"].files)
    assert not any(p.endswith((".safetensors", ".bin")) for p in hub.downloads()[0]["allow_patterns"])
    assert any("fetching the T5 v1.1 XXL tokenizer" in line for line in lines)
    prompt = ["a red circle"]
    assert b.tokenizers[1](prompt).input_ids == ref.tokenizers[1](prompt).input_ids
    _load(saved)  # the second load finds the cached copy
    assert len(hub.downloads()) == 1


def test_offline_without_a_cached_t5_tokenizer_says_what_to_do(saved, hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        _load(saved)
    msg = str(e.value)
    assert "flux1-dev.safetensors: no tokenizer for its T5 v1.1 XXL encoder" in msg
    assert "HF_HUB_OFFLINE is set" in msg and "spiece.model" in msg and T5_REPO in msg
    assert "LoadModel's tokenizer param" in msg
    assert hub.downloads() == []


def test_beside_the_model_and_the_tokenizer_param_win_over_the_hub(saved, ref, hub, tmp_path):
    param = tmp_path / "t5tok"
    shutil.copytree(saved / "full" / "tokenizer_2", param)
    b = _load(saved, tokenizer=param)  # a folder holding the T5 files themselves
    assert hub.calls == [] and b.tokenizers[1](["a cat"]).input_ids == ref.tokenizers[1](["a cat"]).input_ids
    beside = tmp_path / "beside"
    shutil.copytree(saved / "files", beside)
    shutil.copytree(saved / "full" / "tokenizer_2", beside / "tokenizer_2")
    load_model(beside / "flux1-dev.safetensors", config=saved / "config", text_max_length=16)
    assert hub.calls == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"empty \(LoadModel tokenizer param\) holds no tokenizer"):
        _load(saved, tokenizer=empty)


def test_validation_takes_a_t5_tokenizer_folder_alone(tmp_path):
    from app.graph.inputs_check import check_tokenizer

    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "spiece.model").write_bytes((tiny_t5_tokenizer_dir() / "spiece.model").read_bytes())
    assert check_tokenizer(t5, {}) is None
    nested = tmp_path / "both"
    shutil.copytree(t5, nested / "tokenizer_2")
    assert check_tokenizer(nested, {}) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "T5: spiece.model" in check_tokenizer(empty, {})
