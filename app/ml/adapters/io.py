"""Adapter weights <-> tensors in the kohya / LyCORIS, diffusers-PEFT and ComfyUI layouts.

``adapter_tensors`` turns an ``AdapterSet`` into the flat ``{key: tensor}`` a file holds;
``load_adapter_file`` reads such a file (ours, kohya's, LyCORIS', diffusers' or ComfyUI's) back into
an ``AdapterSet`` for a given base model, so training can continue from an existing LoRA. Every key
must be understood: a file key that matches no layer of the model is an error naming the key,
never silently dropped (the "lora key not loaded" complaint users have with other tools).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn as nn

from .adapter_set import AdapterSet, component_modules
from .config import AdapterConfig, AdapterError
from .modules import LoRAModule, make_module
from .naming import LAYOUTS, alias_table, module_key, te_full_name

PEFT_METADATA_KEY = "lora_adapter_metadata"  # diffusers reads LoraConfig kwargs from here

# Parameter suffixes we understand, longest first so ".lora_down.weight" wins over ".weight".
_SUFFIXES = (
    ".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b",
    ".lokr_w1", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b",
    ".dora_scale", ".alpha",
)


def adapter_tensors(aset: AdapterSet, layout: str = "kohya", *, unet_naming: str | None = None) -> dict[str, torch.Tensor]:
    """The file tensors of ``aset`` in ``layout`` (fp32 copies, contiguous; cast when saving)."""
    if layout not in LAYOUTS:
        raise AdapterError(f"unknown LoRA layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    out: dict[str, torch.Tensor] = {}
    for e in aset.entries():
        m = e.module
        prefix = module_key(e.component, e.name, layout, aset.family, aset.unet_config, unet_naming)
        if layout == "peft":
            if not isinstance(m, LoRAModule) or m.dora_scale is not None:
                raise AdapterError(
                    f"the diffusers/PEFT layout holds plain LoRA/LoCon only; save {aset.config.algorithm} in kohya or ComfyUI layout"
                )
            out[prefix + ".lora_A.weight"] = m.lora_down.weight
            out[prefix + ".lora_B.weight"] = m.lora_up.weight
            continue
        for pname, p in m.named_parameters():  # parameter names are already the LyCORIS tensor names
            out[f"{prefix}.{pname}"] = p
        out[prefix + ".alpha"] = m.alpha
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def peft_metadata(aset: AdapterSet) -> dict[str, Any]:
    """LoraConfig kwargs per component as diffusers reads them (``unet.r``, ``text_encoder.lora_alpha``...).

    Without them diffusers would assume alpha = rank; the patterns carry per-layer rank/alpha
    (LoCon conv layers). Text-encoder names drop ``text_model.`` so they match both the flattened
    transformers-5 ``CLIPTextModel`` and ``CLIPTextModelWithProjection`` (PEFT matches by suffix).
    """
    meta: dict[str, Any] = {}
    for component in aset.components:
        entries = [e for e in aset.entries() if e.component == component]
        names = [e.name if component == "unet" else te_full_name(e.name).removeprefix("text_model.") for e in entries]
        ranks = [e.module.rank for e in entries]
        alphas = [float(e.module.alpha) for e in entries]
        r = Counter(ranks).most_common(1)[0][0]
        a = Counter(alphas).most_common(1)[0][0]
        meta.update({
            f"{component}.r": r,
            f"{component}.lora_alpha": a,
            f"{component}.target_modules": names,
            f"{component}.rank_pattern": {n: rk for n, rk in zip(names, ranks) if rk != r},
            f"{component}.alpha_pattern": {n: al for n, al in zip(names, alphas) if al != a},
            f"{component}.use_dora": False,
            f"{component}.lora_dropout": 0.0,
            f"{component}.init_lora_weights": True,
        })
    return meta


def read_tensor_file(path: "str | os.PathLike") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"LoRA file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle that needs code is refused, not run
        raise AdapterError(f"{path.name}: cannot be read safely ({e}); use a .safetensors LoRA") from None
    return dict(sd.get("state_dict", sd)), {}


def _split(key: str) -> tuple[str, str]:
    for s in _SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)], s[1:]
    raise AdapterError(f"unknown LoRA tensor {key!r} (not a lora_down/up, lora_A/B, hada_*, lokr_*, dora_scale or alpha key)")


def load_adapter_file(path: "str | os.PathLike", bundle, *, trainable: bool = True, seed: int = 0) -> AdapterSet:
    """Read a LoRA/LyCORIS file in any supported layout as an ``AdapterSet`` for ``bundle``.

    Ranks come from the tensor shapes, alpha from each ``.alpha`` (or the diffusers PEFT metadata;
    alpha = rank when a file has neither, the diffusers convention). The result can be attached,
    trained further and saved again. Raises ``AdapterError`` naming every key that matches no layer.
    """
    tensors, meta = read_tensor_file(path)
    tensors = bundle.family.read_adapter_tensors(tensors, meta, where=Path(path).name)
    comps = component_modules(bundle)
    table = alias_table(comps, bundle.family, bundle.denoiser.config)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if key.startswith("bundle_emb."):  # bundled embeddings: app.ml.embeddings.load_bundled_embeddings
            continue
        prefix, param = _split(key)
        groups.setdefault(prefix, {})[param] = t
    unknown = [p for p in groups if p not in table]
    if unknown:
        shown = ", ".join(sorted(unknown)[:8])
        raise AdapterError(
            f"{Path(path).name}: {len(unknown)} LoRA module(s) match no layer of this {bundle.family.display_name} "
            f"model (is it a LoRA for another base model?): {shown}{' ...' if len(unknown) > 8 else ''}"
        )
    peft_meta = json.loads(meta[PEFT_METADATA_KEY]) if PEFT_METADATA_KEY in meta else {}

    built: list[tuple[str, str, nn.Module]] = []
    algos: Counter = Counter()
    ranks: Counter = Counter()
    alphas: Counter = Counter()
    for prefix, params in groups.items():
        component, name = table[prefix]
        base = comps[component].get_submodule(name)
        p = dict(params)
        if "lora_A.weight" in p:
            p["lora_down.weight"], p["lora_up.weight"] = p.pop("lora_A.weight"), p.pop("lora_B.weight")
        dora = "dora_scale" in p
        is_3x3 = isinstance(base, nn.Conv2d) and tuple(base.kernel_size) != (1, 1)
        if "lora_down.weight" in p:
            rank = p["lora_down.weight"].shape[0]
            algo = "dora" if dora else ("locon" if is_3x3 else "lora")
            lokr_kw = None
        elif "hada_w1_a" in p:
            rank, algo, lokr_kw = p["hada_w1_b"].shape[0], "loha", None
        elif "lokr_w1" in p:
            full = "lokr_w2" in p
            rank = p["lokr_w2_a"].shape[1] if not full else max(p["lokr_w2"].shape[:2])
            algo, lokr_kw = "lokr", {"full_w2": full, "w1_shape": tuple(p["lokr_w1"].shape)}
        else:
            raise AdapterError(f"{Path(path).name}: module {prefix} has only {sorted(p)}; cannot tell its algorithm")
        if "alpha" in p:
            alpha = float(p.pop("alpha"))
        else:
            alpha = _peft_alpha(peft_meta, component, name, rank)
        module = make_module(algo if algo != "locon" else "lora", base, rank, alpha, lokr=lokr_kw)
        if algo == "dora" and not isinstance(module, LoRAModule):
            raise AdapterError(f"{prefix}: DoRA is read for LoRA modules only")
        own = dict(module.named_parameters())
        for pname, value in p.items():
            if pname not in own:
                raise AdapterError(f"{Path(path).name}: unexpected tensor {prefix}.{pname} for a {algo} module")
            if pname == "dora_scale":
                if value.shape[0] == module.out_dim and module.out_dim != 1:  # an output-axis file: keep its axis
                    module.dora_scale = nn.Parameter(torch.empty(module.out_dim, *[1] * (own[pname].dim() - 1)))
                    own[pname] = module.dora_scale
                value = value.reshape(own[pname].shape)
            if tuple(value.shape) != tuple(own[pname].shape):
                raise AdapterError(
                    f"{Path(path).name}: {prefix}.{pname} has shape {tuple(value.shape)}, expected {tuple(own[pname].shape)} "
                    "for this model's layer"
                )
            with torch.no_grad():
                own[pname].copy_(value.float())
        missing = set(own) - set(p)
        if missing:
            raise AdapterError(f"{Path(path).name}: {prefix} lacks {sorted(missing)}")
        built.append((component, name, module))
        algos[algo] += 1
        ranks[rank] += 1
        alphas[alpha] += 1

    algorithm = algos.most_common(1)[0][0]
    if algorithm == "lora" and algos.get("locon"):
        algorithm = "locon"
    return assemble_adapter_set(bundle, built, algorithm, int(ranks.most_common(1)[0][0]),
                                float(alphas.most_common(1)[0][0]), seed=seed, trainable=trainable)


def assemble_adapter_set(bundle, built, algorithm: str, rank: int, alpha: float, *, seed: int = 0,
                         trainable: bool = False) -> AdapterSet:
    """An AdapterSet of ready modules ``built`` ((component, module name, adapter module) triples) in
    model order, its config naming exactly those layers: how a loaded file or a computed LoRA
    (resize, merge, extract) becomes the same kind of value LoRAInject makes."""
    comps = component_modules(bundle)
    by_comp: dict[str, list[str]] = {}
    for c, n, _ in built:
        by_comp.setdefault(c, []).append(n)
    config = AdapterConfig(
        algorithm=algorithm,
        rank=rank,
        alpha=alpha,
        targets={c: "custom" for c in by_comp},
        custom={c: tuple(f"^{n.replace('.', chr(92) + '.')}$" for n in ns) for c, ns in by_comp.items()},
        seed=seed,
    )
    aset = AdapterSet(config, bundle.family, getattr(bundle, "identity", ""), bundle.denoiser.config)
    order = {c: {n: i for i, n in enumerate(dict(comps[c].named_modules()))} for c in by_comp}
    for component, name, module in sorted(built, key=lambda b: (b[0], order[b[0]][b[1]])):
        aset.add(component, name, module)
    aset.requires_grad_(trainable)
    if trainable:  # trained further on this base (LoRAInject's init_from): its precision is the one to record
        aset.base_precision = dict(getattr(bundle, "precisions", {}))
    return aset.to(device=bundle.denoiser.device)


def _peft_alpha(meta: Mapping, component: str, name: str, rank: int) -> float:
    if not meta:
        return float(rank)
    short = te_full_name(name).removeprefix("text_model.") if component != "unet" else name
    pattern = meta.get(f"{component}.alpha_pattern") or {}
    if short in pattern:
        return float(pattern[short])
    return float(meta.get(f"{component}.lora_alpha", rank))
