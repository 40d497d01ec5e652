"""Predicted peak device memory of a training recipe, broken down, and the cheapest changes that fit it.

The prediction is data, not a table per GPU:

* weights: parameter counts per component (counted from the model, or from its config built on the
  ``meta`` device, so nothing loads), the Linear share of each (what quantization can shrink) and
  the bytes per weight of each storage format, scales included;
* adapter parameters, their gradients and the optimizer state per optimizer;
* activations: bytes saved for backward per token per block, *measured* by running one block
  (``activation_coefficient``: tiny models, or full-width blocks of a reduced-depth model) - so a
  family's coefficient is data its module can carry - times the tokens of the largest bucket and
  batch; with checkpointing only each block's input is kept, plus one block's full activations
  during its recompute;
* transients: the largest layer's extra bytes per weight while it runs (a quantized layer is
  dequantized whole), measured per device and format by ``measure_transient``; and, for a whole
  step, ``step_coefficient`` measures the peak growth per token (saved activations plus the
  transients of backward), which is what the benchmark's prediction uses;
* savings: block swap keeps ``resident + prefetch`` blocks on the device; activation offload moves
  the checkpointed inputs to the host.

``fit(recipe, target_bytes)`` searches the changes (quantize the denoiser, checkpointing, activation
offload, an 8-bit optimizer, block swap) for the cheapest combination predicted to fit.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn as nn

GB = 1e9

# Bytes per stored weight, scales included (see quant.py): fp8 one float32 scale per 128 weights,
# int8 one per row (taken as per 3072 columns), nf4 one float32 absmax per 64 weights.
WEIGHT_BYTES = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0 + 4 / 128, "int8": 1.0 + 4 / 3072,
                "nf4": 0.5 + 4 / 64}
QUANTIZED = ("fp8", "int8", "nf4")

# Optimizer state per trainable parameter (fp32 params): AdamW two fp32 moments; bitsandbytes'
# 8-bit AdamW two uint8 moments + one float32 absmax per 2048; Lion one moment; SGD momentum one.
# Adafactor is computed from the shapes (factored second moment: rows + columns per matrix).
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8 / 2048, "lion": 4.0, "lion8bit": 1.0 + 4 / 2048,
                   "sgd_nesterov": 4.0, "prodigy": 16.0, "dadapt_adam": 12.0}


@dataclass
class Component:
    name: str
    params: int             # all parameters
    linear_params: int      # of which Linear weights (what quantization shrinks)
    dtype: str = "bf16"     # storage of the non-quantized weights
    quant: str | None = None  # fp8 / int8 / nf4 for the Linear weights
    on_device: bool = True  # False: kept in RAM (cached latents / text), visits the device only to encode

    def weight_bytes(self) -> float:
        lin = WEIGHT_BYTES[self.quant] if self.quant else WEIGHT_BYTES[self.dtype]
        return self.linear_params * lin + (self.params - self.linear_params) * WEIGHT_BYTES[self.dtype]


@dataclass
class Recipe:
    components: list[Component]
    denoiser: str = "transformer"
    blocks: int = 0                  # swappable blocks of the denoiser
    block_params: int = 0            # parameters in those blocks (all of them together)
    block_linear_params: int = 0
    act_per_token: float = 0.0       # bytes saved for backward, per token per block, without checkpointing
    ckpt_per_token: float = 0.0      # with checkpointing (the block input)
    tokens: int = 0                  # tokens (or latent pixels) of the largest bucket x batch
    adapter_params: int = 0
    adapter_shapes: list[tuple[int, ...]] = field(default_factory=list)  # for Adafactor
    optimizer: str = "adamw"
    checkpointing: bool = False
    offload_activations: bool = False
    blocks_resident: int | None = None  # block swap: None = all resident
    prefetch: int = 1
    overhead: float = 0.0            # fixed bytes (CUDA context, workspace) measured per device
    largest_linear: int = 0          # weights of the largest Linear: a quantized one is dequantized whole to run
    compute_dtype: str = "bf16"
    transient_per_weight: float | None = None  # measured (measure_transient) bytes per weight of the largest
                                               # layer's forward+backward; None: the dequantized copy only
    # activations from a measured profile (app/ml/models/families/memory.py): bytes per token of the
    # whole denoiser's step without / with checkpointing / with checkpointed inputs offloaded; when
    # act_full is set these replace act_per_token x blocks
    act_full: float | None = None
    act_ckpt: float = 0.0
    act_ckpt_offloaded: float = 0.0
    adapter_inputs: float = 0.0       # bytes of the adapted layers' inputs in one step (batch included)
    adapter_inputs_ckpt: float = 0.0  # the same for the largest checkpointed block alone
    adapter_factor: float = 1.0       # measured step bytes per byte of those inputs
    # full fine-tune: the trained weights are the component's own (counted under weights); gradients
    # and optimizer state in their dtype; fused backward keeps only the largest gradient
    full_finetune: bool = False
    trainable_dtype: str = "fp32"
    fused_backward: bool = False
    largest_param: int = 0
    ema_on_device: bool = False


@dataclass
class Plan:
    parts: dict[str, float]
    changes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.parts.values())

    def summary(self) -> str:
        rows = [f"  {k:<28} {v / GB:8.3f} GB" for k, v in self.parts.items() if v]
        head = " + ".join(self.changes) + " -> " if self.changes else ""
        return f"{head}{self.peak / GB:.2f} GB\n" + "\n".join(rows)


def _optimizer_bytes(recipe: Recipe) -> float:
    if recipe.optimizer == "adafactor":
        if not recipe.adapter_shapes:
            return 4.0 * recipe.adapter_params  # no shapes known: as if unfactored
        total = 0
        for s in recipe.adapter_shapes:
            total += (s[0] + int(torch.tensor(s[1:]).prod())) if len(s) >= 2 else s[0]
        return 4.0 * total
    if recipe.optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"memory plan: unknown optimizer {recipe.optimizer!r}; choose one of "
                         f"{', '.join(list(OPTIMIZER_BYTES) + ['adafactor'])}")
    return OPTIMIZER_BYTES[recipe.optimizer] * recipe.adapter_params


def predict(recipe: Recipe) -> Plan:
    """The predicted peak, broken down (bytes)."""
    parts: dict[str, float] = {}
    swap_saving = 0.0
    for c in recipe.components:
        if not c.on_device:
            continue
        parts[f"weights {c.name} ({c.quant or c.dtype})"] = c.weight_bytes()
        if c.name == recipe.denoiser and recipe.blocks and recipe.blocks_resident is not None:
            on = min(recipe.blocks, recipe.blocks_resident + recipe.prefetch)
            per_block = Component("b", recipe.block_params, recipe.block_linear_params, c.dtype, c.quant).weight_bytes()
            swap_saving = per_block * (recipe.blocks - on) / recipe.blocks
    den = next((c for c in recipe.components if c.name == recipe.denoiser and c.on_device), None)
    if recipe.transient_per_weight is not None:
        parts["largest layer (transient)"] = recipe.largest_linear * recipe.transient_per_weight
    elif den is not None and den.quant:
        parts["dequantized layer (transient)"] = recipe.largest_linear * WEIGHT_BYTES[recipe.compute_dtype]
    if swap_saving:
        parts["block swap (weights in RAM)"] = -swap_saving
    if recipe.full_finetune:
        size = WEIGHT_BYTES[recipe.trainable_dtype]
        grads = recipe.largest_param if recipe.fused_backward else recipe.adapter_params
        parts[f"gradients ({recipe.trainable_dtype}{', fused backward' if recipe.fused_backward else ''})"] = size * grads
        scale = 1.0 if recipe.optimizer.endswith("8bit") else size / 4.0  # torch keeps moments in the weights' dtype
        parts[f"optimizer state ({recipe.optimizer})"] = _optimizer_bytes(recipe) * scale
        if recipe.ema_on_device:
            parts["EMA copy"] = size * recipe.adapter_params
    else:
        parts["adapter weights (fp32)"] = 4.0 * recipe.adapter_params
        parts["adapter gradients (fp32)"] = 4.0 * recipe.adapter_params
        parts[f"optimizer state ({recipe.optimizer})"] = _optimizer_bytes(recipe)
    if recipe.act_full is not None:
        if not recipe.checkpointing:
            per_token, label, adapter = recipe.act_full, "activations", recipe.adapter_inputs
        elif recipe.offload_activations:
            per_token, label = recipe.act_ckpt_offloaded, "activations (checkpointed, inputs offloaded)"
            adapter = recipe.adapter_inputs_ckpt
        else:
            per_token, label, adapter = recipe.act_ckpt, "activations (checkpointed)", recipe.adapter_inputs_ckpt
        parts[label] = per_token * recipe.tokens
        if adapter:
            parts["activations (adapted layers' inputs)"] = adapter * recipe.adapter_factor
        parts["fixed overhead"] = recipe.overhead
        return Plan(parts)
    full = recipe.act_per_token * recipe.tokens  # one block's saved activations
    if recipe.checkpointing:
        kept = 0.0 if recipe.offload_activations else recipe.ckpt_per_token * recipe.tokens * recipe.blocks
        parts["activations (checkpointed inputs)"] = kept
        parts["activations (one block recomputed)"] = full
    else:
        parts["activations"] = full * recipe.blocks
    parts["fixed overhead"] = recipe.overhead
    return Plan(parts)


# -- the search ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Option:
    label: str
    cost: float  # rough slowdown / quality cost: lower is preferred
    apply: Callable[[Recipe], Recipe]


def _options(recipe: Recipe) -> list[list[_Option]]:
    den = recipe.denoiser
    quant = [_Option("", 0, lambda r: r)]
    for fmt, cost in (("fp8", 2.0), ("int8", 2.5), ("nf4", 3.0)):
        quant.append(_Option(f"{fmt} {den}", cost, lambda r, f=fmt: replace(
            r, components=[replace(c, quant=f) if c.name == den else c for c in r.components])))
    held = [c.quant for c in recipe.components if c.name == den and c.quant]
    if held:  # already quantized: only smaller formats are changes
        order = ("fp8", "int8", "nf4")
        quant = quant[:1] + [o for o in quant[1:] if order.index(o.label.split()[0]) > order.index(held[0])]
    ckpt = [_Option("", 0, lambda r: r), _Option("gradient checkpointing", 1.0, lambda r: replace(r, checkpointing=True)),
            _Option("gradient checkpointing + activation offload", 2.0,
                    lambda r: replace(r, checkpointing=True, offload_activations=True))]
    opt = [_Option("", 0, lambda r: r)]
    eight = {"adamw": "adamw8bit", "lion": "lion8bit"}.get(recipe.optimizer)
    if eight:
        opt.append(_Option(f"{eight}", 0.5, lambda r, e=eight: replace(r, optimizer=e)))
    swap = [_Option("", 0, lambda r: r)]
    if recipe.blocks > 1:  # every swapped block crosses the bus twice a step: swapping most of them costs most
        for keep in range(recipe.blocks - 1, 0, -1):
            swap.append(_Option(f"block swap {recipe.blocks - keep}", 1.0 + 8.0 * (recipe.blocks - keep) / recipe.blocks,
                                lambda r, k=keep: replace(r, blocks_resident=k)))
    if recipe.checkpointing:  # on already: not a change; offloading its inputs is
        ckpt = ckpt[:1] + ([] if recipe.offload_activations else [
            _Option("activation offload", 1.0, lambda r: replace(r, offload_activations=True))])
    if recipe.blocks_resident is not None:
        swap = swap[:1]
    if recipe.full_finetune:  # block swap streams frozen weights only; quantized weights cannot train
        quant, swap = quant[:1], swap[:1]
    return [quant, ckpt, opt, swap]


def fit(recipe: Recipe, target_bytes: float) -> Plan | None:
    """The cheapest combination of changes predicted to fit ``target_bytes`` (its plan lists the
    changes, e.g. ``nf4 transformer + block swap 8``), the unchanged plan if it fits already, or
    None if nothing does."""
    plan = predict(recipe)
    if plan.peak <= target_bytes:
        return plan
    best = None
    for combo in itertools.product(*_options(recipe)):
        r = recipe
        for o in combo:
            r = o.apply(r)
        p = predict(r)
        if p.peak > target_bytes:
            continue
        key = (sum(o.cost for o in combo), p.peak)
        if best is None or key < best[0]:
            best = (key, p, [o.label for o in combo if o.label], r)
    if best is None:
        return None
    _, p, labels, r = best
    p.changes = labels
    return p


# -- data from models -----------------------------------------------------------------------
def largest_linear(module: nn.Module) -> int:
    """Weights of the largest Linear layer (quantized ones included)."""
    return max((m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear)), default=0)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(all parameters, Linear weights) of ``module`` - works on ``meta`` modules built from configs,
    and counts the weights of quantized layers (stored outside ``parameters()``) as what they were."""
    from .quant import QuantizedLinear

    quantized = [m for m in module.modules() if isinstance(m, QuantizedLinear)]
    total = sum(p.numel() for p in module.parameters()) + sum(m.in_features * m.out_features for m in quantized)
    linear = sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))
    return total, linear


