"""``load_model``: builtin tiny models, diffusers folders and original-layout single files, offline.

Single files are read once, component by component (only that component's tensors are in memory
next to the finished model), converted with diffusers' own ``convert_ldm_*`` functions and loaded
into models built from the configs shipped in ``configs/<family>/`` with empty (meta) weights, so
a full-size load neither downloads anything nor spends time on random initialisation. Loading is
strict: a missing or unexpected tensor is an error naming the file and the keys, because a model
that silently keeps random weights trains garbage.

``.ckpt``/``.pt`` files are opened only with ``torch.load(weights_only=True)``: a pickle that needs to
run code is refused, never executed.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch

from . import identity as ident
from .bundle import DTYPE_NAMES, ModelBundle, freeze, parse_dtype, warn_fp16_sdxl_vae
from .families import (
    ModelFamily,
    ModelLoadError,
    detect_diffusers_family,
    detect_single_file_family,
    get_family,
)
from .tiny import CONFIGS, build_tiny_components

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")

# Keys that original checkpoints carry and that no diffusers component wants.
_IGNORED_EXTRA = ("position_ids", "logit_scale")


# ==================================================================================================
# public entry point
# ==================================================================================================

def load_model(
    source: "str | os.PathLike",
    family: "str | ModelFamily | None" = None,
    dtypes: "Mapping[str, str | torch.dtype] | None" = None,
    vae: "str | os.PathLike | None" = None,
    *,
    tokenizer: "str | os.PathLike | None" = None,
    prediction_type: str | None = None,
    split_files: "Mapping[str, str | os.PathLike | None] | None" = None,
    config: "str | os.PathLike | None" = None,
    text_max_length: int | None = None,
    quant: "Mapping[str, str] | None" = None,
    fp8_block_size: int = 128,
    check_cancel: "Callable[[], None] | None" = None,
    log: "Callable[[str], None] | None" = None,
) -> ModelBundle:
    """Load a base model into a ``ModelBundle`` without touching the network.

    ``source``: ``builtin:<name>`` (see tiny.py: shapes-sd, tiny-sd, tiny-sdxl, ...), a diffusers folder, or a single
    ``.safetensors``/``.ckpt`` in the original (A1111/Civitai) layout.
    ``family``: force a family id (needed to choose ``sd2-v`` for 768 v-prediction single files,
    whose weights look exactly like ``sd2``); must agree with what the weights show otherwise.
    ``dtypes``: per component, keys ``unet``, ``vae``, ``text_encoder`` (all encoders) and optionally
    ``text_encoder_2``; values fp32/fp16/bf16 or torch dtypes; default fp32.
    ``vae``: optional VAE override (diffusers folder, or a single file in original or diffusers layout).
    ``tokenizer``: a tokenizer folder that wins over the model's own or the one beside it; otherwise
    one beside the model is used, else it is fetched once from the Hugging Face hub (see ``tokenizers.py``).
    ``prediction_type``: override ("epsilon" / "v_prediction"), e.g. for a v-pred SD1.5 fine-tune.
    ``config``: for single files, a diffusers-layout folder of component configs (``unet/config.json``,
    ``vae/config.json``, ``text_encoder/config.json``, ...; weights not needed) to use instead of the
    shipped full-size configs, for non-standard architectures. Its tokenizer folders are used too.
    ``split_files``: Flux split files, ``{"ae": ..., "clip_l": ..., "t5xxl": ...}`` (each optional: by default
    ``ae.safetensors``, ``clip_l.safetensors``, ``t5xxl_*.safetensors`` beside the transformer file).
    ``text_max_length``: prompt tokens of families with a settable length (Flux's T5: 512 dev, 256 schnell;
    the builtin tiny model 32); None = the family's default. Part of the text identity (cache key).
    ``quant``: per component (keys as ``dtypes``; no VAE), none/fp8/int8/nf4: the Linear weights are stored
    quantized and frozen (QLoRA; ``app/ml/memory/quant.py``), except the family's ``quant_keep`` layers.
    Applied right after loading, so every consumer sees the quantized model; the format is part of the
    component's identity (caches never mix precisions) and recorded in ``bundle.quant``.
    ``fp8_block_size``: fp8's scale granularity, one scale per this many input columns; 0 = one per tensor.
    ``log``: progress lines (a tokenizer being fetched from the hub, and where tokenizers came from).
    """
    src = str(source)
    check = check_cancel or (lambda: None)  # raises on a stop request: called between the slow parts
    _import_libraries(check)
    forced = get_family(family) if family is not None else None
    if src.startswith("builtin:"):
        parts = _load_builtin(src[len("builtin:"):], forced)
    else:
        path = Path(src).expanduser()
        if not path.exists():
            raise ModelLoadError(f"Model not found: {path}. Give a diffusers folder, a .safetensors/.ckpt file or a builtin model such as builtin:shapes-sd.")
        split = {k: str(v) for k, v in (split_files or {}).items() if v}
        config_dir = Path(config).expanduser() if config else None
        if path.is_dir() and _is_flux_folder(path):
            from app.ml.flux.loading import load_folder

            parts = load_folder(path, forced, tokenizer, log)
        elif path.is_dir():
            parts = _load_diffusers_folder(path, forced, tokenizer, log)
        elif path.suffix.lower() == ".safetensors" and (split or _is_flux_transformer(path)):
            from app.ml.flux.loading import load_files

            parts = load_files(path, forced, **split, tokenizer_path=tokenizer, config_dir=config_dir, log=log)
        elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
            parts = _load_single_file(path, forced, tokenizer, config_dir, log)
        else:
            raise ModelLoadError(f"{path.name}: not a model file (expected {', '.join(SINGLE_FILE_SUFFIXES)}) or a diffusers folder.")

    check()
    fam: ModelFamily = parts["family"]
    if prediction_type is not None:
        fam = fam.with_prediction_type(prediction_type)
    scheduler_config = dict(parts["scheduler_config"])
    scheduler_config["prediction_type"] = fam.prediction_type

    if vae is not None:
        parts["vae"], parts["ids"]["vae"] = _load_vae_override(Path(vae).expanduser(), parts["vae"].config)

    if text_max_length:
        fam.set_text_length(parts["tokenizers"], text_max_length, src)
    resolved = _resolve_dtypes(dtypes, fam)
    quantized = _resolve_quant(quant, fam)
    identities: dict[str, str] = {}
    denoiser = parts["unet"]  # the family's denoiser (a Flux transformer too) under the loaders' internal name
    for name, module in _named_components(fam, parts):
        check()
        dtype = resolved[name]
        if name == "vae":
            warn_fp16_sdxl_vae(fam, dtype)
        if module.dtype != dtype:
            _cast(module, dtype)
        freeze(module)
        identities[name] = ident.combine(parts["ids"][name], DTYPE_NAMES[dtype])
        if name in quantized:
            fmt = quantized[name]
            _quantize(module, fmt, name, fam, fp8_block_size, log)
            identities[name] = ident.combine(identities[name], fmt, f"block={fp8_block_size}" if fmt == "fp8" else "")
    for te, tok in zip(fam.text_encoders, parts["tokenizers"]):
        identities[te.tokenizer] = parts["ids"].get(te.tokenizer) or ident.combine(
            json.dumps(tok.get_vocab(), sort_keys=True)[:100000], str(tok.pad_token), str(tok.model_max_length)
        )
    fam.check_components(denoiser, parts["text_encoders"], src)
    return ModelBundle(
        family=fam,
        denoiser=denoiser,
        vae=parts["vae"],
        text_encoders=parts["text_encoders"],
        tokenizers=parts["tokenizers"],
        scheduler_config=scheduler_config,
        dtypes=resolved,
        identities=identities,
        source=src,
        quant=quantized,
    )


def _is_flux_folder(folder: Path) -> bool:
    return str(_read_json(folder / "model_index.json").get("_class_name", "")).startswith("Flux")


def _is_flux_transformer(path: Path) -> bool:
    """From the header only: a Flux transformer file (BFL, all-in-one prefix or diffusers names)."""
    from app.ml.flux import detect

    try:
        return detect.detect_file(path).kind == "flux-transformer"
    except detect.DetectError:
        return False  # the single-file loader names what is wrong with it


def _import_libraries(check: "Callable[[], None]") -> None:
    """transformers and diffusers take seconds to import (far longer on a busy machine), and an import
    cannot stop half-way: import them one at a time, checking for a stop request in between."""
    check()
    from transformers import CLIPTextModel  # noqa: F401
    check()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    check()


def _named_components(fam: ModelFamily, parts: dict) -> Iterator[tuple[str, Any]]:
    yield fam.denoiser, parts["unet"]
    yield "vae", parts["vae"]
    for spec, te in zip(fam.text_encoders, parts["text_encoders"]):
        yield spec.name, te


def _cast(module, dtype: torch.dtype) -> None:
    """``module.to(dtype)``. diffusers' ``to`` warns on every cast of a model that lists no modules to
    keep in float32 (its list is empty: the warning says nothing), so those cast as plain modules."""
    if getattr(module, "_keep_in_fp32_modules", None):
        module.to(dtype)  # a real list: diffusers' own cast and its warning apply
    else:
        torch.nn.Module.to(module, dtype)


def _resolve_dtypes(dtypes: Mapping | None, fam: ModelFamily) -> dict[str, torch.dtype]:
    dtypes = dict(dtypes or {})
    known = ["unet", *([fam.denoiser] if fam.denoiser != "unet" else []), "vae", "text_encoder", "text_encoder_2"]
    unknown = set(dtypes) - set(known)
    if unknown:
        raise ValueError(f"unknown dtype keys {sorted(unknown)}; use {', '.join(known)}")
    # "unet" is the denoiser's dtype whatever the family calls it (LoadModel's unet_dtype)
    denoiser = dtypes.get(fam.denoiser, dtypes.get("unet", "fp32"))
    out = {fam.denoiser: parse_dtype(denoiser), "vae": parse_dtype(dtypes.get("vae", "fp32"))}
    te_default = dtypes.get("text_encoder", "fp32")
    for spec in fam.text_encoders:
        out[spec.name] = parse_dtype(dtypes.get(spec.name, te_default))
    return out


def _resolve_quant(quant: Mapping | None, fam: ModelFamily) -> dict[str, str]:
    """Component -> format of the components to quantize ("none" and missing keys: not quantized)."""
    from app.ml.memory.quant import FORMATS

    quant = dict(quant or {})
    known = ["unet", *([fam.denoiser] if fam.denoiser != "unet" else []), "text_encoder", "text_encoder_2"]
    unknown = set(quant) - set(known)
    if unknown:
        raise ModelLoadError(f"cannot quantize {', '.join(sorted(unknown))}: quantization applies to "
                             f"{', '.join(known)} (the VAE's convolutions stay as they are)")
    wanted = {fam.denoiser: quant.get(fam.denoiser, quant.get("unet", "none"))}
    for spec in fam.text_encoders:
        wanted[spec.name] = quant.get(spec.name, quant.get("text_encoder", "none"))
    for name, fmt in wanted.items():
        if fmt not in ("none", *FORMATS):
            raise ModelLoadError(f"unknown weight format {fmt!r} for the {name}; choose none, {', '.join(FORMATS)}")
    return {name: fmt for name, fmt in wanted.items() if fmt != "none"}


def _quantize(module, fmt: str, name: str, fam: ModelFamily, fp8_block_size: int, log) -> None:
    """Replace ``module``'s Linear weights by quantized frozen ones in place, and say what it saved."""
    from app.ml.memory.quant import QuantError, module_bytes, quantize_component

    before = module_bytes(module)
    try:
        report = quantize_component(module, fmt, name, keep=fam.quant_keep,
                                    block_size=fp8_block_size if fmt == "fp8" else None, where="LoadModel")
    except QuantError as e:
        raise ModelLoadError(str(e)) from None
    if log is not None:
        log(f"{name} quantized to {report.summary()}; the {name} now holds {module_bytes(module) / 2**20:.1f} MiB "
            f"(was {before / 2**20:.1f} MiB)")


