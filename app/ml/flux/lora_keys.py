"""Flux LoRA files: our per-module LoRAs (diffusers module names) <-> the kohya/BFL, ComfyUI and
diffusers/PEFT layouts (backs the Flux family's LoRA key map for Save and for LoRA loading/resume).

Our LoRAs live on diffusers modules (``transformer_blocks.0.attn.to_q``), but ComfyUI, Forge and
A1111 read Flux LoRAs in the BFL layout, where q, k and v are one fused linear (``img_attn.qkv``) and a
single block's q, k, v and MLP input are ``linear1``. Separate LoRAs on the parts have an *exact*
fused form: stack the downs (rank r1 + r2 + ...), put the ups on a block diagonal, and set alpha so
alpha / rank (the applied scale) is unchanged. Reading back splits a block-diagonal up exactly (ranks
and alphas come back); a dense fused LoRA from another trainer becomes one LoRA per part that shares
the down and takes its rows of the up — the same weight change, at the fused rank.

``keys.flux_groups`` is the single table of names, shared with full-weight conversion.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .keys import Group, _swap_halves, flux_groups

KOHYA_PREFIX = "lora_unet_"
LYCORIS_PREFIX = "lycoris_"  # per-projection keys ComfyUI maps onto a slice of a fused BFL weight
COMFY_PREFIX = "diffusion_model."
PEFT_PREFIX = "transformer."
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers reads LoraConfig kwargs from a file's metadata
MLP_RATIO = 4.0  # Flux's single-block MLP width / model width (needed to place rows when proj_mlp has no LoRA)


class FluxLoraKeyError(ValueError):
    pass


@dataclass
class LoraWeights:
    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this LoRA applies: up @ down × alpha / rank."""
        return (self.up.double() @ self.down.double()) * self.scale


# --- the module table ------------------------------------------------------------------------------

def _table(names: Iterable[str], double_pat: str, single_pat: str) -> list[Group]:
    names = list(names)
    nd = max((int(m.group(1)) + 1 for n in names if (m := re.search(double_pat, n))), default=0)
    ns = max((int(m.group(1)) + 1 for n in names if (m := re.search(single_pat, n))), default=0)
    return flux_groups(nd, ns, guidance=True)


def _by_diffusers(groups: list[Group]) -> dict[str, tuple[Group, int]]:
    return {name: (g, i) for g in groups for i, name in enumerate(g.diffusers) if not g.norm}


def _part_sizes(g: Group, hidden: int, mlp_ratio: float) -> list[int]:
    sizes = [hidden] * len(g.diffusers)
    if len(g.diffusers) == 4:
        sizes[3] = int(hidden * mlp_ratio)
    return sizes


# --- fusing and splitting --------------------------------------------------------------------------

def to_bfl(loras: Mapping[str, LoraWeights], *, mlp_ratio: float = MLP_RATIO, where: str = "Flux LoRA") -> dict[str, LoraWeights]:
    """Per-diffusers-module LoRAs -> per-BFL-module LoRAs (fused targets get the exact block-diagonal form)."""
    by_name = _by_diffusers(_table(loras, r"^transformer_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\."))
    unknown = [n for n in loras if n not in by_name]
    if unknown:
        raise FluxLoraKeyError(f"{where}: {unknown[0]!r} is not a LoRA-able Flux transformer module (no BFL name for it).")
    out: dict[str, LoraWeights] = {}
    seen: set[str] = set()
    for name in loras:
        g, _ = by_name[name]
        if g.bfl in seen:
            continue
        seen.add(g.bfl)
        if not g.fused:
            lo = loras[name]
            # final_layer.adaLN_modulation.1 holds (shift, scale) where norm_out.linear holds (scale, shift)
            out[g.bfl] = LoraWeights(lo.down, _swap_halves(lo.up) if g.swap else lo.up, float(lo.alpha))
            continue
        parts = [loras.get(n) for n in g.diffusers]
        present = [p for p in parts if p is not None]
        hidden = present[0].down.shape[1]  # every fused part reads the model width
        sizes = _part_sizes(g, hidden, mlp_ratio)
        scale = present[0].scale
        rank = sum(p.rank for p in present)
        ref = present[0].up
        up = torch.zeros(sum(sizes), rank, dtype=ref.dtype, device=ref.device)
        row, col = 0, 0
        for part, size, pname in zip(parts, sizes, g.diffusers):
            if part is not None:
                if part.up.shape[0] != size or part.down.shape[1] != hidden:
                    raise FluxLoraKeyError(f"{where}: the LoRA on {pname} has shape up {tuple(part.up.shape)} / down "
                                           f"{tuple(part.down.shape)}, which does not fit {g.bfl} of width {hidden}.")
                # parts trained with another alpha/rank keep their weight change: fold the ratio into the up
                up[row:row + size, col:col + part.rank] = part.up * (part.scale / scale) if part.scale != scale else part.up
                col += part.rank
            row += size
        down = torch.cat([p.down for p in present], dim=0)
        out[g.bfl] = LoraWeights(down, up, scale * rank)
    return out


