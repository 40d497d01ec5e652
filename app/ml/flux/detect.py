"""What a ``.safetensors`` file holds, from its header alone (backs the Flux family's split-file loading:
LoadModel names a mismatched file — a T5 where the transformer belongs, an SD VAE for Flux — before
reading gigabytes of weights).

ComfyUI users keep Flux as separate files (``flux1-dev.safetensors``, ``ae.safetensors``,
``clip_l.safetensors``, ``t5xxl_fp16.safetensors``) whose names say little; the keys and shapes in
the JSON header say exactly what each is. Only the header is read (8 bytes of length + JSON).
Free of torch: recipe validation (``app/graph/inputs_check.py``) uses it.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping

ALL_IN_ONE_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # keys.py uses the same

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class DetectError(ValueError):
    pass


@dataclass(frozen=True)
class FileKind:
    kind: str  # flux-transformer | vae | clip | t5 | unknown
    label: str  # for messages: "Flux.1 dev transformer (BFL layout)", "CLIP-L text encoder", ...
    variant: str | None = None  # dev | schnell (transformer), L | G (CLIP)
    layout: str | None = None  # bfl | diffusers (transformer); original | diffusers (VAE)
    prefix: str = ""  # key prefix of the component inside the file
    details: dict[str, Any] = field(default_factory=dict)


def read_header(path: "str | os.PathLike", where: str = "LoadModel") -> dict[str, dict]:
    """The tensor entries of a safetensors header (``{key: {"dtype", "shape", "data_offsets"}}``), without the metadata."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise DetectError(f"{where}: {path} is too short to be a .safetensors file.")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise DetectError(f"{where}: {path} is not a .safetensors file (header length {n} is implausible).")
            raw = f.read(n)
    except OSError as exc:
        raise DetectError(f"{where}: cannot read {path} ({exc}); check the path.") from exc
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise DetectError(f"{where}: {path} is not a .safetensors file (unreadable header: {exc}).") from exc
    if not isinstance(header, dict):
        raise DetectError(f"{where}: {path} is not a .safetensors file (header is not a table).")
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _shape(header: Mapping[str, Mapping], key: str) -> list[int] | None:
    entry = header.get(key)
    return list(entry.get("shape", [])) if entry else None


def _dim(header: Mapping[str, Mapping], key: str, i: int) -> int | None:
    """Size ``i`` of a tensor's shape; None when the tensor or that dimension is absent (a damaged header)."""
    shape = _shape(header, key) or []
    return shape[i] if len(shape) > i else None


def _find_prefix(keys, suffix: str) -> str | None:
    for k in keys:
        if k.endswith(suffix):
            return k[: -len(suffix)]
    return None


