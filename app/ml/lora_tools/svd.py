"""The linear algebra of the LoRA tools: low-rank factors of weight deltas by truncated SVD.

Every tool reduces to one step: a weight change dW per layer (from a LoRA of any algorithm, a sum of
LoRAs, or a fine-tune minus its base) -> its best rank-r approximation U_r S_r V_r^T (Eckart-Young:
no rank-r factorisation is closer in Frobenius norm) -> ``lora_up`` = U_r sqrt(S_r) / scale,
``lora_down`` = sqrt(S_r) V_r^T. Splitting S evenly keeps both factors in the same range, which is
what survives an fp16 save. Conv layers are flattened to (out, in*kh*kw) and the down factor keeps
the layer's kernel (LoCon), as kohya's ``resize_lora.py`` and ``extract_lora_from_models.py`` do.

The rank per layer is fixed or chosen from the singular values with kohya's dynamic rules
(``sv_ratio``, ``sv_fro``, ``sv_cumulative``), capped by the rank asked for. Each layer reports the
share of dW's Frobenius norm it keeps, sqrt(sum S_r^2 / sum S^2), the figure kohya prints.
"""

from __future__ import annotations

import math
from collections import Counter, abc
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from app.ml.adapters import AdapterError, AdapterSet, component_modules
from app.ml.adapters.io import assemble_adapter_set
from app.ml.adapters.modules import LoRAModule

DYNAMIC_METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")

Key = tuple[str, str]  # (component, module name)


@dataclass(frozen=True)
class LayerReport:
    component: str
    name: str
    rank: int  # the rank kept
    full_rank: int  # min(out, in*kh*kw): the rank that is always lossless
    fro_share: float  # ||dW_r||_F / ||dW||_F (1.0 = nothing lost)

    def row(self) -> list[str]:
        return [f"{self.component}.{self.name}", str(self.rank), f"{self.fro_share:.4f}"]


def rank_for(s: torch.Tensor, method: str, target: float, max_rank: int) -> int:
    """The rank kept for singular values ``s`` (descending), as kohya's ``resize_lora.py`` decides it.

    fixed: ``max_rank``; sv_ratio: the values above s[0] / target; sv_fro: the fewest values whose
    Frobenius share reaches ``target``; sv_cumulative: the fewest whose sum share reaches ``target``.
    Always at least 1 and at most ``max_rank`` and the number of values.
    """
    n = int(s.numel())
    if method == "fixed":
        r = max_rank
    elif method == "sv_ratio":
        if target <= 1:
            raise AdapterError(f"sv_ratio must be above 1 (keep values within 1/ratio of the largest), got {target}")
        r = int((s > s[0] / target).sum())
    elif method in ("sv_fro", "sv_cumulative"):
        if not 0 < target <= 1:
            raise AdapterError(f"{method} is a share between 0 and 1, got {target}")
        v = s.double() ** 2 if method == "sv_fro" else s.double()
        total = float(v.sum())
        if total == 0:
            return 1
        share = torch.cumsum(v, 0) / total
        if method == "sv_fro":
            share = share.sqrt()
        r = int(torch.searchsorted(share, torch.tensor(target - 1e-12, dtype=share.dtype))) + 1
    else:
        raise AdapterError(f"unknown rank method {method!r}; choose one of {', '.join(DYNAMIC_METHODS)}")
    return max(1, min(int(r), int(max_rank), n))


def effective_deltas(bundle, aset: AdapterSet, strength: float = 1.0) -> dict[Key, torch.Tensor]:
    """The fp32 change each layer's weight gets from ``aset`` at ``strength``: dW of LoRA/LoHa/LoKr
    directly, and for DoRA the merged weight minus the base (its magnitude rescales whole channels)."""
    comps = component_modules(bundle)
    out: dict[Key, torch.Tensor] = {}
    with torch.no_grad():
        for e in aset.entries():
            base = comps[e.component].get_submodule(e.name)
            if e.module.dora_scale is None:
                d = e.module.delta_weight().float() * float(strength)
            else:
                d = e.module.merged_weight(base, strength).float() - base.weight.float()
            out[(e.component, e.name)] = d.detach().cpu()
    return out


