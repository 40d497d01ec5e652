"""Embedding files: the layouts A1111/Forge, ComfyUI, OneTrainer and diffusers read and write.

One key per text encoder, the family's ``TextEncoderSpec.embedding_key``:

* SD 1.x / 2.x: ``emb_params`` (``num_vectors x width``). A1111 reads it as its one-tensor case,
  ComfyUI by the key; diffusers ``load_textual_inversion(path, token=...)`` reads it as its
  one-key ``{token: tensor}`` case (pass ``token``, or the key would become the token).
* SDXL: ``clip_l`` (768 wide, ``text_encoder``) and ``clip_g`` (1280, ``text_encoder_2``): the
  layout A1111/Forge and ComfyUI load for SDXL. diffusers cannot take such a file by path (two
  keys are neither of its layouts); it loads each encoder's tensor with
  ``pipe.load_textual_inversion(sd["clip_l"], token=t, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)``
  and the same for ``clip_g`` with ``text_encoder_2`` / ``tokenizer_2``.
* Flux: ``clip_l`` and ``t5``, as OneTrainer writes them.

Read as well: A1111 ``.pt`` files (``string_to_param: {"*": tensor}``, through
``torch.load(weights_only=True)``, so a pickle that needs code is refused, never run) and diffusers
``learned_embeds`` files (``{token: tensor}``, ``.safetensors`` or ``.bin``).

Bundled in a LoRA file (OneTrainer's "bundle embeddings", read by A1111's LoRA loader and SD.Next):
``bundle_emb.<token>.string_to_param.*`` for one-encoder families, ``bundle_emb.<token>.clip_l`` /
``.clip_g`` (``.t5``) otherwise; A1111 uses ``<token>`` as the prompt word.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from app.atomic import atomic_file

from .embedding_set import EmbeddingError, EmbeddingSet, check_token, is_embedding
from .patch import check_compatible

BUNDLE_PREFIX = "bundle_emb."
TOKEN_KEY = "nodetrainer_embedding_token"
_ONE_ENCODER = "string_to_param.*"  # the bundled form of a one-encoder embedding
_KEY_FAMILIES = {"clip_g": "Stable Diffusion XL", "t5": "Flux.1", "emb_params": "Stable Diffusion 1.x/2.x"}


# ------------------------------------------------------------------ reading

def _read(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.is_file():
        raise EmbeddingError(f"embedding file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except (SafetensorError, OSError, ValueError) as e:
            raise EmbeddingError(f"{path.name}: not a readable .safetensors file ({e})") from None
    try:
        # old A1111 files hold a ParameterDict: torch's own container of tensors, allowed by name; anything
        # else that needs code to unpickle is refused
        with torch.serialization.safe_globals([torch.nn.ParameterDict]):
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle that needs code is refused, not run
        raise EmbeddingError(f"{path.name}: cannot be read safely ({str(e).splitlines()[0][:200]}); "
                             "use a .safetensors embedding") from None
    if not isinstance(data, Mapping):
        raise EmbeddingError(f"{path.name}: holds a {type(data).__name__}, not an embedding")
    return dict(data), {}


def _one_tensor(params: Any, where: str) -> torch.Tensor:
    params = getattr(params, "_parameters", params)  # an old A1111 file may hold a ParameterDict
    if torch.is_tensor(params):
        return params
    if isinstance(params, Mapping) and len(params) == 1 and torch.is_tensor(next(iter(params.values()))):
        return next(iter(params.values()))
    raise EmbeddingError(f"{where}: string_to_param must hold exactly one tensor (a file with several terms is "
                         "not supported)")


def _payload(data: Mapping[str, Any], where: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """``({file key: tensor}, token the file names or None)``; one-encoder files use key ``emb_params``."""
    if "string_to_param" in data:
        return {"emb_params": _one_tensor(data["string_to_param"], where)}, None
    if _ONE_ENCODER in data:
        return {"emb_params": data[_ONE_ENCODER]}, None
    tensors = {k: v for k, v in data.items() if torch.is_tensor(v)}
    known = {"emb_params", "clip_l", "clip_g", "t5"}
    if tensors and set(tensors) <= known:
        return tensors, None
    if len(tensors) == 1:  # diffusers learned_embeds: {token: tensor}
        (key, value), = tensors.items()
        return {"emb_params": value}, key
    raise EmbeddingError(f"{where}: not an embedding file (keys: {', '.join(sorted(map(str, data))[:8])}); expected "
                         "emb_params, clip_l/clip_g, string_to_param or one {token: tensor}")


def _from_payload(payload: Mapping[str, torch.Tensor], bundle, token: str, where: str, *, trainable: bool,
                  family_id: str = "") -> EmbeddingSet:
    fam = bundle.family
    specs = list(fam.text_encoders)
    by_key = {s.embedding_key: s for s in specs}
    if family_id and family_id != fam.id:
        from app.ml.models.families import get_family

        try:
            other = get_family(family_id)
        except Exception:  # noqa: BLE001 - an unknown id: judge by the tensors alone
            other = None
        if other is not None and tuple(s.embedding_key for s in other.text_encoders) != tuple(by_key):
            raise EmbeddingError(f"{where} is an embedding for {other.display_name}, not for {fam.display_name}; "
                                 f"load it with a {other.display_name} model")
    vectors = {}
    for key, tensor in payload.items():
        t = tensor.detach()
        t = t.unsqueeze(0) if t.ndim == 1 else t
        if t.ndim != 2:
            raise EmbeddingError(f"{where}: {key} has shape {tuple(tensor.shape)}; an embedding is vectors x width")
        spec = by_key.get(key)
        if spec is None and key == "emb_params" and len(specs) == 1:
            spec = specs[0]
        if spec is None:
            made_for = next((_KEY_FAMILIES[k] for k in _KEY_FAMILIES if k in payload), "another model")
            width = int(t.shape[1])
            raise EmbeddingError(
                f"{where} is an embedding for {made_for} ({key}, vectors {width} wide) but the model is "
                f"{fam.display_name}, whose embeddings have " + " and ".join(s.embedding_key for s in specs)
                + f"; load it with a {made_for} model")
        vectors[spec.name] = t.float()
    emb = EmbeddingSet(token, vectors, fam, trainable=trainable, base_identity=getattr(bundle, "identity", ""),
                       source=where)
    check_compatible(bundle, emb)  # widths: a 1024-wide SD 2 embedding on SD 1.5 is refused by name
    return emb


def load_embedding_file(path: "str | os.PathLike", bundle, token: str | None = None, *,
                        trainable: bool = True) -> EmbeddingSet:
    """Read an embedding for ``bundle`` (layouts: see the module docstring).

    The token is ``token`` when given, else the one we saved, else a diffusers file's key, else the
    file name's stem (A1111's trigger word: ``ohwx.safetensors`` is typed ``ohwx``). An embedding for
    another family or encoder width raises ``EmbeddingError`` naming the file and both widths.
    """
    path = Path(path)
    data, meta = _read(path)
    payload, named = _payload(data, path.name)
    tok = token or meta.get(TOKEN_KEY) or named or path.stem
    return _from_payload(payload, bundle, check_token(tok), path.name, trainable=trainable,
                         family_id=meta.get("nodetrainer_base_family", ""))


def load_bundled_embeddings(path: "str | os.PathLike", bundle, *, trainable: bool = True) -> list[EmbeddingSet]:
    """The embeddings bundled in a LoRA file (``bundle_emb.<token>.…``), in file order; [] when none."""
    path = Path(path)
    data, meta = _read(path)
    groups: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        parts = key.split(".", 2)
        if len(parts) != 3:
            raise EmbeddingError(f"{path.name}: bundled embedding key {key!r} is not bundle_emb.<name>.<vectors>")
        groups.setdefault(parts[1], {})[parts[2]] = value
    return [_from_payload(_payload(g, f"{path.name}:{name}")[0], bundle, check_token(name), f"{path.name}:{name}",
                          trainable=trainable, family_id=meta.get("nodetrainer_base_family", ""))
            for name, g in groups.items()]


# ------------------------------------------------------------------ writing

def embedding_tensors(emb: EmbeddingSet, family=None) -> dict[str, torch.Tensor]:
    """``{file key: vectors}`` for ``emb``'s family (``emb_params``; ``clip_l``/``clip_g``; ``clip_l``/``t5``)."""
    fam = family or emb.family
    if fam is None:
        raise EmbeddingError(f"{emb.where()} has no model family; load or create it for a model first")
    out = {}
    for spec in fam.text_encoders:
        if spec.name in emb.vectors:
            out[spec.embedding_key] = emb.vectors[spec.name].detach()
    if not out:
        raise EmbeddingError(f"{emb.where()} has vectors for none of {fam.display_name}'s text encoders")
    return out