def _check_forced(forced: ModelFamily | None, detected: ModelFamily, src: str) -> ModelFamily:
    if forced is None:
        return detected
    same_weights = {forced.id, detected.id} <= {"sd2", "sd2-v"} or forced.config_dir == detected.config_dir
    if not same_weights and forced.id != detected.id:
        raise ModelLoadError(
            f"{src}: family {forced.id!r} was requested but the weights are {detected.display_name} ({detected.id})."
        )
    return forced


# ==================================================================================================
# builtin
# ==================================================================================================

def _load_builtin(name: str, forced: ModelFamily | None) -> dict:
    comps = build_tiny_components(name)
    fam = _check_forced(forced, comps["family"], f"builtin:{name}")
    ids = {
        fam.denoiser: ident.tensors_identity(comps["unet"].state_dict().items()),
        "vae": ident.tensors_identity(comps["vae"].state_dict().items()),
    }
    for spec, te in zip(fam.text_encoders, comps["text_encoders"]):
        ids[spec.name] = ident.tensors_identity(te.state_dict().items())
    comps["family"] = fam
    comps["ids"] = {k: ident.combine(f"builtin:{name}", k, v) for k, v in ids.items()}
    return comps


# ==================================================================================================
# diffusers folders
# ==================================================================================================

def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e}).") from None


