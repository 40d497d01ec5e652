"""A recipe's memory plan, before anything loads: walks the graph from each TrainLoop to its
LoadModel, LoRAInject, Optimizer, Bucketer and Cache and predicts the step's peak device memory.

Nothing is loaded: each component is built from its config on the ``meta`` device (a builtin's
spec, a diffusers folder's ``config.json`` files, or the family's shipped configs for a single file
or an unset source), which gives exact parameter counts, the Linear share quantization shrinks, the
blocks block swap streams and the layers an adapter selects. A single ``.safetensors`` file's own
counts come from its header. A forward on ``meta`` tensors at the largest bucket gives the shapes of
the adapted layers' inputs (what a LoRA keeps for its gradient). The rest of the activations come
from the profile the family module carries (``app/ml/models/families/memory.py``).

The plan answers for the recipe's TrainLoop as the run will do it: the denoiser always on the
device; text encoders and VAE off it when the Cache node holds their outputs and they do not train
(they visit the device only to encode and to sample).
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .plan import GB, WEIGHT_BYTES, Component, Plan, Recipe, fit, predict

SIZE_UNITS = {"": 1e9, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
              "tib": 2**40, "k": 1e3, "m": 1e6, "g": 1e9}
ADAPTER_NODES = ("LoRAInject",)
COMPARABLE_BYTES = 256e6  # below this a run's measured peak is mostly what a training step's plan leaves out


class PlanError(Exception):
    """The plan cannot be made; the message names the node and what to set."""


def parse_size(text: str | float | int) -> float:
    """Bytes from "12GB", "12 GiB", "11.5G", "12000MB" (GB = 10^9, GiB = 2^30); a bare "12" is 12 GB, as GPU
    sizes are said (a number passed as int/float is bytes)."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if not m or unit not in SIZE_UNITS:
        raise ValueError(f"size {text!r} not understood; write e.g. 12GB, 11.5GiB or 8000MB")
    return float(m.group(1)) * SIZE_UNITS[unit]


def gb(value: float) -> str:
    """Bytes as people read memory sizes (GB = 10^9, as GPU makers count): MB below 1 GB."""
    return f"{value / GB:.2f} GB" if abs(value) >= GB else f"{value / 1e6:.1f} MB"


# ---- the graph ----------------------------------------------------------------------------------

@dataclass
class _Graph:
    nodes: dict[str, dict]  # id -> {"type", "params", "title"}
    links: list[dict]

    def source(self, nid: str, inp: str) -> str | None:
        return next((l["from_node"] for l in self.links if l["to_node"] == nid and l["to_input"] == inp), None)

    def label(self, nid: str) -> str:
        n = self.nodes[nid]
        return f"{n.get('title') or n['type']} (node {nid})"


def _graph_from(graph, registry) -> _Graph:
    """Node params with the spec's defaults filled in, from an app.graph Graph."""
    nodes = {}
    for nid, node in graph.nodes.items():
        spec = registry.get(node.type) if registry is not None else None
        params = {i.name: i.default for i in spec.inputs if not i.is_socket} if spec is not None else {}
        params.update(node.params)
        nodes[nid] = {"type": node.type, "params": params, "title": node.title}
    links = [{"from_node": l.from_node, "to_node": l.to_node, "to_input": l.to_input, "from_output": l.from_output}
             for l in graph.links]
    return _Graph(nodes, links)


def _upstream(g: _Graph, nid: str, inp: str, want: str, where: str) -> tuple[str, list[str]]:
    """The ``want`` node feeding ``nid.inp``, following the same socket through the nodes between
    (LoRAInject on a model, Cache on buckets), and those nodes."""
    passed: list[str] = []
    cur = nid
    for _ in range(64):
        src = g.source(cur, inp)
        if src is None:
            raise PlanError(f"{where}: its {inp} input is not linked to a {want} (link one to plan the memory)")
        if g.nodes[src]["type"] == want:
            return src, passed
        passed.append(src)
        cur = src
    raise PlanError(f"{where}: no {want} found upstream of its {inp} input")


# ---- the model: configs on meta, counts, profiles -----------------------------------------------

@dataclass
class _Model:
    family: Any
    source: str
    kinds: dict[str, str] = field(default_factory=dict)  # component -> class name
    configs: dict[str, dict] = field(default_factory=dict)
    header_counts: dict[str, int] = field(default_factory=dict)  # from a single file's header
    notes: list[str] = field(default_factory=list)