def _split_fused(g: Group, lo: LoraWeights, mlp_ratio: float, where: str) -> dict[str, LoraWeights]:
    hidden = lo.down.shape[1]
    sizes = _part_sizes(g, hidden, mlp_ratio)
    if len(g.diffusers) == 4:
        sizes[3] = lo.up.shape[0] - 3 * hidden  # the real MLP width, whatever the ratio
    if sizes[-1] <= 0 or sum(sizes) != lo.up.shape[0]:
        raise FluxLoraKeyError(f"{where}: the LoRA on {g.bfl} has {lo.up.shape[0]} output rows, which do not split into "
                               f"{len(sizes)} parts for width {hidden}.")
    ups = list(torch.split(lo.up, sizes, dim=0))
    rank, scale = lo.rank, lo.scale
    nonzero = [u.abs().sum(dim=0) != 0 for u in ups]  # which rank columns each part uses

    # Our own layout: m leading parts with equal contiguous column blocks, any further parts empty.
    for m in range(len(ups), 0, -1):
        if rank % m:
            continue
        r = rank // m
        ok = all(not nonzero[j].any() for j in range(m, len(ups)))
        for j in range(m):
            outside = nonzero[j].clone()
            outside[j * r:(j + 1) * r] = False
            ok = ok and not outside.any()
        if ok:
            return {g.diffusers[j]: LoraWeights(lo.down[j * r:(j + 1) * r].clone(), ups[j][:, j * r:(j + 1) * r].clone(), scale * r)
                    for j in range(m)}

    # Another block-diagonal arrangement: disjoint column supports, each part takes its own columns.
    supports = [nz.nonzero().flatten() for nz in nonzero]
    used = torch.zeros(rank, dtype=torch.bool)
    disjoint = True
    for nz in nonzero:
        disjoint = disjoint and not (used & nz).any()
        used |= nz
    if disjoint:
        return {g.diffusers[j]: LoraWeights(lo.down[s].clone(), ups[j][:, s].clone(), scale * len(s))
                for j, s in enumerate(supports) if len(s)}
    # A dense fused LoRA: every part shares the down and takes its rows of the up (same weight change).
    return {name: LoraWeights(lo.down.clone(), u.clone(), float(lo.alpha)) for name, u in zip(g.diffusers, ups)}


def from_bfl(bfl: Mapping[str, LoraWeights], *, mlp_ratio: float = MLP_RATIO, where: str = "Flux LoRA") -> dict[str, LoraWeights]:
    """Per-BFL-module LoRAs -> per-diffusers-module LoRAs."""
    groups = {g.bfl: g for g in _table(bfl, r"^double_blocks\.(\d+)\.", r"^single_blocks\.(\d+)\.") if not g.norm}
    out: dict[str, LoraWeights] = {}
    for name, lo in bfl.items():
        g = groups.get(name)
        if g is None:
            raise FluxLoraKeyError(f"{where}: {name!r} is not a LoRA-able module of a Flux transformer in the BFL layout.")
        if g.fused:
            out.update(_split_fused(g, lo, mlp_ratio, where))
        else:
            out[g.diffusers[0]] = LoraWeights(lo.down, _swap_halves(lo.up) if g.swap else lo.up, float(lo.alpha))
    return out


# --- file layouts ----------------------------------------------------------------------------------