def _load_diffusers_folder(folder: Path, forced: ModelFamily | None, tokenizer_path=None, log=None) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from .tokenizers import find_tokenizers

    model_index = _read_json(folder / "model_index.json")
    unet_cfg = _read_json(folder / "unet" / "config.json")
    if not unet_cfg:
        hint = ""
        if any(folder.glob("*.safetensors")):
            hint = " It holds .safetensors files: pass one of those files instead."
        raise ModelLoadError(
            f"{folder}: not a diffusers model folder (no unet/config.json; model_index.json "
            f"{'found' if model_index else 'missing'}).{hint}"
        )
    detected = detect_diffusers_family(
        model_index,
        unet_cfg,
        _read_json(folder / "text_encoder" / "config.json"),
        _read_json(folder / "scheduler" / "scheduler_config.json"),
        source=str(folder),
    )
    fam = _check_forced(forced, detected, str(folder))

    def sub(name: str) -> Path:
        p = folder / name
        if not p.is_dir():
            raise ModelLoadError(f"{folder}: {fam.display_name} needs a '{name}/' subfolder, which is missing.")
        return p

    kw = {"local_files_only": True}
    # tokenizers first (the folder's own unless the user chose others): fail before loading weights
    tokenizers, tok_origins = find_tokenizers(fam, folder, checkpoint=folder, user_path=tokenizer_path, log=log)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", variant=_variant(sub("unet")), **kw)
        vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", variant=_variant(sub("vae")), **kw)
        text_encoders = []
        for spec in fam.text_encoders:
            cls = CLIPTextModelWithProjection if spec.model_class == "CLIPTextModelWithProjection" else CLIPTextModel
            text_encoders.append(cls.from_pretrained(str(sub(spec.name)), **kw))
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{folder}: could not load the diffusers model: {e}") from e

    scheduler_config = _read_json(folder / "scheduler" / "scheduler_config.json") or _family_scheduler_config(fam)
    ids = {"unet": ident.folder_identity(folder / "unet"), "vae": ident.folder_identity(folder / "vae")}
    for spec, origin in zip(fam.text_encoders, tok_origins):
        ids[spec.name] = ident.folder_identity(folder / spec.name)
        ids[spec.tokenizer] = _origin_identity(Path(origin))
    return {
        "family": fam,
        "unet": unet,
        "vae": vae,
        "text_encoders": text_encoders,
        "tokenizers": tokenizers,
        "scheduler_config": scheduler_config,
        "ids": ids,
    }