def _read_json(path: Path, where: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"{where}: cannot read {path} ({e})") from None


def _family_config_dir(family) -> Path:
    from app.ml.models.tiny import CONFIGS

    for base in (CONFIGS, Path(__file__).resolve().parents[1] / "flux" / "configs"):
        if (base / family.config_dir).is_dir():
            return base / family.config_dir
    raise PlanError(f"no shipped configs for {family.display_name} ({family.config_dir})")


def _component_classes(family) -> dict[str, str]:
    kinds = {family.denoiser: "FluxTransformer2DModel" if family.denoiser == "transformer" else "UNet2DConditionModel",
             "vae": "AutoencoderKL"}
    for spec in family.text_encoders:
        kinds[spec.name] = spec.model_class
    return kinds


def _configs_from_dir(folder: Path, kinds: dict[str, str], where: str) -> dict[str, dict]:
    out = {}
    for comp in kinds:
        path = folder / comp / "config.json"
        if path.is_file():
            out[comp] = _read_json(path, where)
    return out


def _builtin(name: str, where: str) -> _Model:
    from app.ml.models.families import get_family

    if name == "tiny-flux":
        from app.ml.flux.tiny import component_config

        fam = get_family("flux-dev")
        kinds = _component_classes(fam)
        return _Model(fam, f"builtin:{name}", kinds, {c: component_config(c) for c in kinds})
    from app.ml.models.families import ModelLoadError
    from app.ml.models.tiny import tiny_spec

    try:
        spec = tiny_spec(name)
    except ModelLoadError as e:
        raise PlanError(f"{where}: {e}") from None
    kinds = _component_classes(spec.family)
    configs = {"unet": dict(spec.unet), "vae": dict(spec.vae)}
    for te_spec, cfg in zip(spec.family.text_encoders, spec.text_encoders):
        configs[te_spec.name] = {k: v for k, v in cfg.items() if k != "_class"}
        kinds[te_spec.name] = cfg.get("_class", te_spec.model_class)
    return _Model(spec.family, f"builtin:{name}", kinds, configs)