def saved_bytes(fn: Callable[[], torch.Tensor], exclude: nn.Module | None = None) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (each storage counted once; the
    parameters and buffers of ``exclude`` - the weights - are not activations)."""
    seen: dict[int, int] = {}
    skip = set()
    if exclude is not None:
        skip = {t.untyped_storage().data_ptr() for t in list(exclude.parameters()) + list(exclude.buffers())}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr != 0 and ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def activation_coefficient(run_block: Callable[[int], torch.Tensor], tokens: tuple[int, int] = (64, 128),
                           exclude: nn.Module | None = None) -> float:
    """Bytes saved per token by one block, measured at two token counts (the slope, so per-call
    constants drop out). ``run_block(n)`` runs the block's forward on ``n`` tokens with grad on."""
    a, b = tokens
    return (saved_bytes(lambda: run_block(b), exclude) - saved_bytes(lambda: run_block(a), exclude)) / (b - a)


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_growth(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak memory growth while ``fn`` runs: on CUDA ``max_memory_allocated``, on CPU the resident
    size sampled every half millisecond (freed heap is returned to the system first)."""
    import ctypes
    import gc
    import threading
    import time

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    base = peak = _rss()
    done = False

    def sample():
        nonlocal peak
        while not done:
            peak = max(peak, _rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done = True
        t.join()
    return max(0, max(peak, _rss()) - base)


def step_coefficient(run_step: Callable[[int], object], tokens: tuple[int, int], device: str = "cpu") -> float:
    """Bytes per token a forward + backward needs at its peak (saved activations and the transients
    of backward), measured as the slope of ``peak_growth`` between two token counts."""
    a, b = tokens
    run_step(a)  # once, so one-time costs are not counted
    return (peak_growth(lambda: run_step(b), device) - peak_growth(lambda: run_step(a), device)) / (b - a)


def measure_transient(fmt: str | None, dtype: torch.dtype = torch.bfloat16, shape: tuple[int, int] = (3072, 12288),
                      tokens: int = 16, device: str = "cpu") -> float:
    """Bytes per weight a Linear layer of ``shape`` in ``fmt`` (None: plain) needs beyond its stored
    weights while it runs forward and backward (dequantized copies, packed operands), measured."""
    from .quant import QuantizedLinear

    with torch.no_grad():
        lin = nn.Linear(shape[1], shape[0], bias=False, device=device, dtype=dtype).requires_grad_(False)
        layer = QuantizedLinear(lin, fmt) if fmt else lin
    del lin
    x = torch.randn(tokens, shape[1], dtype=dtype, device=device, requires_grad=True)

    def run():
        layer(x).float().sum().backward()
        x.grad = None

    run()  # once, so one-time costs are not counted
    return peak_growth(run, device) / (shape[0] * shape[1])
