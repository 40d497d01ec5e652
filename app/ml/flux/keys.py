"""Flux transformer state dicts: BFL single-file layout <-> diffusers ``FluxTransformer2DModel`` (backs the
Flux family's single-file loading — ``flux1-dev.safetensors``, all-in-one files — and saving a full
fine-tune in the layout ComfyUI/Forge read).

The mapping follows diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` (loaders/
single_file_utils.py) but is table-driven and works both ways and for any width (that converter
hard-codes the 3072 width of the real model). Three things are not plain renames:
- fused projections: BFL ``img_attn.qkv``/``txt_attn.qkv`` hold q, k, v stacked along the output rows,
  and ``single_blocks.N.linear1`` holds q, k, v and the MLP input projection;
- ``final_layer.adaLN_modulation.1`` stores (shift, scale) where diffusers' ``norm_out.linear`` stores
  (scale, shift);
- the RMSNorms' ``.scale`` is diffusers' ``.weight``.
``flux_groups`` is the module-level table; ``lora_keys`` uses it too, so full weights and LoRAs can
never disagree on a name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .detect import ALL_IN_ONE_PREFIXES  # one definition, in the torch-free module
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n))


class FluxKeyError(ValueError):
    pass


@dataclass(frozen=True)
class Group:
    """One BFL module and the diffusers module(s) it corresponds to (several = fused along output rows)."""

    bfl: str
    diffusers: tuple[str, ...]
    swap: bool = False  # (shift, scale) halves swapped between the layouts
    norm: bool = False  # RMSNorm: BFL ``.scale`` <-> diffusers ``.weight``, no bias

    @property
    def fused(self) -> bool:
        return len(self.diffusers) > 1

    def params(self) -> tuple[tuple[str, str], ...]:
        """(BFL suffix, diffusers suffix) pairs."""
        return ((".scale", ".weight"),) if self.norm else ((".weight", ".weight"), (".bias", ".bias"))


def _double(i: int) -> list[Group]:
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    return [
        Group(b + "img_mod.lin", (d + "norm1.linear",)),
        Group(b + "txt_mod.lin", (d + "norm1_context.linear",)),
        Group(b + "img_attn.qkv", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")),
        Group(b + "txt_attn.qkv", (d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj")),
        Group(b + "img_attn.norm.query_norm", (d + "attn.norm_q",), norm=True),
        Group(b + "img_attn.norm.key_norm", (d + "attn.norm_k",), norm=True),
        Group(b + "txt_attn.norm.query_norm", (d + "attn.norm_added_q",), norm=True),
        Group(b + "txt_attn.norm.key_norm", (d + "attn.norm_added_k",), norm=True),
        Group(b + "img_attn.proj", (d + "attn.to_out.0",)),
        Group(b + "txt_attn.proj", (d + "attn.to_add_out",)),
        Group(b + "img_mlp.0", (d + "ff.net.0.proj",)),
        Group(b + "img_mlp.2", (d + "ff.net.2",)),
        Group(b + "txt_mlp.0", (d + "ff_context.net.0.proj",)),
        Group(b + "txt_mlp.2", (d + "ff_context.net.2",)),
    ]


def _single(i: int) -> list[Group]:
    d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
    return [
        Group(b + "modulation.lin", (d + "norm.linear",)),
        Group(b + "linear1", (d + "attn.to_q", d + "attn.to_k", d + "attn.to_v", d + "proj_mlp")),
        Group(b + "norm.query_norm", (d + "attn.norm_q",), norm=True),
        Group(b + "norm.key_norm", (d + "attn.norm_k",), norm=True),
        Group(b + "linear2", (d + "proj_out",)),
    ]


def flux_groups(num_double: int, num_single: int, guidance: bool) -> list[Group]:
    """The full module table of a Flux transformer of the given depth."""
    groups = [
        Group("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
        Group("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
        Group("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
        Group("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ]
    if guidance:
        groups += [
            Group("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
            Group("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
        ]
    groups += [Group("txt_in", ("context_embedder",)), Group("img_in", ("x_embedder",))]
    for i in range(num_double):
        groups += _double(i)
    for i in range(num_single):
        groups += _single(i)
    groups += [
        Group("final_layer.linear", ("proj_out",)),
        Group("final_layer.adaLN_modulation.1", ("norm_out.linear",), swap=True),
    ]
    return groups


def _count(keys: Iterable[str], block: str, source: str) -> int:
    """How many ``block.N.`` blocks the keys hold (``re.match``: ``transformer_blocks`` is not ``single_transformer_blocks``)."""
    pattern = re.compile(re.escape(block) + r"\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    if found and found != set(range(max(found) + 1)):
        missing = sorted(set(range(max(found) + 1)) - found)
        raise FluxKeyError(f"{source}: {block} {missing} are missing; the file is incomplete (an interrupted download?).")
    return max(found) + 1 if found else 0


def groups_for_diffusers(keys: Iterable[str], source: str = "Flux transformer") -> list[Group]:
    keys = list(keys)
    return flux_groups(_count(keys, "transformer_blocks", source), _count(keys, "single_transformer_blocks", source),
                       any(k.startswith("time_text_embed.guidance_embedder.") for k in keys))


def groups_for_bfl(keys: Iterable[str], source: str = "Flux transformer") -> list[Group]:
    keys = list(keys)
    return flux_groups(_count(keys, "double_blocks", source), _count(keys, "single_blocks", source),
                       any(k.startswith("guidance_in.") for k in keys))


def diffusers_keys(groups: Iterable[Group]) -> list[str]:
    """Every diffusers parameter name the table covers (what a state dict of that shape must hold)."""
    return [n + dsuf for g in groups for _, dsuf in g.params() for n in g.diffusers]


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _upcast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype) if t.dtype in FP8_DTYPES else t


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformer's own keys: an all-in-one file's ``model.diffusion_model.`` (or ComfyUI's
    ``diffusion_model.``) part, prefix removed; other components in such a file are left out."""
    for prefix in ALL_IN_ONE_PREFIXES:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return dict(state)


