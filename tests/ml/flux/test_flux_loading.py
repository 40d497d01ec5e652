"""Flux loads offline from a diffusers folder and from split files (BFL transformer + ae + clip_l + t5xxl),
bit-identical to the built-in model; a wrong or missing part is named by file before weights load, also by
recipe validation."""

import json

import pytest
import torch
from safetensors.torch import save_file

from app.graph.inputs_check import check_flux_part, check_model_source
from app.ml.flux import keys
from app.ml.models import ModelLoadError, load_model


@pytest.fixture(scope="module")
def ref():
    return load_model("builtin:tiny-flux")


@pytest.fixture(scope="module")
def saved(ref, tmp_path_factory):
    """The tiny model as a diffusers folder and as ComfyUI-style split files."""
    root = tmp_path_factory.mktemp("flux")
    ref.family.build_pipeline(ref).save_pretrained(str(root / "folder"))
    files = root / "files"
    files.mkdir()
    save_file(keys.diffusers_to_bfl(ref.denoiser.state_dict()), str(files / "flux1-dev.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.vae.state_dict().items()}, str(files / "ae.safetensors"))
    save_file({k: v.contiguous() for k, v in ref.text_encoders[0].state_dict().items()}, str(files / "clip_l.safetensors"))
    t5 = {k: v.contiguous().clone() for k, v in ref.text_encoders[1].state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(t5, str(files / "t5xxl_fp16.safetensors"))
    return root


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_diffusers_flux_folder_loads_bit_identical(ref, saved):
    b = load_model(saved / "folder", text_max_length=32)
    assert b.family.id == "flux-dev"
    assert _same(b.denoiser, ref.denoiser) and _same(b.vae, ref.vae)
    assert all(_same(x, y) for x, y in zip(b.text_encoders, ref.text_encoders))
    assert torch.equal(b.encode_prompts(["a red circle"])["prompt_embeds"], ref.encode_prompts(["a red circle"])["prompt_embeds"])
    assert load_model(saved / "folder").tokenizers[1].model_max_length == 512  # dev's default T5 length


def test_split_files_load_bit_identical(ref, saved):
    b = load_model(saved / "files" / "flux1-dev.safetensors", config=saved / "folder", text_max_length=32)
    assert b.family.id == "flux-dev" and b.dtypes["transformer"] == torch.float32
    assert _same(b.denoiser, ref.denoiser) and _same(b.vae, ref.vae)
    assert all(_same(x, y) for x, y in zip(b.text_encoders, ref.text_encoders))
    # named one by one (LoadModel's ae / clip_l / t5xxl), from anywhere
    other = saved / "elsewhere"
    other.mkdir(exist_ok=True)
    (other / "my_vae.safetensors").write_bytes((saved / "files" / "ae.safetensors").read_bytes())
    c = load_model(saved / "files" / "flux1-dev.safetensors", config=saved / "folder", text_max_length=32,
                   split_files={"ae": other / "my_vae.safetensors"})
    assert _same(c.vae, ref.vae)


def test_a_wrong_or_missing_part_is_named_before_loading(saved, tmp_path):
    files = saved / "files"
    t = files / "flux1-dev.safetensors"
    with pytest.raises(ModelLoadError, match=r"clip_l.safetensors holds CLIP-L text encoder.*needs the T5-XXL"):
        load_model(t, config=saved / "folder", split_files={"t5xxl": files / "clip_l.safetensors"})
    sd_vae = tmp_path / "sdxl_vae.safetensors"
    save_file({"decoder.conv_in.weight": torch.zeros(16, 4, 3, 3), "decoder.up_blocks.0.x": torch.zeros(1)}, str(sd_vae))
    with pytest.raises(ModelLoadError, match=r"sdxl_vae.safetensors holds SD/SDXL VAE \(4 latent channels\)"):
        load_model(t, config=saved / "folder", split_files={"ae": sd_vae})
    wide = tmp_path / "t5_wide.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(8, 64)}, str(wide))
    with pytest.raises(ModelLoadError, match=r"t5_wide.safetensors holds T5 text encoder \(width 64.*width 32"):
        load_model(t, config=saved / "folder", split_files={"t5xxl": wide})
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "flux1-dev.safetensors").write_bytes(t.read_bytes())
    with pytest.raises(ModelLoadError, match=r"ae.safetensors.*Set LoadModel's ae param"):
        load_model(alone / "flux1-dev.safetensors", config=saved / "folder")


def test_validation_reads_flux_headers(saved):
    assert check_model_source(saved / "folder", {"family": "auto"}) is None
    assert check_model_source(saved / "files" / "flux1-dev.safetensors", {"family": "auto"}) is None
    assert "flux-dev" in check_model_source(saved / "files" / "flux1-dev.safetensors", {"family": "sdxl"})
    assert check_flux_part("clip_l")(saved / "files" / "clip_l.safetensors", {}) is None
    problem = check_flux_part("ae")(saved / "files" / "t5xxl_fp16.safetensors", {})
    assert "T5 text encoder" in problem and "'ae' needs the Flux VAE" in problem


def test_validation_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, app.graph.inputs_check, app.ml.flux.detect; "
            "sys.exit(1 if {'torch', 'diffusers', 'transformers'} & set(sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_an_fp8_transformer_file_loads_upcast(ref, saved, tmp_path):
    files = tmp_path / "fp8"
    files.mkdir()
    for name in ("ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
        (files / name).write_bytes((saved / "files" / name).read_bytes())
    bfl = keys.diffusers_to_bfl(ref.denoiser.state_dict())
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in bfl.items()}, str(files / "flux1-dev-fp8.safetensors"))
    b = load_model(files / "flux1-dev-fp8.safetensors", config=saved / "folder", text_max_length=32)
    want = {k: v.to(torch.float8_e4m3fn).float() for k, v in ref.denoiser.state_dict().items()}
    got = b.denoiser.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want) and got["x_embedder.weight"].dtype == torch.float32


def test_a_flux_model_with_a_merged_lora_saves_as_a_folder_and_a_bfl_file_and_loads_back(ref, saved, tmp_path):
    from app.ml.adapters import AdapterConfig, attached, create_adapter_set
    from app.ml.save import save_diffusers, save_single_file

    aset = create_adapter_set(ref, AdapterConfig(rank=4, alpha=4.0, targets={"unet": "attn-only"}))
    with torch.no_grad():
        for e in aset.entries():
            e.module.lora_up.weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    folder = save_diffusers(ref, tmp_path / "merged", adapters=[(aset, 1.0)], dtype="fp32")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    back = load_model(folder, text_max_length=32)
    noisy = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    text = ref.encode_prompts(["red"])
    cond = ref.family.conditioning(ref, text, pixel_size=(32, 32), batch=1, device="cpu", guidance=1.0)
    with torch.no_grad():
        with attached(ref, aset):
            want = ref.family.predict(ref.denoiser, noisy, torch.tensor([0.5]), cond)
        got = back.family.predict(back.denoiser, noisy, torch.tensor([0.5]), cond)
    assert torch.allclose(got, want, atol=1e-5)
    files = tmp_path / "single"
    files.mkdir()
    path = save_single_file(ref, files / "flux1-dev-merged.safetensors", adapters=[(aset, 1.0)], dtype="fp32")
    for name in ("ae.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors"):
        (files / name).write_bytes((saved / "files" / name).read_bytes())
    single = load_model(path, config=saved / "folder", text_max_length=32)
    assert _same(single.denoiser, back.denoiser)
