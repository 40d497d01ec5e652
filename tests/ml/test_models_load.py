"""load_model through its real code paths: diffusers folders, original-layout single files, .ckpt, VAE override."""

import gzip
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from app.ml.models import ModelLoadError, load_model
from app.ml.models.original_layout import bundle_to_original_state_dict, to_original_state_dict
from app.ml.models.tiny import TINY_TOKENIZER_DIR


# --------------------------------------------------------------------------------------------- helpers

def save_diffusers_folder(bundle, folder: Path) -> Path:
    """Save a bundle the way diffusers users have their models: pipeline.save_pretrained."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    sched = PNDMScheduler.from_config(dict(bundle.scheduler_config))
    if bundle.family.id == "sdxl":
        te1, te2 = bundle.text_encoders
        tok1, tok2 = bundle.tokenizers
        pipe = StableDiffusionXLPipeline(bundle.vae, te1, te2, tok1, tok2, bundle.unet, sched)
    else:
        pipe = StableDiffusionPipeline(
            bundle.vae, bundle.text_encoders[0], bundle.tokenizers[0], bundle.unet, sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(str(folder))
    return folder


def write_single_file(bundle, folder: Path, name="model.safetensors", state_dict=None) -> tuple[Path, Path]:
    """An original-layout (A1111) checkpoint of a tiny bundle plus a weightless config folder.

    Tiny models are not the full-size architecture, so the loader is pointed at their component
    configs with ``config=``; the tokenizers come from that folder too.
    """
    folder.mkdir(parents=True, exist_ok=True)
    sd = state_dict if state_dict is not None else bundle_to_original_state_dict(bundle)
    path = folder / name
    sd = {k: v.contiguous() for k, v in sd.items()}
    if name.endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd, "global_step": 10}, str(path))
    cfg = folder / "configs"
    bundle.unet.save_config(str(cfg / "unet"))
    bundle.vae.save_config(str(cfg / "vae"))
    for spec, te, tok in zip(bundle.family.text_encoders, bundle.text_encoders, bundle.tokenizers):
        te.config.save_pretrained(str(cfg / spec.name))
        tok.save_pretrained(str(cfg / spec.tokenizer))
    return path, cfg


def assert_same_weights(a, b):
    for m1, m2 in [(a.unet, b.unet), (a.vae, b.vae), *zip(a.text_encoders, b.text_encoders)]:
        s1, s2 = m1.state_dict(), m2.state_dict()
        assert set(s1) == set(s2)
        bad = [k for k in s1 if not torch.equal(s1[k], s2[k].to(s1[k].dtype))]
        assert not bad, bad[:5]


# --------------------------------------------------------------------------------------------- diffusers folders

@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_diffusers_folder_round_trip(which, request, tmp_path):
    src = request.getfixturevalue(which)
    folder = save_diffusers_folder(src, tmp_path / "model")
    loaded = load_model(folder)
    assert loaded.family.id == src.family.id
    assert_same_weights(src, loaded)
    prompts = ["a red circle", "blue square"]
    for key, value in src.encode_prompts(prompts).items():
        assert torch.equal(value, loaded.encode_prompts(prompts)[key])
    assert [t.pad_token for t in loaded.tokenizers] == [t.pad_token for t in src.tokenizers]
    # identities: stable across loads, independent of the folder's path, sensitive to content
    assert load_model(folder).identities == loaded.identities
    moved = shutil.copytree(folder, tmp_path / "copy")
    assert load_model(moved).identity == loaded.identity


def test_folder_identity_changes_when_a_component_changes(sd, tmp_path):
    folder = save_diffusers_folder(sd, tmp_path / "model")
    before = load_model(folder)
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    cfg["scaling_factor"] = 0.2
    (folder / "vae" / "config.json").write_text(json.dumps(cfg))
    after = load_model(folder)
    assert after.vae_identity != before.vae_identity
    assert after.identities["unet"] == before.identities["unet"]
    assert after.vae_scaling_factor == pytest.approx(0.2)


def test_not_a_model_folder(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="pass one of those files"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    with pytest.raises(ModelLoadError, match="builtin:tiny-sd"):
        load_model("builtin:huge")


# --------------------------------------------------------------------------------------------- single files

@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_single_file_round_trip_through_original_layout(which, request, tmp_path):
    src = request.getfixturevalue(which)
    path, cfg = write_single_file(src, tmp_path)
    keys = set(bundle_to_original_state_dict(src))
    assert any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    assert any(k.startswith("first_stage_model.decoder.up.") for k in keys)
    loaded = load_model(path, config=cfg)
    assert loaded.family.id == src.family.id  # detected from the keys
    assert_same_weights(src, loaded)
    for key, value in src.encode_prompts(["a red circle"]).items():
        assert torch.equal(value, loaded.encode_prompts(["a red circle"])[key])
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(src.encode_images(images), loaded.encode_images(images))


def test_sd2_single_file_converts_openclip_and_drops_the_unused_last_layer(tmp_path):
    """SD2 checkpoints hold 24 OpenCLIP blocks; the model uses 23. Mimic that with tiny parts."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from app.ml.models.tiny import tiny_spec

    spec = tiny_spec("tiny-sd")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(spec.unet, use_linear_projection=True, cross_attention_dim=32))
    vae = AutoencoderKL(**spec.vae)
    te_kwargs = {k: v for k, v in spec.text_encoders[0].items() if k != "_class"}
    te_kwargs.update(hidden_act="gelu", pad_token_id=0)
    te_full = CLIPTextModel(CLIPTextConfig(**te_kwargs))  # 3 layers in the file
    sd = to_original_state_dict("sd2", unet.state_dict(), unet.config, vae.state_dict(), vae.config, [te_full.state_dict()])
    sd["cond_stage_model.model.text_projection"] = torch.zeros(32, 32)
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in sd
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "sd2.safetensors"))
    cfg = tmp_path / "cfg"
    unet.save_config(str(cfg / "unet"))
    vae.save_config(str(cfg / "vae"))
    CLIPTextConfig(**dict(te_kwargs, num_hidden_layers=2)).save_pretrained(str(cfg / "text_encoder"))
    shutil.copytree(TINY_TOKENIZER_DIR, cfg / "tokenizer")

    loaded = load_model(tmp_path / "sd2.safetensors", config=cfg)
    assert loaded.family.id == "sd2" and loaded.prediction_type == "epsilon"
    te = loaded.text_encoders[0]
    assert te.config.num_hidden_layers == 2
    full = te_full.state_dict()
    for k, v in te.state_dict().items():
        assert torch.equal(v, full[k]), k
    forced = load_model(tmp_path / "sd2.safetensors", config=cfg, family="sd2-v")
    assert forced.family.id == "sd2-v" and forced.prediction_type == "v_prediction"
    assert forced.scheduler_config["prediction_type"] == "v_prediction"