def _check_scaled_fp8(keys: Iterable[str], source: str) -> None:
    odd = [k for k in keys if k.endswith((".scale_weight", ".scale_input")) or k == "scaled_fp8"]
    if odd:
        raise FluxKeyError(
            f"{source}: this is a 'scaled fp8' checkpoint ({odd[0]} …), whose weights need their per-tensor scales "
            "applied; it is not supported yet. Use the plain fp8_e4m3fn, bf16 or fp16 file of the model."
        )


def _leftovers(state: Mapping, used: set[str], source: str, layout: str) -> None:
    extra = sorted(set(state) - used)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise FluxKeyError(
            f"{source}: {len(extra)} key(s) are not part of a Flux transformer in the {layout} layout: {shown}. "
            "Is this the right file (a Flux.1 dev/schnell transformer, not a VAE, text encoder or another model)?"
        )


def bfl_to_diffusers(state: Mapping[str, torch.Tensor], *, source: str = "Flux transformer",
                     fp8_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A BFL-layout (or all-in-one) transformer state dict in diffusers' names; fp8 tensors are upcast to ``fp8_dtype``.

    ``source`` names the node and file in errors. Every key must be understood; none is dropped silently.
    """
    state = strip_prefix(state)
    _check_scaled_fp8(state, source)
    if "img_in.weight" not in state:
        raise FluxKeyError(f"{source}: no 'img_in.weight' key, so this is not a Flux transformer in the BFL layout.")
    hidden = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for g in groups_for_bfl(state, source):
        for bsuf, dsuf in g.params():
            key = g.bfl + bsuf
            if key not in state:
                raise FluxKeyError(f"{source}: '{key}' is missing; the file is incomplete or not a Flux transformer.")
            used.add(key)
            t = _upcast(state[key], fp8_dtype)
            if g.swap:
                t = _swap_halves(t)
            if g.fused:
                sizes = [hidden] * len(g.diffusers)
                if len(g.diffusers) == 4:  # single block: q, k, v, then the MLP's up-projection
                    sizes[3] = t.shape[0] - 3 * hidden
                if sizes[-1] <= 0 or sum(sizes) != t.shape[0]:
                    raise FluxKeyError(f"{source}: '{key}' has {t.shape[0]} rows, which cannot be split into {sizes} for width {hidden}.")
                for name, part in zip(g.diffusers, torch.split(t, sizes, dim=0)):
                    out[name + dsuf] = part.clone()  # own storage: safetensors refuses to save views of one tensor
            else:
                out[g.diffusers[0] + dsuf] = t
    _leftovers(state, used, source, "BFL")
    return out


def diffusers_to_bfl(state: Mapping[str, torch.Tensor], *, source: str = "Flux transformer",
                     prefix: str = "") -> dict[str, torch.Tensor]:
    """A diffusers ``FluxTransformer2DModel`` state dict in BFL names (``prefix`` e.g. ``model.diffusion_model.``)."""
    if "x_embedder.weight" not in state:
        raise FluxKeyError(f"{source}: no 'x_embedder.weight' key, so this is not a diffusers Flux transformer.")
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for g in groups_for_diffusers(state, source):
        for bsuf, dsuf in g.params():
            names = [n + dsuf for n in g.diffusers]
            missing = [n for n in names if n not in state]
            if missing:
                raise FluxKeyError(f"{source}: '{missing[0]}' is missing; the state dict is incomplete.")
            used.update(names)
            t = torch.cat([state[n] for n in names], dim=0) if g.fused else state[names[0]]
            out[prefix + g.bfl + bsuf] = _swap_halves(t) if g.swap else t
    _leftovers(state, used, source, "diffusers")
    return out


def is_bfl_layout(keys: Iterable[str]) -> bool:
    return any(k.endswith("img_in.weight") for k in keys)


def load_transformer_file(path, *, where: str = "LoadModel", fp8_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` transformer (BFL, all-in-one or diffusers layout) as a diffusers-named state dict."""
    from safetensors import SafetensorError, safe_open

    source = f"{where}: {path}"
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            # an all-in-one checkpoint: read the transformer's tensors only, not the VAE and text encoders
            prefix = next((p for p in ALL_IN_ONE_PREFIXES if any(k.startswith(p) for k in names)), "")
            state = {k: f.get_tensor(k) for k in names if k.startswith(prefix)}
    except (OSError, SafetensorError) as exc:
        raise FluxKeyError(f"{source}: cannot read the file ({exc}); check the path and that the download is complete.") from exc
    if is_bfl_layout(state):
        return bfl_to_diffusers(state, source=source, fp8_dtype=fp8_dtype)
    state = {k: _upcast(v, fp8_dtype) for k, v in strip_prefix(state).items()}
    if "x_embedder.weight" not in state:
        raise FluxKeyError(f"{source}: neither 'img_in.weight' (BFL layout) nor 'x_embedder.weight' (diffusers layout) is in "
                           "the file, so it is not a Flux transformer; choose the transformer file (e.g. flux1-dev.safetensors).")
    expected = diffusers_keys(groups_for_diffusers(state, source))
    missing = [k for k in expected if k not in state]
    if missing:
        raise FluxKeyError(f"{source}: '{missing[0]}' is missing ({len(missing)} keys in all); the file is incomplete.")
    _leftovers(state, set(expected), source, "diffusers")
    return state