def _lowrank(delta, rank: int, method: str, target: float):
    """Rank-``rank`` factors of ``delta``: a dense tensor, or ``(up, down)`` with delta = up @ down.

    The factored form never builds dW: with up = Q1 R1 and down^T = Q2 R2, the SVD of the small
    R1 R2^T (r x r) gives dW's singular values and vectors exactly, in O((out + in) r^2) instead of
    a full SVD of an out x in*kh*kw matrix (what makes resizing a full-size LoRA take seconds).
    """
    if isinstance(delta, tuple):
        up, down = (t.double() for t in delta)
        full = min(up.shape[0], down.shape[1])
        q1, r1 = torch.linalg.qr(up)
        q2, r2 = torch.linalg.qr(down.T)
        u, s, vh = torch.linalg.svd(r1 @ r2.T)
        u, vh = q1 @ u, vh @ q2.T
    else:
        mat = delta.reshape(delta.shape[0], -1).double()
        full = min(mat.shape)
        u, s, vh = _gram_svd(mat)
    r = rank_for(s, method, target, rank)
    total = float((s ** 2).sum())
    share = math.sqrt(float((s[:r] ** 2).sum()) / total) if total > 0 else 1.0
    root = s[:r].sqrt()
    return (u[:, :r] * root).float(), (root[:, None] * vh[:r]).float(), r, full, share


def _gram_svd(mat: torch.Tensor):
    """SVD of a dense fp64 matrix through the eigen-decomposition of its Gram matrix on the smaller side.

    A full-size SD conv difference is 1280 x 11520: LAPACK's SVD of it takes about a minute on one
    CPU core, the 1280 x 1280 Gram matrix and its eigh a few seconds. In fp64 the singular values lost
    to squaring are those below ~1e-8 of the largest, which no LoRA rank keeps; vectors of values that
    small are set to zero rather than divided by them.
    """
    wide = mat.shape[0] <= mat.shape[1]
    g = mat @ mat.T if wide else mat.T @ mat
    w, vec = torch.linalg.eigh(g)
    w, vec = w.flip(0).clamp_min(0), vec.flip(1)
    s = w.sqrt()
    inv = torch.where(s > s[0] * 1e-10, 1.0 / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(s))
    if wide:
        return vec, s, (vec.T @ mat) * inv[:, None]
    return (mat @ vec) * inv[None, :], s, vec.T


def _largest(delta) -> float:
    if isinstance(delta, tuple):
        return float((delta[0] @ delta[1]).abs().max())
    return float(delta.abs().max())


def factored_deltas(aset: AdapterSet, strength: float = 1.0, bundle=None) -> dict[Key, object]:
    """Like ``effective_deltas``, but plain LoRA/LoCon layers as ``(up, down)`` factors (scale and strength
    in ``up``), so the SVD tools never build their full-size dW."""
    out: dict[Key, object] = {}
    dense = [e for e in aset.entries() if not _is_plain(e.module)]
    if dense:
        if bundle is None:
            raise AdapterError("a bundle is needed to read LoHa/LoKr/DoRA deltas")
        full = effective_deltas(bundle, aset, strength)
    for e in aset.entries():
        key = (e.component, e.name)
        m = e.module
        if _is_plain(m):
            up = m.lora_up.weight.detach().float().reshape(m.out_dim, m.rank).cpu() * (m.scale * float(strength))
            out[key] = (up, m.lora_down.weight.detach().float().reshape(m.rank, -1).cpu())
        else:
            out[key] = full[key]
    return out


def _is_plain(m) -> bool:
    return isinstance(m, LoRAModule) and m.dora_scale is None


def _add(a, b):
    """Sum of two deltas; factored + factored stays factored (the factors side by side)."""
    if isinstance(a, tuple) and isinstance(b, tuple):
        return torch.cat([a[0], b[0]], dim=1), torch.cat([a[1], b[1]], dim=0)
    dense = [(t[0] @ t[1]) if isinstance(t, tuple) else t.reshape(t.shape[0], -1) for t in (a, b)]
    return dense[0] + dense[1]


