"""BFL single-file <-> diffusers Flux transformer keys, and the header-only file detector."""
from __future__ import annotations

import inspect
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from app.ml.flux import detect as D
from app.ml.flux import keys as K
from app.ml.flux import tiny


@pytest.fixture(scope="module")
def dev():
    return tiny.build_transformer(guidance=True)


@pytest.fixture(scope="module")
def schnell():
    return tiny.build_transformer(guidance=False)


def _equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def diffusers_converter(hidden: int):
    """diffusers' own single-file converter, with its hard-coded 3072 width replaced by the tiny model's."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    namespace = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {hidden}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_round_trip_is_bit_identical(variant, dev, schnell):
    sd = (dev if variant == "dev" else schnell).state_dict()
    bfl = K.diffusers_to_bfl(sd)
    assert ("guidance_in.in_layer.weight" in bfl) == (variant == "dev")
    _equal(K.bfl_to_diffusers(bfl), dict(sd))


def test_bfl_layout_details(dev):
    sd = dev.state_dict()
    bfl = K.diffusers_to_bfl(sd)
    h = sd["x_embedder.weight"].shape[0]
    qkv = bfl["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.shape[0] == 3 * h and torch.equal(qkv[h:2 * h], sd["transformer_blocks.0.attn.to_k.weight"])
    lin1 = bfl["single_blocks.1.linear1.weight"]
    assert torch.equal(lin1[3 * h:], sd["single_transformer_blocks.1.proj_mlp.weight"])
    ada = bfl["final_layer.adaLN_modulation.1.weight"]  # BFL: (shift, scale); diffusers: (scale, shift)
    half = ada.shape[0] // 2
    assert torch.equal(ada[:half], sd["norm_out.linear.weight"][half:])
    assert torch.equal(bfl["double_blocks.1.txt_attn.norm.key_norm.scale"], sd["transformer_blocks.1.attn.norm_added_k.weight"])
    assert torch.equal(bfl["time_in.out_layer.bias"], sd["time_text_embed.timestep_embedder.linear_2.bias"])


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_to_diffusers_equals_diffusers_converter(variant, dev, schnell):
    sd = (dev if variant == "dev" else schnell).state_dict()
    bfl = K.diffusers_to_bfl(sd)
    theirs = diffusers_converter(sd["x_embedder.weight"].shape[0])({k: v.clone() for k, v in bfl.items()})
    _equal(K.bfl_to_diffusers(bfl), theirs)


def test_all_in_one_prefix_and_other_components(dev):
    sd = dev.state_dict()
    bfl = K.diffusers_to_bfl(sd, prefix="model.diffusion_model.")
    assert all(k.startswith("model.diffusion_model.") for k in bfl)
    bfl["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # the VAE in an all-in-one file
    bfl["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.zeros(1)
    _equal(K.bfl_to_diffusers(bfl), dict(sd))
    comfy = K.diffusers_to_bfl(sd, prefix="diffusion_model.")
    _equal(K.bfl_to_diffusers(comfy), dict(sd))


def test_fp8_file_is_upcast_and_loads(dev, tmp_path):
    sd = dev.state_dict()
    bfl = {k: v.to(torch.float8_e4m3fn) for k, v in K.diffusers_to_bfl(sd).items()}
    path = tmp_path / "flux1-dev-fp8.safetensors"
    save_file(bfl, str(path))
    loaded = K.load_transformer_file(path)
    assert {v.dtype for v in loaded.values()} == {torch.bfloat16}
    want = {k: v.to(torch.float8_e4m3fn).to(torch.bfloat16) for k, v in sd.items()}
    _equal(loaded, want)
    model = tiny.build_transformer(guidance=True)
    model.load_state_dict(loaded, strict=True)  # every key fits
    assert torch.equal(model.x_embedder.weight, want["x_embedder.weight"].float())
    as32 = K.load_transformer_file(path, fp8_dtype=torch.float32)
    assert as32["proj_out.weight"].dtype == torch.float32


def test_diffusers_layout_file_loads_too(dev, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(dict(dev.state_dict()), str(path))
    _equal(K.load_transformer_file(path), dict(dev.state_dict()))


def test_bad_files_name_the_file_and_the_key(dev, tmp_path):
    bfl = K.diffusers_to_bfl(dev.state_dict())
    odd = dict(bfl, **{"double_blocks.0.img_attn.lora_up.weight": torch.zeros(1)})
    with pytest.raises(K.FluxKeyError, match=r"LoadModel 'base': x\.safetensors: 1 key\(s\).*img_attn\.lora_up"):
        K.bfl_to_diffusers(odd, source="LoadModel 'base': x.safetensors")
    short = {k: v for k, v in bfl.items() if k != "single_blocks.0.linear2.bias"}
    with pytest.raises(K.FluxKeyError, match="single_blocks.0.linear2.bias' is missing"):
        K.bfl_to_diffusers(short)
    gap = {k: v for k, v in bfl.items() if not k.startswith("double_blocks.0.")}
    with pytest.raises(K.FluxKeyError, match=r"double_blocks \[0\] are missing"):
        K.bfl_to_diffusers(gap)
    scaled = dict(bfl, **{"double_blocks.0.img_attn.qkv.scale_weight": torch.ones(())})
    with pytest.raises(K.FluxKeyError, match="scaled fp8"):
        K.bfl_to_diffusers(scaled)
    vae = tmp_path / "ae.safetensors"
    save_file(dict(tiny.build_vae().state_dict()), str(vae))
    with pytest.raises(K.FluxKeyError, match=r"ae\.safetensors.*not a Flux transformer"):
        K.load_transformer_file(vae, where="LoadModel 'flux'")


# --- the header-only detector ---------------------------------------------------------------------

def _save(tmp_path, name, state):
    path = tmp_path / name
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(path))
    return path


def test_detects_every_flux_component_from_the_header(dev, schnell, tmp_path):
    from app.ml.models.tiny import build_tiny_components

    k = D.detect_file(_save(tmp_path, "flux1-dev.safetensors", K.diffusers_to_bfl(dev.state_dict())))
    assert (k.kind, k.variant, k.layout, k.details["width"]) == ("flux-transformer", "dev", "bfl", 32)
    k = D.detect_file(_save(tmp_path, "flux1-schnell.safetensors", K.diffusers_to_bfl(schnell.state_dict(), prefix="model.diffusion_model.")))
    assert (k.kind, k.variant, k.prefix) == ("flux-transformer", "schnell", "model.diffusion_model.")
    k = D.detect_file(_save(tmp_path, "t.safetensors", dev.state_dict()))
    assert (k.kind, k.variant, k.layout) == ("flux-transformer", "dev", "diffusers")
    k = D.detect_file(_save(tmp_path, "ae.safetensors", tiny.build_vae().state_dict()))
    assert (k.kind, k.details["latent_channels"]) == ("vae", 16)
    k = D.detect_file(_save(tmp_path, "clip_l.safetensors", tiny.build_clip().state_dict()))
    assert (k.kind, k.variant) == ("clip", "L")
    k = D.detect_file(_save(tmp_path, "t5xxl.safetensors", tiny.build_t5().state_dict()))
    assert (k.kind, k.details["d_model"], k.details["blocks"]) == ("t5", 32, 2)
    sdxl = build_tiny_components("tiny-sdxl")
    k = D.detect_file(_save(tmp_path, "sdxl_vae.safetensors", sdxl["vae"].state_dict()))
    assert (k.kind, k.details["latent_channels"]) == ("vae", 4)
    k = D.detect_file(_save(tmp_path, "clip_g.safetensors", sdxl["text_encoders"][1].state_dict()))
    assert (k.kind, k.variant) == ("clip", "G")
    k = D.detect_file(_save(tmp_path, "unet.safetensors", sdxl["unet"].state_dict()))
    assert k.kind == "unknown"


def test_detects_full_size_shapes_from_a_synthetic_header():
    def hdr(**shapes):
        return {k.replace("__", "."): {"dtype": "F16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()}

    clip_l = {"text_model.embeddings.token_embedding.weight": {"shape": [49408, 768]}, "text_projection.weight": {"shape": [768, 768]}}
    assert D.detect(clip_l).variant == "L"  # a full CLIP-L with its projection is still L, by width
    clip_g = {"text_model.embeddings.token_embedding.weight": {"shape": [49408, 1280]}}
    assert D.detect(clip_g).variant == "G"
    t5 = hdr(encoder__block__0__layer__0__SelfAttention__q__weight=[4096, 4096], shared__weight=[32128, 4096])
    assert D.detect(t5).details["d_model"] == 4096
    ae = hdr(decoder__conv_in__weight=[512, 16, 3, 3], encoder__down__0__block__0__conv1__weight=[128, 128, 3, 3])
    assert (D.detect(ae).layout, D.detect(ae).details["latent_channels"]) == ("original", 16)


def test_header_reader_reads_only_the_header(tmp_path):
    path = tmp_path / "big.safetensors"
    head = json.dumps({"img_in.weight": {"dtype": "F8_E4M3", "shape": [3072, 64], "data_offsets": [0, 196608]},
                       "double_blocks.0.img_attn.qkv.weight": {"dtype": "F8_E4M3", "shape": [9216, 3072], "data_offsets": [0, 0]},
                       "__metadata__": {"format": "pt"}}).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head)  # no tensor data at all: only the header is read
    k = D.detect_file(path)
    assert (k.kind, k.variant, k.details["width"]) == ("flux-transformer", "schnell", 3072)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(D.DetectError, match=r"LoadModel 'flux': .*junk\.safetensors is not a \.safetensors file"):
        D.detect_file(tmp_path / "junk.safetensors", where="LoadModel 'flux'")


def test_expect_file_names_a_mismatched_split_file(dev, tmp_path):
    t5 = _save(tmp_path, "t5xxl_fp16.safetensors", tiny.build_t5().state_dict())
    with pytest.raises(D.DetectError, match=r"LoadModel 'flux': .*t5xxl_fp16\.safetensors holds T5 text encoder.*needs a Flux\.1"):
        D.expect_file(t5, "flux-transformer", where="LoadModel 'flux'")
    schnell_file = _save(tmp_path, "s.safetensors", K.diffusers_to_bfl(tiny.build_transformer(guidance=False).state_dict()))
    with pytest.raises(D.DetectError, match="holds Flux.1 schnell transformer.*needs a Flux.1 dev transformer"):
        D.expect_file(schnell_file, "flux-transformer", variant="dev")
    assert D.expect_file(t5, "t5").kind == "t5"
