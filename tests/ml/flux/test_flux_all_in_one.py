"""All-in-one Flux checkpoints as ComfyUI saves them (``model.diffusion_model.`` BFL transformer, ``vae.`` /
``first_stage_model.`` autoencoder, ``text_encoders.clip_l.transformer.`` and ``text_encoders.t5xxl.transformer.``)
load bit-identical to the model they were written from; a wrong embedded part is named before weights load."""

import pytest
import torch
from safetensors.torch import save_file

from app.ml.flux import keys
from app.ml.models import ModelLoadError, load_model
from app.ml.models.original_layout import vae_to_original


@pytest.fixture(scope="module")
def ref():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def config(ref, tmp_path_factory):
    """The tiny model's configs and tokenizers (what a full-size load takes from the shipped configs / the hub)."""
    root = tmp_path_factory.mktemp("flux_aio")
    ref.family.build_pipeline(ref).save_pretrained(str(root / "folder"))
    return root / "folder"


def _all_in_one(ref, path, vae_prefix="vae.", original_vae=True):
    state = {"model.diffusion_model." + k: v for k, v in keys.diffusers_to_bfl(ref.denoiser.state_dict()).items()}
    vae = ref.vae.state_dict()
    if original_vae:
        vae = vae_to_original(vae, ref.vae.config)
    state.update({vae_prefix + k: v for k, v in vae.items()})
    state.update({"text_encoders.clip_l.transformer." + k: v for k, v in ref.text_encoders[0].state_dict().items()})
    state.update({"text_encoders.t5xxl.transformer." + k: v for k, v in ref.text_encoders[1].state_dict().items()
                  if k != "encoder.embed_tokens.weight"})
    save_file({k: v.contiguous().clone() for k, v in state.items()}, str(path))
    return path


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("vae_prefix,original_vae", [("vae.", True), ("first_stage_model.", True), ("vae.", False)])
def test_an_all_in_one_checkpoint_loads_bit_identical(ref, config, tmp_path, vae_prefix, original_vae):
    path = _all_in_one(ref, tmp_path / "flux1-dev-checkpoint.safetensors", vae_prefix, original_vae)
    b = load_model(path, config=config, text_max_length=32)
    assert b.family.id == "flux-dev"
    assert _same(b.denoiser, ref.denoiser) and _same(b.vae, ref.vae)
    assert all(_same(x, y) for x, y in zip(b.text_encoders, ref.text_encoders))
    prompt = ["a red circle"]
    assert torch.equal(b.encode_prompts(prompt)["prompt_embeds"], ref.encode_prompts(prompt)["prompt_embeds"])


def test_a_part_named_one_by_one_wins_and_a_wrong_embedded_part_is_named(ref, config, tmp_path):
    path = _all_in_one(ref, tmp_path / "aio.safetensors")
    other = tmp_path / "my_ae.safetensors"
    save_file({k: v.contiguous() for k, v in ref.vae.state_dict().items()}, str(other))
    assert _same(load_model(path, config=config, split_files={"ae": other}, text_max_length=32).vae, ref.vae)

    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    bad = {k: v for k, v in state.items() if not k.startswith("vae.")}
    bad["vae.decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    bad_path = tmp_path / "aio_sd_vae.safetensors"
    save_file(bad, str(bad_path))
    with pytest.raises(ModelLoadError, match=r"aio_sd_vae.safetensors holds SD/SDXL VAE \(4 latent channels\).*ae param"):
        load_model(bad_path, config=config)