def bundled_tensors(embeddings: Sequence[EmbeddingSet]) -> dict[str, torch.Tensor]:
    """The ``bundle_emb.<token>.…`` tensors of ``embeddings`` for a LoRA file."""
    out: dict[str, torch.Tensor] = {}
    for emb in embeddings or ():
        if not is_embedding(emb):
            raise EmbeddingError(f"only embeddings can be bundled into a LoRA file, got {type(emb).__name__}")
        if "." in emb.token:
            raise EmbeddingError(f"the placeholder {emb.token} contains a '.', which bundled keys cannot hold; "
                                 "rename it or save the embedding on its own")
        tensors = embedding_tensors(emb)
        one = len(emb.family.text_encoders) == 1
        for key, t in tensors.items():
            name = f"{BUNDLE_PREFIX}{emb.token}.{_ONE_ENCODER if one else key}"
            if name in out:
                raise EmbeddingError(f"two bundled embeddings use the placeholder {emb.token}")
            out[name] = t
    return out


def embedding_metadata(emb: EmbeddingSet, *, title: str, recipe: Any = None, step: int | None = None,
                       epoch: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    import json

    from app.ml.save.metadata import _recipe_text, modelspec

    fam = emb.family
    meta = modelspec(fam, kind="textual-inversion", title=title) if fam is not None else {}
    meta.update({
        "nodetrainer_recipe": _recipe_text(recipe),
        TOKEN_KEY: emb.token,
        "nodetrainer_embedding_vectors": str(emb.num_vectors),
        "nodetrainer_base_family": emb.family_id,
        "nodetrainer_base_model_hash": emb.base_identity,
        "nodetrainer_step": "" if step is None else str(int(step)),
        "nodetrainer_epoch": "" if epoch is None else str(int(epoch)),
    })
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


def save_embedding(emb: EmbeddingSet, path: "str | os.PathLike", *, dtype: "str | torch.dtype" = "fp16",
                   recipe: Any = None, overwrite: bool = False, extra_metadata: Mapping[str, Any] | None = None,
                   step: int | None = None, epoch: int | None = None) -> Path:
    """Write ``emb`` as a ``.safetensors`` embedding and return the path written (``_1``, ``_2``...
    appended unless ``overwrite``; written atomically, so a failed save leaves no half file)."""
    from safetensors.torch import save_file

    from app.ml.save.lora import SAVE_DTYPES, parse_save_dtype

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    dt = parse_save_dtype(dtype)
    tensors = {k: v.to("cpu", dt).contiguous() for k, v in embedding_tensors(emb).items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    with atomic_file(path, overwrite, size_hint=size) as target:
        meta = embedding_metadata(emb, title=target.final.stem, recipe=recipe, step=step, epoch=epoch,
                                  extra=extra_metadata)
        meta["nodetrainer_dtype"] = {v: k for k, v in SAVE_DTYPES.items()}[dt]
        save_file(tensors, str(target.tmp), metadata=meta)
    return target.final
