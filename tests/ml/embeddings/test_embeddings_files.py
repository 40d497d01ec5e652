"""Embedding files: our layouts round-trip, A1111/diffusers files read (safely), bundles in LoRA files,
and a file for another family or width is refused by name."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.ml.adapters import AdapterConfig, attached, create_adapter_set, load_adapter_file
from app.ml.embeddings import (
    EmbeddingError,
    create_embedding,
    load_bundled_embeddings,
    load_embedding_file,
    save_embedding,
)
from app.ml.save import save_adapter


def _random(emb, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in emb.vectors.values():
            p.copy_(torch.randn(p.shape, generator=g))
    return emb


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name,layout", [("sd", {"emb_params": (3, 32)}),
                                         ("sdxl", {"clip_l": (3, 32), "clip_g": (3, 48)})])
def test_round_trip_in_the_family_layout(tmp_path, name, layout, request):
    bundle = request.getfixturevalue(name)
    emb = _random(create_embedding(bundle, "<ohwx>", 3, "red"))
    path = save_embedding(emb, tmp_path / "ohwx", dtype="fp32", recipe={"nodes": {"a": 1}})
    keys, meta = _keys(path)
    assert path.suffix == ".safetensors" and keys == layout
    assert json.loads(meta["nodetrainer_recipe"]) == {"nodes": {"a": 1}}
    assert meta["nodetrainer_embedding_token"] == "<ohwx>" and meta["modelspec.architecture"].endswith("/textual-inversion")
    back = load_embedding_file(path, bundle)
    assert back.token == "<ohwx>" and back.components == emb.components
    for c in emb.components:
        assert torch.equal(back.vectors[c], emb.vectors[c])
    # never overwritten unless asked; fp16 is the default
    second = save_embedding(emb, tmp_path / "ohwx.safetensors")
    assert second.name == "ohwx_1.safetensors"
    with safe_open(str(second), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
    assert load_embedding_file(second, bundle, token="<other>").token == "<other>"


def test_a1111_pt_and_diffusers_files(tmp_path, sd):
    vec = torch.randn(2, 32)
    a1111 = tmp_path / "my_style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "my_style", "step": 500,
                "sd_checkpoint": "abcd1234", "sd_checkpoint_name": "v1-5"}, a1111)
    emb = load_embedding_file(a1111, sd)
    assert emb.token == "my_style" and torch.equal(emb.vectors["text_encoder"], vec)

    old = tmp_path / "old_style.pt"  # what A1111 saved with torch 1.11: a ParameterDict
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vec)}), "name": "x"}, old)
    assert torch.equal(load_embedding_file(old, sd).vectors["text_encoder"], vec)

    learned = tmp_path / "learned_embeds.safetensors"
    save_file({"<cat-toy>": vec[0]}, str(learned))
    emb = load_embedding_file(learned, sd)
    assert emb.token == "<cat-toy>" and emb.vectors["text_encoder"].shape == (1, 32)
    legacy = tmp_path / "learned_embeds.bin"
    torch.save({"<cat-toy>": vec}, legacy)
    assert load_embedding_file(legacy, sd).num_vectors == 2


class Payload:  # a pickle that needs code to load
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_needs_code_is_refused(tmp_path, sd, capsys):
    bad = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "x": Payload()}, bad)
    with pytest.raises(EmbeddingError, match="evil.pt: cannot be read safely"):
        load_embedding_file(bad, sd)
    assert "must never run" not in capsys.readouterr().out


def test_other_family_or_width_refused_by_name(tmp_path, sd, sdxl):
    xl = save_embedding(create_embedding(sdxl, "<x>", 1), tmp_path / "xl_emb", dtype="fp32")
    with pytest.raises(EmbeddingError, match="xl_emb.safetensors is an embedding for Stable Diffusion XL.*Stable Diffusion 1.5"):
        load_embedding_file(xl, sd)
    one = save_embedding(create_embedding(sd, "<x>", 1), tmp_path / "sd_emb", dtype="fp32")
    with pytest.raises(EmbeddingError, match="sd_emb.safetensors is an embedding for Stable Diffusion 1.5, not for "
                                             "Stable Diffusion XL"):
        load_embedding_file(one, sdxl)
    foreign = tmp_path / "civitai.safetensors"  # no metadata: told by its key
    save_file({"emb_params": torch.zeros(2, 32)}, str(foreign))
    with pytest.raises(EmbeddingError, match="civitai.safetensors is an embedding for Stable Diffusion 1.x/2.x "
                                             r"\(emb_params, vectors 32 wide\) but the model is Stable Diffusion XL"):
        load_embedding_file(foreign, sdxl)
    wide = tmp_path / "wide.safetensors"
    save_file({"emb_params": torch.zeros(2, 48)}, str(wide))
    with pytest.raises(EmbeddingError, match=r"wide.safetensors.*takes vectors 32 wide but the embedding's are 48 wide"):
        load_embedding_file(wide, sd)
    junk = tmp_path / "junk.safetensors"
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(junk))
    with pytest.raises(EmbeddingError, match="junk.safetensors: not an embedding file"):
        load_embedding_file(junk, sd)


@pytest.mark.parametrize("name,keys", [
    ("sd", {"bundle_emb.<ohwx>.string_to_param.*": (2, 32), "bundle_emb.<st>.string_to_param.*": (1, 32)}),
    ("sdxl", {"bundle_emb.<ohwx>.clip_l": (2, 32), "bundle_emb.<ohwx>.clip_g": (2, 48),
              "bundle_emb.<st>.clip_l": (1, 32), "bundle_emb.<st>.clip_g": (1, 48)}),
])
def test_bundled_in_a_lora_file_and_back(tmp_path, name, keys, request):
    bundle = request.getfixturevalue(name)
    aset = create_adapter_set(bundle, AdapterConfig(rank=2, targets={"unet": "attn-only"}))
    embs = [_random(create_embedding(bundle, "<ohwx>", 2), 1), _random(create_embedding(bundle, "<st>", 1), 2)]
    path = save_adapter(aset, tmp_path / "lora", dtype="fp32", embeddings=embs)
    found, meta = _keys(path)
    assert {k: v for k, v in found.items() if k.startswith("bundle_emb.")} == keys
    assert json.loads(meta["nodetrainer_bundled_embeddings"]) == ["<ohwx>", "<st>"]
    lora = load_adapter_file(path, bundle)  # the LoRA part still loads: bundled keys are not LoRA modules
    assert len(lora) == len(aset)
    back = load_bundled_embeddings(path, bundle)
    assert [e.token for e in back] == ["<ohwx>", "<st>"]
    for e, b in zip(embs, back):
        for c in e.components:
            assert torch.equal(e.vectors[c], b.vectors[c])
    with attached(bundle, [(lora, 1.0), *back]):  # a LoRA and its embeddings together
        bundle.encode_prompts(["a <ohwx> <st>"])
    plain = save_adapter(aset, tmp_path / "plain", dtype="fp32")
    assert load_bundled_embeddings(plain, bundle) == []
