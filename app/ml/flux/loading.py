"""Loading Flux.1 offline (backs the Flux family's part of ``load_model``): a diffusers FLUX folder, or the
split files ComfyUI users keep — the transformer (BFL ``flux1-dev.safetensors``, its fp8 versions, or the
diffusers layout) with ``ae.safetensors``, ``clip_l.safetensors`` and ``t5xxl_*.safetensors`` beside it or
named one by one (LoadModel's ``ae``, ``clip_l``, ``t5xxl`` params), or an all-in-one checkpoint holding all four
under ComfyUI's prefixes (``detect.EMBEDDED_PREFIXES``).

Every file's header is checked before any weights are read (``detect.py``): a CLIP-G where CLIP-L belongs,
an SD VAE beside a Flux transformer or a T5 of the wrong width is named by file, not found out as a shape
error minutes later. Components are built from configs (the shipped full-size ones for dev/schnell, or a
``config`` folder) on the meta device and filled strictly: a missing or unexpected tensor is an error.
dev vs schnell comes from the weights (the guidance embedder), never from a file name.

Returns the same ``parts`` dict as the other loaders in ``app/ml/models/load.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from . import detect
from .variants import CONFIGS

# names ComfyUI users give the parts, looked for beside the transformer when not named
BESIDE = {
    "ae": ("ae.safetensors", "flux_vae.safetensors", "vae.safetensors"),
    "clip_l": ("clip_l.safetensors",),
    "t5xxl": ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors",
              "t5xxl.safetensors"),
}
SLOT_KIND = {"ae": "vae", "clip_l": "clip", "t5xxl": "t5"}


def _error(msg: str) -> Exception:
    from app.ml.models.families import ModelLoadError

    return ModelLoadError(msg)


def _family(guidance: bool, forced, source: str):
    from app.ml.models.families import FLUX_DEV, FLUX_SCHNELL

    fam = FLUX_DEV if guidance else FLUX_SCHNELL
    if forced is not None and forced.id != fam.id:
        raise _error(f"{source}: family {forced.id!r} was requested but the weights are {fam.display_name} "
                     f"({'with' if guidance else 'without'} the guidance embedder).")
    return fam


def _holds(folder: Path, kind: str, own_files: tuple[str, ...]) -> bool:
    """A tokenizer folder of ``kind`` ("CLIP"/"T5"): its own vocabulary file, or ``tokenizer.json`` whose config
    names that class (transformers 5 saves only tokenizer.json, for CLIP and T5 alike)."""
    if not folder.is_dir():
        return False
    if any((folder / f).is_file() for f in own_files):
        return True
    cfg = folder / "tokenizer_config.json"
    if not (folder / "tokenizer.json").is_file():
        return False
    if not cfg.is_file():
        return kind == "CLIP"  # older CLIP folders carry no config; a T5 tokenizer.json always has one
    try:
        cls = str(json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class", ""))
    except ValueError:
        return False
    return cls.startswith(kind)


def _tokenizers(explicit: Path | None, folders: list[Path], where: Path, t5_length: int, fam, log=None):
    """CLIP-L and T5 tokenizers, each resolved as CLIP's are for SD (``app/ml/models/tokenizers.py``): the
    LoadModel ``tokenizer`` folder (``tokenizer/`` / ``tokenizer_2/`` in it, or the files themselves), then
    the other ``folders`` (a ``config`` folder, beside the model), then the Hugging Face hub once
    (``openai/clip-vit-large-patch14``, ``google/t5-v1_1-xxl``: tokenizer files only; HF_HUB_OFFLINE honoured)."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from app.ml.models.tokenizers import hub_tokenizer_folder

    roots = ([explicit] if explicit is not None else []) + list(folders)
    kinds = (("tokenizer", CLIPTokenizer, lambda d: _holds(d, "CLIP", ("vocab.json",))),
             ("tokenizer_2", T5TokenizerFast, lambda d: _holds(d, "T5", ("spiece.model",))))
    if explicit is not None and not any(holds(explicit / sub) or holds(explicit) for sub, _, holds in kinds):
        raise _error(f"Tokenizer folder {explicit} (LoadModel tokenizer param) holds no tokenizer: expected "
                     "tokenizer/ (CLIP-L: vocab.json + merges.txt or tokenizer.json) and/or tokenizer_2/ (T5: spiece.model) "
                     "in it, or those files themselves.")
    found = []
    for (sub, cls, holds), spec in zip(kinds, fam.text_encoders):
        chosen = None
        for root in roots:
            for d in ((root / sub, root) if root == explicit else (root / sub,)):
                if holds(d):
                    chosen = d
                    break
            if chosen is not None:
                break
        if chosen is None:
            chosen = hub_tokenizer_folder(spec, checkpoint=where, looked=[r / sub for r in roots],
                                          place=where.parent / sub if where.is_file() else where / sub, log=log)
        found.append((cls.from_pretrained(str(chosen)), chosen))
    (clip_tok, clip_dir), (t5_tok, t5_dir) = found
    clip_tok.model_max_length = 77
    t5_tok.model_max_length = t5_length
    return [clip_tok, t5_tok], [clip_dir, t5_dir]