def _tensors(prefix_of, loras: Mapping[str, LoraWeights], down: str, up: str, alpha: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name, lo in loras.items():
        p = prefix_of(name)
        out[p + down] = lo.down.detach().contiguous().clone()
        out[p + up] = lo.up.detach().contiguous().clone()
        if alpha:
            out[p + ".alpha"] = torch.tensor(float(lo.alpha))
    return out


def kohya_name(bfl_module: str) -> str:
    return KOHYA_PREFIX + bfl_module.replace(".", "_")


def to_kohya(loras: Mapping[str, LoraWeights], **kw) -> dict[str, torch.Tensor]:
    """``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    return _tensors(kohya_name, to_bfl(loras, **kw), ".lora_down.weight", ".lora_up.weight", True)


def to_comfy(loras: Mapping[str, LoraWeights], **kw) -> dict[str, torch.Tensor]:
    """``diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight`` … (BFL names, dotted)."""
    return _tensors(lambda n: COMFY_PREFIX + n, to_bfl(loras, **kw), ".lora_down.weight", ".lora_up.weight", True)


def to_peft(loras: Mapping[str, LoraWeights]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` and the file metadata diffusers reads alphas from."""
    tensors = _tensors(lambda n: PEFT_PREFIX + n, loras, ".lora_A.weight", ".lora_B.weight", False)
    names = list(loras)
    ranks = [loras[n].rank for n in names]
    alphas = [float(loras[n].alpha) for n in names]
    r = max(set(ranks), key=ranks.count)
    a = max(set(alphas), key=alphas.count)
    meta = {
        "transformer.r": r,
        "transformer.lora_alpha": a,
        "transformer.target_modules": names,
        "transformer.rank_pattern": {n: rk for n, rk in zip(names, ranks) if rk != r},
        "transformer.alpha_pattern": {n: al for n, al in zip(names, alphas) if al != a},
        "transformer.use_dora": False,
        "transformer.lora_dropout": 0.0,
        "transformer.init_lora_weights": True,
    }
    return tensors, {PEFT_METADATA_KEY: json.dumps(meta), "format": "pt"}


_FILE_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down", ".lora_B.weight": "up", ".alpha": "alpha"}


def _group_file(tensors: Mapping[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix, part in _FILE_SUFFIXES.items():
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            raise FluxLoraKeyError(f"{where}: key {key!r} is not a LoRA tensor (.lora_down/.lora_up/.lora_A/.lora_B/.alpha).")
    for name, parts in modules.items():
        if "down" not in parts or "up" not in parts:
            raise FluxLoraKeyError(f"{where}: {name} lacks its {'up' if 'down' in parts else 'down'} weight; the file is incomplete.")
    return modules


def _weights(parts: Mapping[str, torch.Tensor], alpha_default: float | None) -> LoraWeights:
    down, up = parts["down"], parts["up"]
    alpha = float(parts["alpha"]) if "alpha" in parts else (alpha_default if alpha_default is not None else float(down.shape[0]))
    return LoraWeights(down, up, alpha)


def _kohya_to_bfl_names(names: Iterable[str]) -> dict[str, str]:
    """kohya's underscored names back to dotted BFL module names (underscores inside names are ambiguous)."""
    table = {kohya_name(g.bfl): g.bfl for g in _table(names, r"double_blocks_(\d+)_", r"single_blocks_(\d+)_") if not g.norm}
    return table


def detect_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    if any(k.startswith(KOHYA_PREFIX) for k in keys):
        return "kohya"
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        return "comfy"
    if any(k.startswith(PEFT_PREFIX) and ".lora_A." in k for k in keys):
        return "peft"
    raise FluxLoraKeyError("not a Flux transformer LoRA in the kohya (lora_unet_), ComfyUI (diffusion_model.) or "
                           "diffusers/PEFT (transformer.…lora_A) layout")


def from_file_tensors(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None, *,
                      where: str = "Flux LoRA", mlp_ratio: float = MLP_RATIO) -> dict[str, LoraWeights]:
    """Any supported layout -> our per-diffusers-module LoRAs. ``where`` names the node and file in errors.

    Text-encoder keys (``lora_te1_``/``lora_te3_``) are not handled here; every other key must be understood.
    """
    try:
        layout = detect_layout(tensors)
    except FluxLoraKeyError as exc:
        raise FluxLoraKeyError(f"{where}: {exc}.") from exc
    modules = _group_file(tensors, where)
    if layout == "peft":
        meta = json.loads((metadata or {}).get(PEFT_METADATA_KEY, "{}") or "{}")
        pattern = meta.get("transformer.alpha_pattern") or {}
        out = {}
        for key, parts in modules.items():
            if not key.startswith(PEFT_PREFIX):
                raise FluxLoraKeyError(f"{where}: {key!r} is not a transformer LoRA key (expected 'transformer.' first).")
            name = key[len(PEFT_PREFIX):]
            out[name] = _weights(parts, pattern.get(name, meta.get("transformer.lora_alpha")))
        to_bfl(out, mlp_ratio=mlp_ratio, where=where)  # every module must have a Flux name
        return out
    if layout == "kohya":
        table = _kohya_to_bfl_names(modules)
        bfl = {}
        for key, parts in modules.items():
            if key not in table:
                raise FluxLoraKeyError(f"{where}: {key!r} matches no module of a Flux transformer; "
                                       "is this a LoRA for another model (or a text-encoder LoRA)?")
            bfl[table[key]] = _weights(parts, None)
    else:
        bfl = {}
        for key, parts in modules.items():
            if not key.startswith(COMFY_PREFIX):
                raise FluxLoraKeyError(f"{where}: {key!r} mixes layouts (expected 'diffusion_model.' first).")
            bfl[key[len(COMFY_PREFIX):]] = _weights(parts, None)
    return from_bfl(bfl, mlp_ratio=mlp_ratio, where=where)


# --- LoHa, LoKr and DoRA ---------------------------------------------------------------------------
# A LoKr (a Kronecker product) or a DoRA (a norm per input column over the *part's* rows) on q, k and v
# has no exact form as one module on the fused ``qkv``/``linear1`` weight. ComfyUI also reads Flux
# LyCORIS keys per projection (``lycoris_transformer_blocks_0_attn_to_q``: its Flux key map narrows the
# fused weight to that projection's rows before applying the module, so the norm is the part's), which
# is exact; so such modules are written with those keys, and modules on unfused BFL weights keep their
# BFL names (``lora_unet_double_blocks_0_img_attn_proj.hada_w1_a``). LoHa goes the same way so that
# every algorithm is written by one rule.

_LYCO_PARAMS = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".lokr_w1", ".lokr_w2", ".lokr_w2_a",
                ".lokr_w2_b", ".dora_scale")
_ALL_PARAMS = (".lora_down.weight", ".lora_up.weight") + _LYCO_PARAMS + (".alpha",)


def lycoris_name(diffusers_module: str) -> str:
    return LYCORIS_PREFIX + diffusers_module.replace(".", "_")


def _any_table(names: Iterable[str]) -> list[Group]:
    names = list(names)
    nd = max((int(m.group(1)) + 1 for n in names
              if (m := re.search(r"(?:double_blocks|(?<!single_)transformer_blocks)[._](\d+)[._]", n))), default=0)
    ns = max((int(m.group(1)) + 1 for n in names
              if (m := re.search(r"(?:single_blocks|single_transformer_blocks)[._](\d+)[._]", n))), default=0)
    return flux_groups(nd, ns, guidance=True)


def lycoris_prefixes(names: Iterable[str], layout: str, *, where: str = "Flux LoRA") -> dict[str, str]:
    """Our diffusers module names -> file key prefixes for LoHa/LoKr/DoRA modules in the kohya or comfyui
    layout: BFL names where the BFL weight is the module's alone, ``lycoris_<module>`` on fused weights and on
    ``norm_out.linear`` (BFL's ``final_layer.adaLN_modulation.1`` has its halves swapped, which ComfyUI's
    per-projection key map applies to the module's weight change, whatever the algorithm)."""
    names = list(names)
    by_name = _by_diffusers(_any_table(names))
    out = {}
    for name in names:
        if name not in by_name:
            raise FluxLoraKeyError(f"{where}: {name!r} is not a LoRA-able Flux transformer module (no BFL name for it).")
        g, _ = by_name[name]
        if g.fused or g.swap:
            out[name] = lycoris_name(name)
        else:
            out[name] = kohya_name(g.bfl) if layout == "kohya" else COMFY_PREFIX + g.bfl
    return out


def is_lycoris_file(keys: Iterable[str]) -> bool:
    """Whether a Flux LoRA file holds LoHa/LoKr/DoRA modules or per-projection ``lycoris_`` keys."""
    return any(k.startswith(LYCORIS_PREFIX) or k.endswith(_LYCO_PARAMS) for k in keys)


def from_lycoris_tensors(tensors: Mapping[str, torch.Tensor], *, where: str = "Flux LoRA",
                         mlp_ratio: float = MLP_RATIO) -> dict[str, torch.Tensor]:
    """A file of LoHa/LoKr/DoRA (and plain LoRA) modules -> ``<diffusers module>.<tensor>`` keys, unchanged values.

    Plain LoRA modules on fused BFL names are split exactly as ``from_bfl`` does; any other module on a
    fused name is refused (it has no exact split into q, k, v)."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for suffix in _ALL_PARAMS:
            if key.endswith(suffix):
                modules.setdefault(key[: -len(suffix)], {})[suffix[1:]] = t
                break
        else:
            raise FluxLoraKeyError(f"{where}: key {key!r} is not a LoRA/LyCORIS tensor (lora_down/up, hada_*, lokr_*, "
                                   "dora_scale, alpha).")
    table: dict[str, tuple[Group, str | None]] = {}
    for g in _any_table(modules):
        if g.norm:
            continue
        for n in g.diffusers:
            table[lycoris_name(n)] = (g, n)
        one = None if g.fused else g.diffusers[0]
        table[kohya_name(g.bfl)] = (g, one)
        table[COMFY_PREFIX + g.bfl] = (g, one)
    out: dict[str, torch.Tensor] = {}
    for prefix, parts in modules.items():
        if prefix not in table:
            raise FluxLoraKeyError(f"{where}: {prefix!r} matches no module of a Flux transformer; "
                                   "is this a LoRA for another model?")
        g, name = table[prefix]
        if name is not None and g.swap and not prefix.startswith(LYCORIS_PREFIX):
            parts = _unswap_rows(prefix, parts, where)
        if name is not None:
            out.update({f"{name}.{p}": t for p, t in parts.items()})
            continue
        if set(parts) - {"lora_down.weight", "lora_up.weight", "alpha"} or not {"lora_down.weight", "lora_up.weight"} <= set(parts):
            raise FluxLoraKeyError(f"{where}: {prefix} holds {sorted(parts)} on the fused {g.bfl} weight, which has no "
                                   f"exact split into {', '.join(g.diffusers)}; write it with per-projection keys "
                                   f"({lycoris_name(g.diffusers[0])} ...) or in the diffusers/PEFT layout.")
        alpha = float(parts["alpha"]) if "alpha" in parts else float(parts["lora_down.weight"].shape[0])
        lo = LoraWeights(parts["lora_down.weight"], parts["lora_up.weight"], alpha)
        for n, w in _split_fused(g, lo, mlp_ratio, where).items():
            out[f"{n}.lora_down.weight"], out[f"{n}.lora_up.weight"] = w.down, w.up
            out[f"{n}.alpha"] = torch.tensor(float(w.alpha))
    return out


def _unswap_rows(prefix: str, parts: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A module under BFL's ``final_layer.adaLN_modulation.1`` name, in (shift, scale) row order, for our
    ``norm_out.linear`` (scale, shift): swap the halves of every factor that carries the output rows."""
    out = dict(parts)
    for p in ("lora_up.weight", "hada_w1_a", "hada_w2_a"):
        if p in out:
            out[p] = _swap_halves(out[p])
    if "lokr_w1" in out:  # kron(w1, w2): swapping w1's row halves swaps the product's, when w1's rows are even
        if out["lokr_w1"].shape[0] % 2:
            raise FluxLoraKeyError(f"{where}: {prefix} is a LoKr whose w1 has {out['lokr_w1'].shape[0]} rows, which "
                                   "cannot be reordered from BFL's (shift, scale) to diffusers' (scale, shift); "
                                   "write it with the per-projection key lycoris_norm_out_linear.")
        out["lokr_w1"] = _swap_halves(out["lokr_w1"])
    return out