def safetensors_shapes(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) from a .safetensors header, reading nothing else."""
    with open(path, "rb") as f:
        raw = f.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else 0
        if n < 2 or n > 100_000_000:
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(n).decode("utf-8"))
    header.pop("__metadata__", None)
    return {k: (v.get("dtype", ""), tuple(v.get("shape", ()))) for k, v in header.items() if isinstance(v, dict)}


# where each component's tensors live in a one-file checkpoint (A1111 / ComfyUI layouts)
SINGLE_FILE_PREFIXES = {
    "unet": ("model.diffusion_model.",), "transformer": ("model.diffusion_model.", ""),
    "vae": ("first_stage_model.", "vae."), "text_encoder": ("cond_stage_model.", "conditioner.embedders.0.",
                                                            "text_encoders.clip_l."),
    "text_encoder_2": ("conditioner.embedders.1.", "text_encoders.t5xxl."),
}


def _header_counts(path: Path, kinds: dict[str, str]) -> dict[str, int]:
    shapes = safetensors_shapes(path)
    counts: dict[str, int] = {}
    claimed: set[str] = set()
    for comp in kinds:
        for prefix in SINGLE_FILE_PREFIXES.get(comp, ()):
            if not prefix:  # a bare transformer file: everything not claimed by another part
                continue
            names = [k for k in shapes if k.startswith(prefix) and k not in claimed]
            if names:
                claimed.update(names)
                counts[comp] = sum(_numel(shapes[k][1]) for k in names)
                break
    den = next((c for c in kinds if "" in SINGLE_FILE_PREFIXES.get(c, ())), None)
    if den and den not in counts:
        rest = [k for k in shapes if k not in claimed]
        if rest:
            counts[den] = sum(_numel(shapes[k][1]) for k in rest)
    return counts


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _model_of(params: dict, recipe_dir: Path | None, where: str) -> _Model:
    from app.ml.models.families import ModelLoadError, get_family

    source = str(params.get("source") or "").strip()
    wanted = str(params.get("family") or "auto")
    if source.startswith("builtin:"):
        m = _builtin(source[len("builtin:"):], where)
        return m
    fam = None
    if wanted != "auto":
        fam = get_family(wanted)
    path = None
    if source:
        path = Path(source).expanduser()
        if not path.is_absolute() and recipe_dir is not None:
            path = Path(recipe_dir) / path
        if not path.exists():
            raise PlanError(f"{where}: the model {source} does not exist; set LoadModel.source to a diffusers folder or "
                            f".safetensors file")
        if fam is None:
            from app.graph.inputs_check import HeaderError, _family_of

            try:
                fam = _family_of(path)
            except (HeaderError, ModelLoadError, OSError) as e:
                raise PlanError(f"{where}: {path}: {e}") from None
            if fam is None:
                raise PlanError(f"{where}: the family of {path} cannot be told from its header; set LoadModel.family")
    notes = []
    if fam is None:  # an unset source with family auto (a preset waiting for its model)
        fam = get_family("sd15")
        notes.append("LoadModel.source is not set and family is auto: planned for Stable Diffusion 1.5 "
                     "(set the family or the source for another)")
    kinds = _component_classes(fam)
    shipped = _family_config_dir(fam)
    configs = _configs_from_dir(shipped, kinds, where)
    model = _Model(fam, source or f"{fam.display_name} (standard configs)", kinds, configs, notes=notes)
    if path is not None and path.is_dir():
        model.configs.update(_configs_from_dir(path, kinds, where))
    elif path is not None and path.suffix.lower() == ".safetensors":
        try:
            model.header_counts = _header_counts(path, kinds)
        except (OSError, ValueError) as e:
            raise PlanError(f"{where}: {path}: cannot read its header ({e})") from None
    elif path is not None:
        notes.append(f"{path.name}: not a .safetensors file; its sizes are the family's standard configs'")
    if not source and wanted != "auto":
        notes.append(f"LoadModel.source is not set: planned for the standard {fam.display_name} configs")
    return model


def _build_meta(kind: str, config: dict):
    """A component with empty (meta) weights from its config."""
    import torch

    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if kind in ("UNet2DConditionModel", "FluxTransformer2DModel", "AutoencoderKL"):
            import diffusers

            cls = getattr(diffusers, kind)
            return cls.from_config(cfg)
        import transformers

        cls = getattr(transformers, kind)
        return cls(cls.config_class(**cfg))


# ---- the recipe -> plan -------------------------------------------------------------------------

@dataclass
class RecipePlan:
    node: str  # TrainLoop id
    where: str  # "TrainLoop (node 8)"
    model: str  # what was planned: the family and the source
    recipe: Recipe
    notes: list[str]
    tokens: str  # e.g. "1024x1024, batch 1: 4096 image + 512 text tokens"

    @property
    def plan(self) -> Plan:
        return predict(self.recipe)

    @property
    def peak(self) -> float:
        return self.plan.peak

    def fit(self, target: float) -> Plan | None:
        return fit(self.recipe, target)

    def text(self, target: float | None = None) -> str:
        plan = self.plan
        lines = [f"{self.where}: {self.model}", f"  predicted peak device memory: {gb(plan.peak)}  ({self.tokens})"]
        unit, div = ("GB", GB) if plan.peak >= GB else ("MB", 1e6)
        lines += [f"    {k:<44} {v / div:9.3f} {unit}" for k, v in plan.parts.items() if v]
        lines += [f"  note: {n}" for n in self.notes]
        if target is not None:
            lines.append(self.fit_text(target))
        return "\n".join(lines)

    def fit_text(self, target: float) -> str:
        best = self.fit(target)
        if best is None:
            return (f"  to fit {gb(target)}: nothing fits (the smallest plan the changes reach is "
                    f"{gb(self.smallest().peak)}: a smaller bucket or batch, or a smaller model)")
        if not best.changes:
            return f"  fits {gb(target)} as it is"
        return f"  to fit {gb(target)}: {' + '.join(best.changes)} -> {gb(best.peak)}"

    def smallest(self) -> Plan:
        return fit(self.recipe, 0.0) or predict(_everything(self.recipe))

    def to_dict(self, target: float | None = None) -> dict:
        plan = self.plan
        out = {"node": self.node, "where": self.where, "model": self.model, "tokens": self.tokens,
               "peak_bytes": round(plan.peak), "parts": {k: round(v) for k, v in plan.parts.items() if v},
               "notes": list(self.notes)}
        if target is not None:
            best = self.fit(target)
            out["fit"] = {"target_bytes": round(target), "fits": best is not None,
                          "changes": best.changes if best is not None else None,
                          "peak_bytes": round(best.peak) if best is not None else None}
        return out


def _everything(r: Recipe) -> Recipe:
    """Every change at once (for "the smallest the changes reach")."""
    den = r.denoiser
    comps = [replace(c, quant="nf4") if c.name == den and not r.full_finetune else c for c in r.components]
    eight = {"adamw": "adamw8bit", "lion": "lion8bit"}.get(r.optimizer, r.optimizer)
    return replace(r, components=comps, checkpointing=True, offload_activations=True, optimizer=eight,
                   blocks_resident=1 if r.blocks > 1 and not r.full_finetune else r.blocks_resident)


def plan_graph(graph, registry=None, recipe_dir: str | Path | None = None) -> list[RecipePlan]:
    """A plan for every TrainLoop of ``graph`` (an app.graph Graph); PlanError names what is missing."""
    g = _graph_from(graph, registry)
    loops = [nid for nid, n in g.nodes.items() if n["type"] == "TrainLoop"]
    if not loops:
        raise PlanError("the recipe has no TrainLoop: nothing trains, so there is no training memory to plan")
    return [plan_train_loop(g, nid, Path(recipe_dir) if recipe_dir else None) for nid in loops]


def plan_train_loop(g: _Graph, nid: str, recipe_dir: Path | None) -> RecipePlan:
    where = g.label(nid)
    tp = g.nodes[nid]["params"]
    load_id, adapters = _upstream(g, nid, "model", "LoadModel", where)
    lp = g.nodes[load_id]["params"]
    model = _model_of(lp, recipe_dir, g.label(load_id))
    fam = model.family
    notes = list(model.notes)
    inject = [a for a in adapters if g.nodes[a]["type"] in ADAPTER_NODES]
    ip = g.nodes[inject[0]]["params"] if inject else None
    # data: bucket size and batch; what the Cache node holds
    bucket_id, passed = _upstream(g, nid, "buckets", "Bucketer", where)
    bp = g.nodes[bucket_id]["params"]
    cache = next((g.nodes[p]["params"] for p in passed if g.nodes[p]["type"] == "Cache"), None)
    opt_id = g.source(nid, "optimizer")
    op = g.nodes[opt_id]["params"] if opt_id and g.nodes[opt_id]["type"] == "Optimizer" else {"optimizer": "adamw"}
    if not opt_id:
        notes.append("no Optimizer linked: planned with AdamW")
    width, height = _largest_bucket(bp, fam, g.label(bucket_id))
    batch = int(bp.get("batch_size") or 1)

    import torch  # noqa: F401  (meta builds)

    den = fam.denoiser
    comps, metas = [], {}
    # no node between LoadModel and TrainLoop: a full fine-tune; other nodes there (an Embedding, say)
    # train only what they add
    full_ft = not adapters
    if ip is None and adapters:
        kinds = sorted({g.nodes[a]["type"] for a in adapters})
        notes.append(f"trains what {', '.join(kinds)} adds to the model (small): its state is not counted")
    te_layers = {}
    if ip is not None:
        te_layers["text_encoder"] = ip.get("text_encoder_layers", "none")
        second = ip.get("text_encoder_2_layers", "same")
        te_layers["text_encoder_2"] = te_layers["text_encoder"] if second == "same" else second
    trains_te = (any(v != "none" for v in te_layers.values()) if not full_ft else bool(tp.get("train_text_encoder")))
    trains_te = trains_te or any(g.nodes[a]["type"] not in ADAPTER_NODES for a in adapters)  # embeddings: text on the fly
    chunks = int(str(tp.get("max_tokens", "75"))) // 75
    text_cached = cache is not None and bool(cache.get("cache_text", True)) and not trains_te and chunks == 1
    latents_cached = cache is not None
    dtypes = {den: lp.get("unet_dtype", "fp32"), "vae": lp.get("vae_dtype", "fp32")}
    quant = {den: _q(lp.get("denoiser_quant"))}
    for spec in fam.text_encoders:
        dtypes[spec.name] = lp.get("text_encoder_dtype", "fp32")
        quant[spec.name] = _q(lp.get("text_encoder_quant"))
    keep = tuple(getattr(fam, "quant_keep", ()))
    for comp, kind in model.kinds.items():
        if comp not in model.configs:
            raise PlanError(f"{g.label(load_id)}: no config for the {comp} of {model.source}")
        try:
            meta = _build_meta(kind, model.configs[comp])
        except Exception as e:  # a config a class refuses: say which
            raise PlanError(f"{g.label(load_id)}: the {comp} config of {model.source} cannot be built ({e})") from None
        metas[comp] = meta
        total, linear = _counts(meta, comp, keep)
        if comp in model.header_counts and abs(model.header_counts[comp] - total) > 0.01 * total:
            notes.append(f"the file's {comp} holds {model.header_counts[comp]:,} parameters, the {fam.display_name} "
                         f"config {total:,}: planned with the file's count")
            linear = int(linear * model.header_counts[comp] / max(total, 1))
            total = model.header_counts[comp]
        on = True
        if comp == "vae":
            on = not latents_cached
        elif comp != den:
            on = not text_cached
        comps.append(Component(comp, total, linear, dtypes.get(comp, "fp32"), quant.get(comp), on_device=on))
    if not latents_cached:
        notes.append("no Cache node: the VAE stays on the device to encode every batch")
    if cache is not None and not text_cached:
        notes.append("text encoders stay on the device: "
                     + ("they train" if trains_te else "longer captions are encoded on the fly" if chunks > 1
                        else "the Cache node does not cache text"))
    notes.append("sampling during training brings the VAE and text encoders to the device for a moment")
    denoiser = metas[den]
    dq = quant.get(den)
    if full_ft and dq and tp.get("train_unet", True):
        notes.append(f"a full fine-tune of a {dq} {den} is refused at run time: set LoadModel.denoiser_quant to none")

    # blocks (for swap) and adapters
    blocks = fam.swappable_blocks(denoiser) if hasattr(fam, "swappable_blocks") else []
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    block_linear = sum(m.in_features * m.out_features for b in blocks for m in b.modules()
                       if isinstance(m, torch.nn.Linear))
    swap = int(tp.get("blocks_to_swap") or 0)
    resident = None
    if swap:
        if swap >= len(blocks):
            notes.append(f"blocks_to_swap {swap} is more than the {len(blocks)} blocks the {den} has: all but one swap")
        resident = max(1, len(blocks) - swap)
        if full_ft:
            notes.append("block swap streams frozen weights: a full fine-tune keeps every block on the device")
            resident = None
    tokens_per_sample, text_tokens, tokens_text = _tokens(fam, model, lp, width, height, denoiser)
    train_dtype = str(tp.get("train_dtype", "bf16"))
    ckpt = bool(tp.get("gradient_checkpointing", False))
    adapter_params, adapter_shapes, targets = 0, [], {}
    if not full_ft and ip is not None:
        for comp, preset, custom in _adapter_choices(ip, fam, te_layers):
            if comp not in metas or preset == "none":
                continue
            names = fam.adapter_targets(metas[comp], comp, preset, custom, True)
            targets[comp] = names
            n, shapes = _adapter_size(metas[comp], names, ip)
            adapter_params += n
            adapter_shapes += shapes
    elif full_ft:
        trained = ([den] if tp.get("train_unet", True) else []) + (
            [s.name for s in fam.text_encoders] if tp.get("train_text_encoder") else [])
        adapter_params = sum(c.params for c in comps if c.name in trained)
        adapter_shapes = [tuple(p.shape) for c in trained for p in metas[c].parameters()]
    # activations: the family's measured profile, and the adapted layers' inputs from a meta forward
    from app.ml.models.families.memory import all_profiles, find_profile, signature, width_of

    kind = model.kinds[den]
    sig = signature(kind, dict(denoiser.config))
    match = find_profile(all_profiles(), sig, width_of(kind, dict(denoiser.config)))
    if match is None:
        raise PlanError(f"{where}: no activation profile for a {kind} (tests/bench/measure_coefficients.py measures one)")
    if match.note:
        notes.append(match.note)
    prof = match.profile
    counts = {name: len(getattr(denoiser, name, ()) or ()) for name, _, _ in prof.per_block}
    act_full = prof.per_token(counts, False, train_dtype) * match.scale
    act_ckpt = prof.per_token(counts, True, train_dtype) * match.scale
    inputs = inputs_ckpt = 0.0
    if targets.get(den):
        inputs, inputs_ckpt = adapted_inputs(fam, denoiser, targets[den], width, height, batch, text_tokens,
                                             train_dtype)
    # offloading moves each block's kept input to the host (a UNet's profile has no per-block part: unchanged)
    offloaded = prof.per_token({}, True, train_dtype) * match.scale if prof.per_block else act_ckpt
    optimizer = str(op.get("optimizer", "adamw"))
    from .plan import OPTIMIZER_BYTES

    if optimizer not in OPTIMIZER_BYTES and optimizer != "adafactor":
        notes.append(f"optimizer {optimizer}: its state is planned as AdamW's")
        optimizer = "adamw"
    largest = max((p.numel() for p in denoiser.parameters()), default=0)
    recipe = Recipe(
        components=comps, denoiser=den, blocks=len(blocks), block_params=block_params, block_linear_params=block_linear,
        tokens=tokens_per_sample * batch, adapter_params=adapter_params, adapter_shapes=adapter_shapes,
        optimizer=optimizer, checkpointing=ckpt, offload_activations=bool(tp.get("offload_activations")) and ckpt,
        blocks_resident=resident, largest_linear=_largest_linear(denoiser), compute_dtype=_compute(train_dtype, dtypes[den]),
        act_full=act_full, act_ckpt=act_ckpt, act_ckpt_offloaded=offloaded,
        adapter_inputs=inputs, adapter_inputs_ckpt=inputs_ckpt, adapter_factor=prof.adapter_factor,
        full_finetune=full_ft, trainable_dtype=dtypes[den] if full_ft else "fp32",
        fused_backward=bool(tp.get("fused_backward")) and full_ft, largest_param=largest,
        ema_on_device=bool(tp.get("ema")) and not tp.get("ema_on_cpu", True))
    what = (f"{fam.display_name} from {model.source}; "
            + (f"{ip.get('algorithm', 'lora')} rank {ip.get('rank', 16)}, {adapter_params:,} trainable parameters"
               if ip is not None else f"full fine-tune, {adapter_params:,} trainable parameters" if full_ft
               else "no adapter from LoRAInject"))
    return RecipePlan(nid, where, what, recipe, notes, f"{width}x{height}, batch {batch}: {tokens_text}")


def _q(v) -> str | None:
    v = str(v or "none")
    return None if v == "none" else v


def _compute(train_dtype: str, weight_dtype: str) -> str:
    return "fp32" if train_dtype == "fp32" and weight_dtype == "fp32" else ("bf16" if train_dtype == "bf16" else "fp16")


def _counts(module, comp: str, keep: tuple[str, ...]) -> tuple[int, int]:
    import torch.nn as nn

    total = sum(p.numel() for p in module.parameters())
    linear = sum(m.in_features * m.out_features for n, m in module.named_modules()
                 if isinstance(m, nn.Linear) and not any(fnmatch.fnmatch(f"{comp}.{n}", k) for k in keep))
    return total, linear


def _largest_linear(module) -> int:
    import torch.nn as nn

    return max((m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)


def _largest_bucket(bp: dict, fam, where: str) -> tuple[int, int]:
    from app.ml.data.bucketing import ASPECTS, bucket_sizes
    from app.ml.data.resolution import parse_resolution

    try:
        res = parse_resolution(bp.get("resolution") or "512")
    except ValueError as e:
        raise PlanError(f"{where}: {e}") from None
    if res.fixed is not None:
        return res.fixed
    q = int(bp.get("quantization") or 0) or fam.bucket_quantization
    target = max(res.targets)
    if bp.get("bucketing") == "off" or bp.get("aspects") == "square":
        side = max(q, int(target / q + 0.5) * q)
        return side, side
    sizes = bucket_sizes(target, q, ASPECTS)
    most = max(w * h for w, h in sizes)
    # rounding makes some long buckets a few pixels larger than the square: among those within 2 %
    # of the largest, the squarest (what most images get)
    return min((s for s in sizes if s[0] * s[1] >= 0.98 * most), key=lambda s: (max(s) / min(s), -s[0] * s[1]))


def _tokens(fam, model: _Model, lp: dict, width: int, height: int, denoiser) -> tuple[int, int, str]:
    """(tokens per sample the profile counts, text tokens, a description)."""
    f = fam.vae_scale_factor
    if fam.denoiser == "transformer":
        image = (width // (f * 2)) * (height // (f * 2))
        text = int(lp.get("text_max_length") or 0) or int(getattr(fam, "t5_max_length", 512))
        if model.source == "builtin:tiny-flux":
            from app.ml.flux.tiny import T5_MAX_LENGTH

            text = int(lp.get("text_max_length") or 0) or T5_MAX_LENGTH
        return image + text, text, f"{image} image + {text} text tokens"
    latent = (width // f) * (height // f)
    return latent, 77, f"{width // f}x{height // f} latents"


def _adapter_choices(ip: dict, fam, te_layers: dict) -> list[tuple[str, str, tuple]]:
    def names(text):
        return tuple(t.strip() for t in str(text or "").replace("\n", ",").split(",") if t.strip())

    out = [(fam.denoiser, ip.get("unet_layers", "attn-mlp"), names(ip.get("unet_custom")))]
    for spec in fam.text_encoders:
        preset = te_layers.get(spec.name, "none")
        key = "text_encoder_custom" if spec.name == "text_encoder" or ip.get("text_encoder_2_layers") == "same" \
            else "text_encoder_2_custom"
        out.append((spec.name, preset, names(ip.get(key))))
    return out


def _adapter_size(module, names, ip: dict) -> tuple[int, list[tuple[int, ...]]]:
    """Trainable parameters of the adapter on ``names`` and their shapes (LoRA/LoCon/DoRA: down + up
    (+ DoRA's magnitude); LoHa: two such pairs; LoKr: taken as LoRA's)."""
    import torch.nn as nn

    algo = str(ip.get("algorithm", "lora"))
    rank = int(ip.get("rank") or 16)
    conv_rank = int(ip.get("conv_rank") or 0) or rank
    mods = dict(module.named_modules())
    total, shapes = 0, []
    for n in names:
        m = mods.get(n)
        if isinstance(m, nn.Linear):
            fan_in, out, r = m.in_features, m.out_features, rank
        elif isinstance(m, nn.Conv2d):
            fan_in, out, r = m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels, conv_rank
        else:
            continue
        pairs = 2 if algo == "loha" else 1
        shapes += [(r, fan_in), (out, r)] * pairs
        total += pairs * r * (fan_in + out) + (out if algo == "dora" else 0)
    return total, shapes


def adapted_inputs(fam, denoiser, names, width: int, height: int, batch: int, text_tokens: int,
                   train_dtype: str) -> tuple[float, float]:
    """Bytes of the adapted layers' inputs in one step (each input tensor once) and of the largest
    checkpointed block's alone, from a forward on ``meta`` tensors at the bucket size."""
    import torch

    from app.ml.models.families.memory import DTYPE_BYTES

    size = DTYPE_BYTES.get(train_dtype, 4)
    seen: dict[int, tuple[Any, int, str]] = {}
    mods = dict(denoiser.named_modules())

    def hook(name):
        def record(mod, inp, out):  # returns None: the output stays
            x = inp[0]
            seen.setdefault(id(x), (x, x.numel() * size, name))
        return record

    handles = [mods[n].register_forward_hook(hook(n)) for n in names if n in mods]
    try:
        with torch.no_grad():
            _meta_forward(fam, denoiser, width, height, batch, text_tokens)
    finally:
        for h in handles:
            h.remove()
    total = float(sum(b for _, b, _ in seen.values()))
    per_block: dict[str, float] = {}
    for _, b, name in seen.values():
        per_block[_block_of(name)] = per_block.get(_block_of(name), 0.0) + b
    return total, max(per_block.values(), default=0.0)


def _block_of(name: str) -> str:
    """The checkpointed unit a module belongs to: up to its innermost ``...blocks.N``."""
    m = list(re.finditer(r"(?:^|\.)(?:\w*blocks)\.\d+", name))
    return name[:m[-1].end()] if m else name.rsplit(".", 1)[0]


def _meta_forward(fam, denoiser, width: int, height: int, batch: int, text_tokens: int) -> None:
    import torch

    c = denoiser.config
    f = fam.vae_scale_factor
    with torch.device("meta"):
        if fam.denoiser == "transformer":
            h, w = height // (f * 2), width // (f * 2)
            kw = {"guidance": torch.ones(batch)} if c.guidance_embeds else {}
            denoiser(hidden_states=torch.empty(batch, h * w, c.in_channels), encoder_hidden_states=torch.empty(
                batch, text_tokens, c.joint_attention_dim), pooled_projections=torch.empty(batch, c.pooled_projection_dim),
                timestep=torch.ones(batch), img_ids=torch.empty(h * w, 3), txt_ids=torch.empty(text_tokens, 3), **kw)
            return
        kw = {}
        if c.addition_embed_type == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, c.projection_class_embeddings_input_dim
                                                                  - 6 * c.addition_time_embed_dim),
                                       "time_ids": torch.empty(batch, 6)}
        denoiser(torch.empty(batch, c.in_channels, height // f, width // f), torch.ones(batch, dtype=torch.long),
                 encoder_hidden_states=torch.empty(batch, 77, c.cross_attention_dim), **kw)


def plan_file(path: str | Path, registry=None) -> list[RecipePlan]:
    """Plans for a recipe file (its relative paths resolve against its folder)."""
    from app.graph.recipe import load_recipe

    graph, _ = load_recipe(path, registry)
    return plan_graph(graph, registry, Path(path).resolve().parent)


__all__ = ["PlanError", "RecipePlan", "adapted_inputs", "parse_size", "plan_file", "plan_graph", "safetensors_shapes",
           "WEIGHT_BYTES"]


def measured_vs_predicted(recipe: dict, recipe_dir, node_id: str, peak_bytes: int | None, peak_kind: str = "") -> str:
    """TrainLoop's closing line: the run's measured peak next to the plan's prediction. On a CPU the
    measure is the resident size's growth over the loaded process (weights and adapter already
    there), so the prediction it is set against leaves those out too."""
    from app.graph.recipe import parse_recipe
    from app.graph.registry import load_registry

    why = "the recipe has no plan for this node"
    plans: list[RecipePlan] = []
    try:
        registry = load_registry()
        graph, _ = parse_recipe(copy.deepcopy(recipe or {}), registry=registry)
        plans = [p for p in plan_graph(graph, registry, recipe_dir) if p.node == node_id]
    except Exception as e:  # a closing log line never fails a finished run
        why = str(e)
    if not plans:
        measured = f"measured {gb(peak_bytes)} ({peak_kind})" if peak_bytes is not None else "not measured here"
        return f"peak device memory: {measured}; no prediction ({why})"
    plan = plans[0].plan
    predicted, scope = plan.peak, ""
    if peak_bytes is not None and "RSS" in peak_kind:
        predicted = sum(v for k, v in plan.parts.items()
                        if not k.startswith(("weights ", "adapter weights", "block swap")))
        scope = " beyond the loaded weights"
    if peak_bytes is None:
        return f"peak device memory: not measured on this device; predicted {gb(predicted)}"
    error = (predicted - peak_bytes) / peak_bytes if peak_bytes else 0.0
    # a tiny model's run is mostly one-time costs (imports' caches, the sampler, data loading) that the
    # plan of a training step does not cover: a percentage there would only mislead
    small = "RSS" in peak_kind and peak_bytes < COMPARABLE_BYTES
    versus = "too small to compare: one-time costs dominate" if small else f"{error:+.0%}"
    return (f"peak device memory: measured {gb(peak_bytes)} ({peak_kind}), predicted {gb(predicted)}{scope} "
            f"({versus}); the whole plan {gb(plan.peak)}")


def main(argv=None) -> int:
    """``python -m app.ml.memory.recipe_plan [--recipe-dir DIR] [--fit SIZE] < recipe.json``: the plans
    as one JSON line ({"plans": [...]} or {"error": ...}); the editor runs it off its UI thread."""
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m app.ml.memory.recipe_plan")
    ap.add_argument("--recipe-dir")
    ap.add_argument("--fit")
    args = ap.parse_args(argv)
    try:
        from app.graph.recipe import parse_recipe
        from app.graph.registry import load_registry

        target = parse_size(args.fit) if args.fit else None
        registry = load_registry()
        graph, _ = parse_recipe(json.loads(sys.stdin.read()), registry=registry)
        out = {"plans": [p.to_dict(target) for p in plan_graph(graph, registry, args.recipe_dir)]}
    except (PlanError, ValueError) as e:
        out = {"error": str(e)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