def _tokenizer_param(tokenizer_path) -> Path | None:
    if not tokenizer_path:
        return None
    p = Path(tokenizer_path).expanduser()
    if not p.is_dir():
        raise _error(f"Tokenizer path {p} does not exist (LoadModel tokenizer param).")
    return p


def load_folder(folder: Path, forced, tokenizer_path, log: Callable[[str], None] | None) -> dict[str, Any]:
    """A diffusers FLUX.1 folder (``model_index.json`` naming FluxPipeline)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from app.ml.models import identity as ident

    cfg_path = folder / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise _error(f"{folder}: a Flux folder needs transformer/config.json, which is missing.")
    guidance = bool(json.loads(cfg_path.read_text(encoding="utf-8")).get("guidance_embeds", False))
    fam = _family(guidance, forced, str(folder))
    tokenizers, tok_dirs = _tokenizers(_tokenizer_param(tokenizer_path), [folder], folder, fam.t5_max_length, fam, log)
    kw = {"local_files_only": True}
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / sub).is_dir():
            raise _error(f"{folder}: {fam.display_name} needs a '{sub}/' subfolder, which is missing.")
    try:
        transformer = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer", **kw)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", **kw)
        clip = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), **kw)
        t5 = T5EncoderModel.from_pretrained(str(folder / "text_encoder_2"), **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _error(f"{folder}: could not load the diffusers Flux model: {e}") from e
    sched = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(sched.read_text(encoding="utf-8")) if sched.is_file() else _scheduler(fam)
    ids = {name: ident.folder_identity(folder / name) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    for spec, d in zip(fam.text_encoders, tok_dirs):
        ids[spec.tokenizer] = ident.folder_identity(d)
    if log:
        log(f"tokenizers from {tok_dirs[0]} and {tok_dirs[1]}")
    return {"family": fam, "unet": transformer, "vae": vae, "text_encoders": [clip, t5], "tokenizers": tokenizers,
            "scheduler_config": scheduler, "ids": ids}


def _scheduler(fam) -> dict:
    return json.loads((CONFIGS / fam.config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))


def _config(config_dir: Path | None, fam, component: str) -> dict:
    base = config_dir if config_dir is not None else CONFIGS / fam.config_dir
    path = base / component / "config.json"
    if not path.is_file():
        raise _error(f"config folder {base} has no {component}/config.json.")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _find_part(slot: str, given: str | None, transformer: Path) -> Path:
    if given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise _error(f"LoadModel: {slot} file {p} does not exist; choose the {detect._EXPECTED[SLOT_KIND[slot]]}.")
        return p
    for name in BESIDE[slot]:
        if (transformer.parent / name).is_file():
            return transformer.parent / name
    raise _error(f"LoadModel: {transformer.name} is a Flux transformer alone; {detect._EXPECTED[SLOT_KIND[slot]]} was "
                 f"not found beside it (looked for {', '.join(BESIDE[slot])}). Set LoadModel's {slot} param to its file.")


def _strict(model: torch.nn.Module, state: dict, what: str, path: Path) -> torch.nn.Module:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        raise _error(f"LoadModel: {path.name} does not fit the {what} (missing {missing[:3]}, unexpected {extra[:3]}).")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise _error(f"LoadModel: {path.name}: {k} has shape {tuple(v.shape)}, the {what} needs {tuple(own[k].shape)}.")
    model.load_state_dict({k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()},
                          strict=True, assign=True)
    return model


def _read(path: Path, prefix: str, fp8_dtype=torch.float32) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from .keys import FP8_DTYPES

    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:  # only the part's own tensors (all-in-one files)
        for k in f.keys():
            if k.startswith(prefix):
                v = f.get_tensor(k)
                out[k[len(prefix):]] = v.to(fp8_dtype) if v.dtype in FP8_DTYPES else v
    return out


def _empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def load_files(transformer: Path, forced, *, ae: str | None = None, clip_l: str | None = None,
               t5xxl: str | None = None, tokenizer_path=None, config_dir: Path | None = None,
               log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The transformer file with its VAE, CLIP-L and T5 files, each checked by its header first."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from app.ml.models import identity as ident

    from .keys import load_transformer_file

    try:
        kind = detect.expect_file(transformer, "flux-transformer")
        # an all-in-one checkpoint (ComfyUI's: model.diffusion_model. / vae. / text_encoders.clip_l|t5xxl.) holds
        # its own parts; a part named one by one still wins, and a part it lacks is looked for beside it
        inside = detect.embedded_parts(detect.read_header(transformer)) if kind.prefix else {}
        given = {"ae": ae, "clip_l": clip_l, "t5xxl": t5xxl}
        paths, kinds = {}, {}
        for slot in ("ae", "clip_l", "t5xxl"):
            if not given[slot] and slot in inside:
                paths[slot], found = transformer, inside[slot]
                if found.kind != SLOT_KIND[slot]:
                    raise detect.DetectError(f"LoadModel: {transformer} holds {found.label} under '{found.prefix}', where "
                                             f"an all-in-one checkpoint keeps {detect._EXPECTED[SLOT_KIND[slot]]}.")
            else:
                paths[slot] = _find_part(slot, given[slot], transformer)
                found = detect.expect_file(paths[slot], SLOT_KIND[slot], variant="L" if slot == "clip_l" else None)
            kinds[slot] = found
        if inside:
            inside_check = {"ae": kinds["ae"].details.get("latent_channels") == 16,
                            "clip_l": kinds["clip_l"].variant == "L"}
            bad = [s for s, ok in inside_check.items() if paths[s] == transformer and not ok]
            if bad:
                raise detect.DetectError(f"LoadModel: {transformer} holds {kinds[bad[0]].label} where Flux needs "
                                         f"{detect._EXPECTED[SLOT_KIND[bad[0]]]}; set LoadModel's {bad[0]} param to the right file.")
    except detect.DetectError as e:
        raise _error(str(e)) from None
    fam = _family(kind.variant == "dev", forced, str(transformer))
    t5_cfg = _config(config_dir, fam, "text_encoder_2")
    if kinds["t5xxl"].details.get("d_model") != t5_cfg.get("d_model"):
        raise _error(f"LoadModel: {paths['t5xxl']} holds {kinds['t5xxl'].label}, but {fam.display_name} needs a T5 of "
                     f"width {t5_cfg.get('d_model')} (T5-XXL); choose the matching file.")
    roots = ([config_dir] if config_dir else []) + [transformer.parent]
    tokenizers, tok_dirs = _tokenizers(_tokenizer_param(tokenizer_path), roots, transformer, fam.t5_max_length, fam, log)

    from .keys import FluxKeyError

    try:
        state = load_transformer_file(transformer, fp8_dtype=torch.float32)
    except FluxKeyError as e:
        raise _error(str(e)) from None
    model = _empty(lambda: FluxTransformer2DModel(**_config(config_dir, fam, "transformer")))
    model = _strict(model, state, "Flux transformer", transformer)

    vae_cfg = _config(config_dir, fam, "vae")
    raw = _read(paths["ae"], kinds["ae"].prefix)
    if kinds["ae"].layout == "original":
        raw = convert_ldm_vae_checkpoint(raw, vae_cfg)
    vae = _strict(_empty(lambda: AutoencoderKL(**vae_cfg)), raw, "Flux VAE", paths["ae"])

    clip_state = _read(paths["clip_l"], kinds["clip_l"].prefix)
    clip = _empty(lambda: CLIPTextModel(CLIPTextConfig(**_config(config_dir, fam, "text_encoder"))))
    own = set(clip.state_dict())
    clip_state = {(k if k in own else k.removeprefix("text_model.")): v for k, v in clip_state.items()
                  if not k.endswith(("position_ids", "logit_scale")) and not k.startswith("text_projection")}
    clip = _strict(clip, clip_state, "CLIP-L text encoder", paths["clip_l"])

    t5_state = _read(paths["t5xxl"], kinds["t5xxl"].prefix)
    t5 = _empty(lambda: T5EncoderModel(T5Config(**t5_cfg)))
    if "shared.weight" not in t5_state and "encoder.embed_tokens.weight" in t5_state:
        t5_state["shared.weight"] = t5_state["encoder.embed_tokens.weight"]
    t5_state.setdefault("encoder.embed_tokens.weight", t5_state.get("shared.weight"))
    t5 = _strict(t5, {k: v for k, v in t5_state.items() if v is not None}, "T5 text encoder", paths["t5xxl"])
    t5.tie_weights() if hasattr(t5, "tie_weights") else None
    for m in (model, vae, clip, t5):
        for name, buf in list(m.named_buffers()):
            if buf.is_meta:
                raise _error(f"LoadModel: buffer {name} was not filled; the {type(m).__name__} config does not fit.")

    ids = {"transformer": ident.file_identity(transformer), "vae": ident.file_identity(paths["ae"]),
           "text_encoder": ident.file_identity(paths["clip_l"]), "text_encoder_2": ident.file_identity(paths["t5xxl"])}
    for spec, d in zip(fam.text_encoders, tok_dirs):
        ids[spec.tokenizer] = ident.folder_identity(d)
    if log:
        log(f"Flux parts: {transformer.name} ({kind.label}), {paths['ae'].name}, {paths['clip_l'].name}, "
            f"{paths['t5xxl'].name}")
    return {"family": fam, "unet": model, "vae": vae, "text_encoders": [clip, t5], "tokenizers": tokenizers,
            "scheduler_config": _scheduler(fam) if config_dir is None or not (config_dir / "scheduler").is_dir()
            else json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")),
            "ids": ids}