def _lora_module(base: nn.Module, up: torch.Tensor, down: torch.Tensor, scale: float) -> LoRAModule:
    r = up.shape[1]
    m = LoRAModule(base, r, scale * r)
    with torch.no_grad():
        m.lora_up.weight.copy_((up / scale).reshape(m.lora_up.weight.shape))
        m.lora_down.weight.copy_(down.reshape(m.lora_down.weight.shape))
    return m


def _adapter_set(bundle, modules: Mapping[Key, LoRAModule], seed: int = 0) -> AdapterSet:
    """A plain LoRA/LoCon set of ``modules`` in model order, its config read back as a loaded file's is."""
    if not modules:
        raise AdapterError("no layer is left to write (every difference was below the threshold, or the LoRA is empty)")
    ranks = Counter(m.rank for m in modules.values())
    alphas = Counter(float(m.alpha) for m in modules.values())
    conv = any(m.is_conv and m.kernel != (1, 1) for m in modules.values())
    built = [(c, n, m) for (c, n), m in modules.items()]
    return assemble_adapter_set(bundle, built, "locon" if conv else "lora", int(ranks.most_common(1)[0][0]),
                                float(alphas.most_common(1)[0][0]), seed=seed)


def lora_from_deltas(
    bundle,
    deltas: Mapping[Key, torch.Tensor],
    rank: int,
    *,
    method: str = "fixed",
    target: float = 0.0,
    conv_rank: int | None = None,
    scale: "float | Callable[[Key], float]" = 1.0,
    max_ranks: Mapping[Key, int] | None = None,
    min_diff: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[AdapterSet, list[LayerReport]]:
    """A LoRA whose layers approximate ``deltas`` (per (component, module name)) by truncated SVD.

    ``scale`` is alpha/rank of the result (alpha is written as scale * rank, kohya's resize keeps the
    input's ratio); ``max_ranks`` caps a layer's rank (a LoRA's delta has no more than its own rank);
    layers whose largest absolute difference is at most ``min_diff`` are left out.
    """
    comps = component_modules(bundle)
    modules: dict[Key, LoRAModule] = {}
    reports: list[LayerReport] = []
    items = list(deltas.items())
    for i, (key, delta) in enumerate(items):
        if progress:
            progress(i, len(items))
        if (min_diff > 0 or not isinstance(delta, tuple)) and _largest(delta) <= min_diff:
            continue  # unchanged (or barely changed) layers are left out
        base = comps[key[0]].get_submodule(key[1])
        is_3x3 = isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
        want = conv_rank if (is_3x3 and conv_rank) else rank
        if max_ranks and key in max_ranks:
            want = min(want, max_ranks[key])
        up, down, r, full, share = _lowrank(delta, want, method, target)
        s = scale(key) if callable(scale) else float(scale)
        modules[key] = _lora_module(base, up, down, s)
        reports.append(LayerReport(key[0], key[1], r, full, share))
    if progress:
        progress(len(items), len(items))
    return _adapter_set(bundle, modules), reports


def resize_lora(bundle, aset: AdapterSet, rank: int, *, method: str = "fixed", target: float = 0.0,
                conv_rank: int | None = None, progress=None) -> tuple[AdapterSet, list[LayerReport]]:
    """``aset`` (any algorithm) as a LoRA/LoCon of ``rank`` (or dynamic, capped by ``rank``), keeping
    each layer's alpha/rank ratio. A LoRA layer is never given more rank than it has."""
    deltas = factored_deltas(aset, bundle=bundle)
    caps, scales = {}, {}
    for e in aset.entries():
        key = (e.component, e.name)
        if isinstance(e.module, LoRAModule) and e.module.dora_scale is None:
            caps[key] = e.module.rank
        scales[key] = e.module.scale
    return lora_from_deltas(bundle, deltas, rank, method=method, target=target, conv_rank=conv_rank,
                            scale=lambda k: scales[k], max_ranks=caps, progress=progress)


def merge_loras(bundle, pairs: Sequence[tuple[AdapterSet, float]], *, mode: str = "exact", rank: int = 32,
                method: str = "fixed", target: float = 0.0, conv_rank: int | None = None,
                progress=None) -> tuple[AdapterSet, list[LayerReport]]:
    """One LoRA equal to applying every ``(aset, weight)`` together.

    exact: the factors side by side (rank = the sum of ranks), identical to applying all of them;
    plain LoRA/LoCon only, since LoHa/LoKr/DoRA are not sums of low-rank products. svd: the summed
    deltas of any algorithms compressed to ``rank`` (kohya's ``svd_merge_lora.py``).
    """
    if not pairs:
        raise AdapterError("nothing to merge: connect at least one LoRA")
    if mode == "svd":
        total: dict[Key, object] = {}
        for aset, w in pairs:
            for key, d in factored_deltas(aset, w, bundle).items():
                total[key] = _add(total[key], d) if key in total else d
        return lora_from_deltas(bundle, total, rank, method=method, target=target, conv_rank=conv_rank,
                                progress=progress)
    if mode != "exact":
        raise AdapterError(f"unknown merge mode {mode!r}; choose exact or svd")
    comps = component_modules(bundle)
    ups: dict[Key, list[torch.Tensor]] = {}
    downs: dict[Key, list[torch.Tensor]] = {}
    for aset, w in pairs:
        for e in aset.entries():
            m = e.module
            if not isinstance(m, LoRAModule) or m.dora_scale is not None:
                raise AdapterError(f"exact merge adds plain LoRA/LoCon factors; {aset.config.algorithm} "
                                   f"({e.component}.{e.name}) is not one: choose mode svd")
            key = (e.component, e.name)
            ups.setdefault(key, []).append(m.lora_up.weight.detach().float().reshape(m.out_dim, m.rank) * (m.scale * w))
            downs.setdefault(key, []).append(m.lora_down.weight.detach().float())
    modules = {}
    reports = []
    for key in ups:
        base = comps[key[0]].get_submodule(key[1])
        up = torch.cat(ups[key], dim=1)
        down = torch.cat(downs[key], dim=0)
        modules[key] = _lora_module(base, up.cpu(), down.cpu(), 1.0)
        reports.append(LayerReport(key[0], key[1], up.shape[1], min(up.shape[0], down[0].numel()), 1.0))
    return _adapter_set(bundle, modules), reports


def extract_lora(tuned, base, rank: int, *, method: str = "fixed", target: float = 0.0, conv_rank: int | None = None,
                 min_diff: float = 0.0, components: Iterable[str] | None = None,
                 progress=None) -> tuple[AdapterSet, list[LayerReport]]:
    """A LoRA of the difference ``tuned`` - ``base`` (two models of one family and shape) on every layer
    a full LoCon adapts (Linear and conv, UNet and text encoders), by truncated SVD per layer."""
    if tuned.family.id != base.family.id:
        raise AdapterError(f"the fine-tuned model is {tuned.family.display_name} but the base is "
                           f"{base.family.display_name}; extract from two models of one family")
    bc, tc = component_modules(base), component_modules(tuned)
    wanted = set(components) if components is not None else set(bc)
    layers: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    for component, model in bc.items():
        if component not in wanted:
            continue
        for name in base.family.adapter_targets(model, component, "full", (), True):
            wb = model.get_submodule(name).weight
            try:
                wt = tc[component].get_submodule(name).weight
            except AttributeError:
                raise AdapterError(f"the fine-tuned model has no {component}.{name}; is it the same architecture?") from None
            if wt.shape != wb.shape:
                raise AdapterError(f"{component}.{name} is {tuple(wt.shape)} in the fine-tuned model but "
                                   f"{tuple(wb.shape)} in the base; they are not the same architecture")
            layers[(component, name)] = (wt, wb)
    deltas = _Differences(layers)
    return lora_from_deltas(base, deltas, rank, method=method, target=target, conv_rank=conv_rank,
                            min_diff=min_diff, progress=progress)


class _Differences(abc.Mapping):
    """tuned - base per layer, computed when read: a full-size UNet's deltas never all sit in memory."""

    def __init__(self, layers: Mapping[Key, tuple[torch.Tensor, torch.Tensor]]):
        self._layers = dict(layers)

    def __getitem__(self, key: Key) -> torch.Tensor:
        wt, wb = self._layers[key]
        with torch.no_grad():
            return (wt.detach().float() - wb.detach().float()).cpu()

    def __iter__(self):
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)