def _variant(component_dir: Path) -> str | None:
    """Use the plain weights when present, else an fp16/bf16 variant (``*.fp16.safetensors``)."""
    names = [p.name for p in component_dir.iterdir()]
    if any(n in names for n in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin")):
        return None
    for v in ("fp16", "bf16"):
        if any(f".{v}." in n for n in names):
            return v
    return None


def _family_scheduler_config(fam: ModelFamily) -> dict:
    return _read_json(CONFIGS / fam.config_dir / "scheduler" / "scheduler_config.json")


# ==================================================================================================
# single files
# ==================================================================================================

class _Checkpoint:
    """Read-only view of a checkpoint's tensors, fetched lazily by key."""

    def __init__(self, keys: list[str], get: Callable[[str], torch.Tensor], metadata: dict[str, str]):
        self.keys = keys
        self.get = get
        self.metadata = metadata

    def subset(self, prefix: str, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        out = {}
        for k in self.keys:
            if k.startswith(prefix):
                t = self.get(k)
                if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                out[k] = t
        return out


@contextmanager
def open_checkpoint(path: Path) -> Iterator[_Checkpoint]:
    """Open a ``.safetensors`` (memory-mapped) or ``.ckpt`` (``weights_only`` unpickling only)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                yield _Checkpoint(list(f.keys()), f.get_tensor, dict(f.metadata() or {}))
        except SafetensorError as e:
            raise ModelLoadError(f"{path.name}: not a readable safetensors file ({e}).") from e
        return
    sd = _torch_load_safely(path)
    yield _Checkpoint(list(sd.keys()), sd.__getitem__, {})


def _torch_load_safely(path: Path) -> dict[str, torch.Tensor]:
    def refuse(e: BaseException) -> ModelLoadError:
        tail = str(e).split("WeightsUnpickler error:", 1)[-1]
        lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
        detail = lines[0] if lines and "WeightsUnpickler error:" in str(e) else type(e).__name__
        return ModelLoadError(
            f"{path.name}: refused to load. Pickle-based checkpoints can run arbitrary code when opened, so "
            "NodeTrainer only reads plain tensors from them (torch.load(weights_only=True)), and this file "
            f"asks for more than that ({detail}). Use a .safetensors version of the model, or convert this "
            "file yourself only if you trust its source."
        )

    obj = None
    for mmap in (True, False):
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*pickle protocol.*")
                obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
            break
        except pickle.UnpicklingError as e:
            raise refuse(e) from None
        except RuntimeError as e:
            if mmap and ("mmap" in str(e) or "zip" in str(e).lower()):
                continue  # legacy (non-zip) torch.save format: retry without mmap
            if "weights_only" in str(e) or "Unsupported" in str(e):
                raise refuse(e) from None
            raise ModelLoadError(f"{path.name}: could not read the checkpoint ({e}).") from e
        except (EOFError, ValueError, OSError) as e:
            raise ModelLoadError(
                f"{path.name}: could not read the checkpoint ({type(e).__name__}: {str(e) or 'empty or truncated file'})."
            ) from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)} if isinstance(obj, dict) else {}
    if not tensors:
        raise ModelLoadError(f"{path.name}: contains no tensor state dict.")
    return tensors


def _original_config_text(path: Path) -> str | None:
    for cand in (path.with_suffix(".yaml"), path.with_suffix(".yml")):
        if cand.is_file():
            return cand.read_text(encoding="utf-8", errors="replace")
    return None


def _origin_identity(p: Path) -> str:
    return ident.folder_identity(p) if p.is_dir() else ident.file_identity(p)


def _load_single_file(path: Path, forced: ModelFamily | None, tokenizer_path, config_override: Path | None,
                      log=None) -> dict:
    from .tokenizers import find_tokenizers

    with open_checkpoint(path) as ckpt:
        detected = detect_single_file_family(
            ckpt.keys, source=path.name, metadata=ckpt.metadata, original_config_text=_original_config_text(path)
        )
        fam = _check_forced(forced, detected, path.name)
        config_dir = CONFIGS / fam.config_dir
        if config_override is not None:
            if not (config_override / "unet" / "config.json").is_file():
                raise ModelLoadError(f"config folder {config_override} has no unet/config.json.")
            config_dir = config_override
        # tokenizers first: a missing tokenizer should fail before minutes of weight loading
        tokenizers, tok_origins = find_tokenizers(
            fam, config_dir, checkpoint=path, user_path=tokenizer_path,
            extra_roots=[config_override] if config_override else [], log=log,
        )
        unet = _single_file_unet(ckpt, config_dir, path)
        vae = _single_file_vae(ckpt.subset("first_stage_model."), _read_json(config_dir / "vae" / "config.json"), path)
        text_encoders = [_single_file_text_encoder(ckpt, fam, i, config_dir, path) for i in range(len(fam.text_encoders))]

    file_id = ident.file_identity(path)
    ids = {name: ident.combine(file_id, name) for name in ("unet", "vae", *(te.name for te in fam.text_encoders))}
    for te, origin in zip(fam.text_encoders, tok_origins):
        ids[te.tokenizer] = _origin_identity(Path(origin))
    return {
        "family": fam,
        "unet": unet,
        "vae": vae,
        "text_encoders": text_encoders,
        "tokenizers": tokenizers,
        "scheduler_config": _read_json(config_dir / "scheduler" / "scheduler_config.json") or _family_scheduler_config(fam),
        "ids": ids,
    }


def _empty_model(factory: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a module with parameters on the meta device (buffers stay real): no init cost."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return factory()


def _assign_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], what: str, path: Path, ignore_extra: tuple[str, ...] = ()) -> torch.nn.Module:
    expected = model.state_dict()
    extra = [k for k in state_dict if k not in expected and not k.endswith(_IGNORED_EXTRA + ignore_extra)]
    state_dict = {k: v for k, v in state_dict.items() if k in expected}
    missing = [k for k, v in expected.items() if k not in state_dict and v.device.type == "meta"]
    mismatched = [
        f"{k} {tuple(v.shape)} vs expected {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or extra or mismatched:
        def show(items):
            return ", ".join(items[:8]) + (f" ... ({len(items)} in all)" if len(items) > 8 else "")

        problems = []
        if missing:
            problems.append(f"missing {show(missing)}")
        if extra:
            problems.append(f"unexpected {show(extra)}")
        if mismatched:
            problems.append(f"wrong shapes {show(mismatched)}")
        raise ModelLoadError(
            f"{path.name}: the {what} weights do not match the expected architecture: " + "; ".join(problems)
            + ". The file may be damaged, of another model family, or need family= set explicitly."
        )
    model.load_state_dict(state_dict, strict=False, assign=True)
    return model


def _single_file_unet(ckpt: _Checkpoint, config_dir: Path, path: Path):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _read_json(config_dir / "unet" / "config.json")
    raw = ckpt.subset("model.diffusion_model.")
    if any(k.startswith("model_ema.") for k in ckpt.keys):
        warnings.warn(f"{path.name}: has EMA weights; loading the non-EMA (training) weights.", stacklevel=4)
    converted = _quietly(convert_ldm_unet_checkpoint, raw, config)
    del raw
    model = _empty_model(lambda: UNet2DConditionModel.from_config(config))
    return _assign_strict(model, converted, "UNet", path)


def _single_file_vae(raw: dict[str, torch.Tensor], config: dict, path: Path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    converted = _quietly(convert_ldm_vae_checkpoint, raw, config)
    del raw
    model = _empty_model(lambda: AutoencoderKL.from_config(config))
    return _assign_strict(model, converted, "VAE", path)


def _single_file_text_encoder(ckpt: _Checkpoint, fam: ModelFamily, index: int, config_dir: Path, path: Path):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    spec = fam.text_encoders[index]
    cls = CLIPTextModelWithProjection if spec.model_class == "CLIPTextModelWithProjection" else CLIPTextModel
    config = CLIPTextConfig.from_pretrained(str(config_dir / spec.name))
    model = _empty_model(lambda: cls(config))

    if fam.id == "sd15" or (fam.id == "sdxl" and index == 0):
        prefix = "cond_stage_model.transformer." if fam.id == "sd15" else "conditioner.embedders.0.transformer."
        raw = ckpt.subset(prefix)
        sd = {k[len(prefix):]: v for k, v in raw.items()}
    else:
        prefix = "cond_stage_model.model." if fam.id in ("sd2", "sd2-v") else "conditioner.embedders.1.model."
        raw = ckpt.subset(prefix)
        # OpenCLIP's q/k/v split point is the layer width, which diffusers reads from text_projection
        # when present; SD2's 24th block and projection are unused (SD2 conditions on the penultimate layer).
        sd = _quietly(convert_open_clip_checkpoint, model, raw, prefix=prefix)
        if fam.id in ("sd2", "sd2-v"):
            n = config.num_hidden_layers
            sd = {k: v for k, v in sd.items() if not _layer_at_or_above(k, n) and not k.startswith("text_projection")}
    del raw
    if hasattr(model, "text_model"):  # CLIPTextModelWithProjection keeps the text_model level
        sd = {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v for k, v in sd.items()}
    else:  # transformers 5 flattened CLIPTextModel; old SD1 files may lack the level too
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return _assign_strict(model, sd, f"text encoder {index + 1} ({spec.architecture})", path)


def _layer_at_or_above(key: str, n: int) -> bool:
    marker = "encoder.layers."
    if marker not in key:
        return False
    idx = key.split(marker, 1)[1].split(".", 1)[0]
    return idx.isdigit() and int(idx) >= n


def _quietly(fn, *args, **kwargs):
    """diffusers' converters log EMA notices etc. through their logger; keep our own messages instead."""
    from diffusers.utils import logging as dlog

    level = dlog.get_verbosity()
    dlog.set_verbosity_error()
    try:
        return fn(*args, **kwargs)
    finally:
        dlog.set_verbosity(level)


# ==================================================================================================
# VAE override
# ==================================================================================================

def _load_vae_override(path: Path, base_config) -> tuple[Any, str]:
    """A VAE from a diffusers folder (or its vae/ subfolder) or a single file, original or diffusers layout.

    Single files take the architecture of the VAE they replace (``base_config``).
    """
    from diffusers import AutoencoderKL

    if not path.exists():
        raise ModelLoadError(f"VAE not found: {path}.")
    if path.is_dir():
        folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise ModelLoadError(f"{path}: not a diffusers VAE folder (no config.json, no vae/config.json).")
        try:
            model = AutoencoderKL.from_pretrained(str(folder), local_files_only=True, variant=_variant(folder))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"{path}: could not load the VAE: {e}") from e
        return model, ident.folder_identity(folder)
    config = dict(base_config)
    with open_checkpoint(path) as ckpt:
        keys = ckpt.keys
        if any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys):
            model = _empty_model(lambda: AutoencoderKL.from_config(config))
            model = _assign_strict(model, ckpt.subset(""), "VAE", path)
        elif any(k.startswith(("first_stage_model.", "encoder.down.", "vae.")) for k in keys):
            prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in keys) else ""
            model = _single_file_vae(ckpt.subset(prefix), config, path)
        else:
            raise ModelLoadError(
                f"{path.name}: no VAE weights found (looked for 'first_stage_model.*', 'encoder.down.*' "
                "(original layout) or 'encoder.down_blocks.*' (diffusers layout))."
            )
    return model, ident.file_identity(path)