def detect(header: Mapping[str, Mapping]) -> FileKind:
    """Classify a header (as from ``read_header``; a ``{key: {"shape": [...]}}`` table is enough)."""
    keys = list(header)

    # Flux transformer, BFL layout (possibly under an all-in-one prefix)
    p = _find_prefix(keys, "double_blocks.0.img_attn.qkv.weight")
    if p is not None and (p == "" or p in ALL_IN_ONE_PREFIXES):
        variant = "dev" if f"{p}guidance_in.in_layer.weight" in header else "schnell"
        width = _dim(header, f"{p}img_in.weight", 0)
        return FileKind("flux-transformer", f"Flux.1 {variant} transformer (BFL layout)", variant, "bfl", p, {"width": width})
    # Flux transformer, diffusers layout
    if "x_embedder.weight" in header and any(k.startswith("single_transformer_blocks.") for k in keys):
        variant = "dev" if "time_text_embed.guidance_embedder.linear_1.weight" in header else "schnell"
        width = _dim(header, "x_embedder.weight", 0)
        return FileKind("flux-transformer", f"Flux.1 {variant} transformer (diffusers layout)", variant, "diffusers", "", {"width": width})

    # VAE (BFL ae.safetensors / A1111 "first_stage_model." / diffusers): the decoder's input width is the latent channels
    p = _find_prefix(keys, "decoder.conv_in.weight")
    if p is not None and (p in ("", "vae.", "first_stage_model.")):
        channels = _dim(header, f"{p}decoder.conv_in.weight", 1)
        layout = "diffusers" if any(k.startswith(f"{p}decoder.up_blocks.") for k in keys) else "original"
        family = {16: "Flux/SD3 VAE", 4: "SD/SDXL VAE"}.get(channels, "VAE")
        return FileKind("vae", f"{family} ({channels} latent channels)", layout=layout, prefix=p, details={"latent_channels": channels})

    # T5 encoder (transformers names; optionally with a "text_encoders.t5xxl.transformer." style prefix)
    p = _find_prefix(keys, "encoder.block.0.layer.0.SelfAttention.q.weight")
    if p is not None:
        d_model = _dim(header, f"{p}encoder.block.0.layer.0.SelfAttention.q.weight", 1)
        blocks = len({k.split(".")[len(p.split(".")) + 1] for k in keys if k.startswith(f"{p}encoder.block.")})
        return FileKind("t5", f"T5 text encoder (width {d_model}, {blocks} blocks)", prefix=p,
                        details={"d_model": d_model, "blocks": blocks})

    # CLIP text encoder (transformers names, with or without the text_model level)
    for suffix in ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight"):
        p = _find_prefix(keys, suffix)
        if p is not None:
            full = p + suffix[: -len("embeddings.token_embedding.weight")]
            hidden = _dim(header, p + suffix, 1)
            layers = len({k[len(full) + len("encoder.layers."):].split(".")[0] for k in keys if k.startswith(f"{full}encoder.layers.")})
            variant = {768: "L", 1280: "G"}.get(hidden)
            if variant is None:  # not a full-size model: OpenCLIP-G carries a text projection, CLIP-L as Flux uses it does not
                variant = "G" if f"{p}text_projection.weight" in header else "L"
            return FileKind("clip", f"CLIP-{variant} text encoder (width {hidden}, {layers} layers)", variant, prefix=p,
                            details={"hidden": hidden, "layers": layers})

    return FileKind("unknown", "not a Flux transformer, VAE, CLIP or T5 file", details={"sample_keys": sorted(keys)[:5]})


# Where an all-in-one checkpoint keeps the other parts, as ComfyUI saves Flux checkpoints (its Flux model config:
# vae_key_prefix "vae.", text_encoder_key_prefix "text_encoders.", with clip_l / t5xxl ".transformer." inside).
EMBEDDED_PREFIXES = {
    "ae": ("vae.", "first_stage_model."),
    "clip_l": ("text_encoders.clip_l.transformer.", "text_encoders.clip_l.", "cond_stage_model.transformer."),
    "t5xxl": ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl."),
}


def embedded_parts(header: Mapping[str, Mapping]) -> dict[str, FileKind]:
    """The VAE / CLIP-L / T5 an all-in-one checkpoint holds beside its transformer, each detected under its prefix
    (``FileKind.prefix`` is the full key prefix in the file); a part the file lacks is absent."""
    out: dict[str, FileKind] = {}
    for slot, prefixes in EMBEDDED_PREFIXES.items():
        for pfx in prefixes:
            sub = {k[len(pfx):]: v for k, v in header.items() if k.startswith(pfx)}
            if sub:
                found = detect(sub)
                out[slot] = FileKind(found.kind, found.label, found.variant, found.layout, pfx + found.prefix,
                                     found.details)
                break
    return out


def detect_file(path: "str | os.PathLike", where: str = "LoadModel") -> FileKind:
    return detect(read_header(path, where))


_EXPECTED = {
    "flux-transformer": "a Flux.1 transformer (e.g. flux1-dev.safetensors or flux1-schnell.safetensors)",
    "vae": "the Flux VAE (ae.safetensors, 16 latent channels)",
    "clip": "the CLIP-L text encoder (clip_l.safetensors)",
    "t5": "the T5-XXL text encoder (t5xxl_fp16.safetensors or t5xxl_fp8_e4m3fn.safetensors)",
}


def expect_file(path: "str | os.PathLike", kind: str, where: str = "LoadModel", *, variant: str | None = None) -> FileKind:
    """Detect ``path`` and raise a clear error if it is not the ``kind`` (and variant) this slot needs."""
    found = detect_file(path, where)
    want = _EXPECTED.get(kind, kind)
    ok = found.kind == kind
    if ok and kind == "vae" and found.details.get("latent_channels") != 16:
        ok = False
    if ok and variant is not None and found.variant != variant:
        ok = False
        if kind == "clip":
            want = f"the CLIP-{variant} text encoder"
        elif kind == "flux-transformer":
            want = f"a Flux.1 {variant} transformer"
    if not ok:
        raise DetectError(f"{where}: {path} holds {found.label}, but this slot needs {want}; choose the matching file.")
    return found