def test_ckpt_loads_plain_tensors(sd, tmp_path):
    path, cfg = write_single_file(sd, tmp_path, name="model.ckpt")
    assert_same_weights(sd, load_model(path, config=cfg))


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (Path(self.target), "pwned"))


def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {"model.diffusion_model.x": _Evil(str(marker))}}, f)
    # sanity: plain unpickling really would run it
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.unlink()

    with pytest.raises(ModelLoadError, match="weights_only|refused") as e:
        load_model(path)
    assert "evil.ckpt" in str(e.value) and "safetensors" in str(e.value)
    assert not marker.exists()


def test_single_file_without_tokenizer_explains_what_to_provide(sd, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, with an empty Hugging Face cache
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    path, cfg = write_single_file(sd, tmp_path)
    shutil.rmtree(cfg / "tokenizer")
    with pytest.raises(ModelLoadError) as e:
        load_model(path, config=cfg)
    msg = str(e.value)
    assert "model.safetensors" in msg and "openai/clip-vit-large-patch14" in msg and "open_clip" not in msg
    # a user-supplied tokenizer folder fixes it
    assert load_model(path, config=cfg, tokenizer=TINY_TOKENIZER_DIR).tokenizers[0]("red").input_ids[1] > 0


def test_tokenizer_from_clip_bpe_file(sd, tmp_path):
    """OpenAI/OpenCLIP ship the vocabulary as bpe_simple_vocab_16e6.txt.gz; we convert it at load time."""
    merges = (TINY_TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    bpe = tmp_path / "bpe" / "bpe_simple_vocab_16e6.txt.gz"
    bpe.parent.mkdir()
    with gzip.open(bpe, "wt", encoding="utf-8") as f:
        f.write("\n".join(merges) + "\n")
    path, cfg = write_single_file(sd, tmp_path / "m")
    shutil.rmtree(cfg / "tokenizer")
    loaded = load_model(path, config=cfg, tokenizer=bpe.parent)
    for prompt in ("a red circle", "ohwx dog on a blue background"):
        assert loaded.tokenizers[0](prompt).input_ids == sd.tokenizers[0](prompt).input_ids


def test_damaged_checkpoint_names_the_missing_keys(sd, tmp_path):
    state = bundle_to_original_state_dict(sd)
    del state["model.diffusion_model.out.2.weight"]
    path, cfg = write_single_file(sd, tmp_path, state_dict=state)
    with pytest.raises(ModelLoadError, match=r"UNet.*missing conv_out\.weight"):
        load_model(path, config=cfg)


def test_forced_family_must_match_the_weights(sd, tmp_path):
    path, cfg = write_single_file(sd, tmp_path)
    with pytest.raises(ModelLoadError, match="'sdxl' was requested"):
        load_model(path, config=cfg, family="sdxl")
    with pytest.raises(ModelLoadError, match="'sdxl' was requested"):
        load_model("builtin:tiny-sd", family="sdxl")


def test_unknown_single_file_layout(tmp_path):
    path = tmp_path / "weird.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match="weird.safetensors: unknown checkpoint layout"):
        load_model(path)


# --------------------------------------------------------------------------------------------- dtypes, VAE, overrides

def test_dtype_per_component():
    b = load_model("builtin:tiny-sdxl", dtypes={"unet": "bf16", "vae": torch.float32, "text_encoder": "fp16", "text_encoder_2": "bf16"})
    assert b.unet.dtype == torch.bfloat16 and b.vae.dtype == torch.float32
    assert b.text_encoders[0].dtype == torch.float16 and b.text_encoders[1].dtype == torch.bfloat16
    assert dict(b.dtypes) == {"unet": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.float16, "text_encoder_2": torch.bfloat16}
    assert b.encode_prompts(["red"])["prompt_embeds"].dtype == torch.float32
    fp32 = load_model("builtin:tiny-sdxl")
    assert b.identities["unet"] != fp32.identities["unet"] and b.vae_identity == fp32.vae_identity
    with pytest.warns(UserWarning, match="overflows in fp16"):
        load_model("builtin:tiny-sdxl", dtypes={"vae": "fp16"})
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model("builtin:tiny-sd", dtypes={"unet": "int8"})
    with pytest.raises(ValueError, match="unknown dtype keys"):
        load_model("builtin:tiny-sd", dtypes={"transformer": "fp16"})


def test_single_file_dtype(sd, tmp_path):
    path, cfg = write_single_file(sd, tmp_path)
    b = load_model(path, config=cfg, dtypes={"unet": "fp16", "text_encoder": "bf16"})
    assert b.unet.dtype == torch.float16 and b.text_encoders[0].dtype == torch.bfloat16 and b.vae.dtype == torch.float32
    assert b.unet.conv_in.weight.device.type == "cpu"


def test_vae_override_from_original_file_and_from_folder(sd, sdxl, tmp_path):
    other = load_model("builtin:tiny-sdxl").vae  # same architecture, different weights
    from app.ml.models.original_layout import vae_to_original

    vae_file = tmp_path / "vae-ft.safetensors"
    original = {k.removeprefix("first_stage_model."): v.contiguous() for k, v in vae_to_original(other.state_dict(), other.config).items()}
    save_file(original, str(vae_file))
    b = load_model("builtin:tiny-sd", vae=vae_file)
    for k, v in b.vae.state_dict().items():
        assert torch.equal(v, other.state_dict()[k])
    assert b.vae_identity != sd.vae_identity and b.identities["unet"] == sd.identities["unet"]

    other.save_pretrained(str(tmp_path / "vae_folder"))
    c = load_model("builtin:tiny-sd", vae=tmp_path / "vae_folder")
    assert torch.equal(c.vae.encoder.conv_in.weight, other.encoder.conv_in.weight)

    junk = tmp_path / "junk.safetensors"
    save_file({"something.else": torch.zeros(1)}, str(junk))
    with pytest.raises(ModelLoadError, match="no VAE weights"):
        load_model("builtin:tiny-sd", vae=junk)


def test_prediction_type_override():
    b = load_model("builtin:tiny-sd", prediction_type="v_prediction")
    assert b.prediction_type == "v_prediction"
    assert b.make_noise_scheduler().config.prediction_type == "v_prediction"
    assert b.family.kohya_metadata["ss_v_parameterization"] == "True"


@pytest.mark.parametrize("source", ["builtin:tiny-sd", "builtin:tiny-flux"])
def test_a_bf16_load_casts_without_diffusers_empty_float32_warning(source):
    """diffusers' to(dtype) warns 'modules that should be kept in float32: []' on every cast: a user
    loading any preset in bf16 saw it; the cast is the same without it."""
    import logging

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    log = logging.getLogger("diffusers")
    handler = Keep(level=logging.WARNING)
    log.addHandler(handler)
    try:
        bundle = load_model(source, dtypes={"unet": "bf16", "vae": "bf16", "text_encoder": "bf16"})
    finally:
        log.removeHandler(handler)
    assert not [m for m in records if "kept in float32" in m], records
    assert all(p.dtype == torch.bfloat16 for p in bundle.denoiser.parameters())
    assert all(p.dtype == torch.bfloat16 for p in bundle.vae.parameters())
