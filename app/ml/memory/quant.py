"""Frozen Linear layers stored quantized and upcast per layer for compute (QLoRA / "fp8_base").

Formats (bytes per weight, plus scales):

* ``fp8``: ``float8_e4m3fn`` with a per-tensor scale (``block_size=0``) or one scale per
  ``block_size`` input columns of each row (default 128). Pure torch, as kohya/musubi's fp8_base.
* ``int8``: bitsandbytes' row-wise absmax int8 (LLM.int8 weights), one float32 scale per row.
* ``nf4``: bitsandbytes' 4-bit NormalFloat, one absmax per 64 weights.

A ``QuantizedLinear`` is an ``nn.Linear`` to the rest of the project (adapter targeting and the
adapter modules read ``in_features``/``out_features``), its ``weight`` is the dequantized weight,
read-only. The forward dequantizes inside a custom autograd function and dequantizes again in
backward, so no full-precision copy of the weight is kept between forward and backward. Moving the
layer (``.to(device)``) moves the packed storage; casting it (``.to(torch.bfloat16)``) casts only the
bias - the packed weights keep their format. Gradients never reach the base weights: full
fine-tuning of a quantized layer is refused by ``require_trainable``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

FORMATS = ("fp8", "int8", "nf4")
CHOICES = ("none",) + FORMATS  # LoadModel's denoiser_quant / text_encoder_quant
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class QuantError(ValueError):
    """A quantization request that cannot be met; the message says what to change."""


def _bnb(fmt: str, where: str):
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        raise QuantError(f"{where}: {fmt} weights need bitsandbytes (pip install 'bitsandbytes>=0.49'); "
                         "or choose fp8, which is pure torch") from None
    return bf


class _DequantLinear(torch.autograd.Function):
    """y = x W^T + b with W dequantized in forward and again in backward (never saved)."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        ctx.has_bias = bias is not None
        w = layer.dequantize(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ ctx.layer.dequantize(grad.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, grad_b, None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored as fp8 / int8 / nf4 (see the module docstring)."""

    def __init__(self, linear: nn.Linear, fmt: str, *, block_size: int | None = None, where: str = "Quantize"):
        nn.Module.__init__(self)  # not nn.Linear.__init__: no full-precision weight is allocated
        if fmt not in FORMATS:
            raise QuantError(f"{where}: unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fmt = fmt
        w = linear.weight.detach()
        self.orig_dtype = w.dtype
        self._q: dict[str, torch.Tensor] = {}
        self._state = None  # nf4: bitsandbytes' QuantState (absmax, code, shape)
        if fmt == "fp8":
            self.block_size = 128 if block_size is None else int(block_size)
            self._quantize_fp8(w.float())
        elif fmt == "int8":
            self.block_size = self.in_features
            bf = _bnb(fmt, where)
            q, scale, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
            self._q = {"q": q, "scale": scale.float()}
        else:
            self.block_size = 64 if block_size is None else int(block_size)
            bf = _bnb(fmt, where)
            q, state = bf.quantize_4bit(w.to(torch.bfloat16).contiguous(), blocksize=self.block_size, quant_type="nf4")
            self._q = {"q": q}
            self._state = state
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _quantize_fp8(self, w: torch.Tensor) -> None:
        out, inp = w.shape
        b = self.block_size
        if b and inp % b == 0 and b < inp:
            blocks = w.reshape(out, inp // b, b)
            scale = blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / FP8_MAX
            q = (blocks / scale).to(torch.float8_e4m3fn).reshape(out, inp)
            scale = scale.squeeze(2)
        else:  # per tensor: one scale (block_size 0, or rows that do not split into blocks)
            self.block_size = 0
            scale = (w.abs().amax().clamp(min=1e-12) / FP8_MAX).reshape(())
            q = (w / scale).to(torch.float8_e4m3fn)
        self._q = {"q": q, "scale": scale.float()}

    # -- reading the weight ------------------------------------------------------------------
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight in ``dtype`` (default: the dtype it was quantized from), a new tensor."""
        dtype = dtype or self.orig_dtype
        q = self._q["q"]
        if self.fmt == "fp8":
            # one full-size temporary: upcast (exact: e4m3 fits bf16's mantissa) and scale in place
            # in the compute dtype; fp16 would underflow small scales, so it goes through fp32
            work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
            s = self._q["scale"].to(work)
            w = q.to(work)
            if s.dim() == 0:
                w.mul_(s)
            else:
                w.view(q.shape[0], s.shape[1], -1).mul_(s.unsqueeze(2))
            return w.to(dtype)
        bf = _bnb(self.fmt, "Quantize")
        if self.fmt == "int8":
            return (q.to(torch.float32) * (self._q["scale"].unsqueeze(1) / 127.0)).to(dtype)
        return bf.dequantize_4bit(q, self._state).to(dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantLinear.apply(x, self.bias, self)

    # -- storage -----------------------------------------------------------------------------
    def storage(self) -> list[torch.Tensor]:
        """Every tensor the quantized weight is stored in (packed values and scales)."""
        out = list(self._q.values())
        if self._state is not None:
            out += [t for t in (self._state.absmax, self._state.code) if torch.is_tensor(t)]
        return out

    def stored_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.storage())
        if self.bias is not None:
            n += self.bias.numel() * self.bias.element_size()
        return n

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A state dict like the plain layer's (``weight`` dequantized in its original dtype, ``bias``): a
        quantized model saves, hashes and merges as a plain one, with the rounding of its format baked in."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.dequantize()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """A ``weight`` given in full precision is quantized again in this layer's format and block size."""
        key = prefix + "weight"
        if key in state_dict:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the "
                                  f"quantized layer holds {(self.out_features, self.in_features)}")
            else:
                device = self._q["q"].device
                plain = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
                plain.weight = nn.Parameter(w.detach().to(self.orig_dtype), requires_grad=False)
                fresh = QuantizedLinear(plain, self.fmt, block_size=self.block_size)
                self._q, self._state = fresh._q, fresh._state
                self.to(device)
        elif strict:
            missing_keys.append(key)
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # the bias: moved and cast as the caller asks
        device = fn(torch.empty(0, device=self._q["q"].device)).device  # where the caller moves things
        if device != self._q["q"].device:
            self._q = {k: v.to(device, non_blocking=True) for k, v in self._q.items()}
            if self._state is not None:
                self._state.to(device)  # bitsandbytes moves its QuantState in place
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}, block_size={self.block_size}")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: nn.Module) -> int:
    """Bytes of every stored tensor of ``module``: parameters, buffers and quantized storage."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in module.modules():
        if isinstance(m, QuantizedLinear):
            total += tensor_bytes(m.storage())
    return total


@dataclass
class QuantReport:
    fmt: str
    layers: list[str] = field(default_factory=list)
    bytes_before: int = 0  # of the replaced layers (weight + bias), as they were
    bytes_after: int = 0   # of the same layers, quantized
    kept: list[str] = field(default_factory=list)  # Linear layers left in full precision on purpose

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def summary(self) -> str:
        kept = f"; kept in full precision: {_shown(self.kept)}" if self.kept else ""
        return (f"{self.fmt}: {len(self.layers)} Linear layers, {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB ({self.ratio:.2f}){kept}")


def _shown(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def _matcher(include, exclude) -> Callable[[str], bool]:
    def as_list(p):
        return [p] if isinstance(p, str) else list(p or [])

    if callable(include):
        return lambda name: include(name) and not any(fnmatch.fnmatch(name, e) for e in as_list(exclude))
    inc, exc = as_list(include), as_list(exclude)
    return lambda name: ((not inc or any(fnmatch.fnmatch(name, p) for p in inc))
                         and not any(fnmatch.fnmatch(name, e) for e in exc))


def quantize_linears(module: nn.Module, fmt: str, *, include=None, exclude=None, block_size: int | None = None,
                     min_features: int = 0, where: str = "Quantize") -> QuantReport:
    """Replace, in place, the ``nn.Linear`` layers of ``module`` whose qualified name matches
    ``include`` (fnmatch patterns, or a callable; default all) and not ``exclude`` by frozen
    ``QuantizedLinear`` layers in ``fmt``. Layers with fewer than ``min_features`` inputs stay as
    they are (tiny projections gain nothing). Quantize before attaching adapters: hooks on a
    replaced layer are not carried over. Returns what was replaced and the bytes before/after."""
    if fmt not in FORMATS:
        raise QuantError(f"{where}: unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    match = _matcher(include, exclude)
    report = QuantReport(fmt)
    targets = [(name, m) for name, m in module.named_modules()
               if type(m) is nn.Linear and match(name) and m.in_features >= min_features]
    for name, lin in targets:
        before = tensor_bytes([lin.weight] + ([lin.bias] if lin.bias is not None else []))
        q = QuantizedLinear(lin, fmt, block_size=block_size, where=where)
        q.to(lin.weight.device)
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, q)
        report.layers.append(name)
        report.bytes_before += before
        report.bytes_after += q.stored_bytes()
    return report


def quantize_component(module: nn.Module, fmt: str, component: str, *, keep: Iterable[str] = (),
                       block_size: int | None = None, where: str = "LoadModel") -> QuantReport:
    """Quantize the Linear layers of one model component (``component``: its name in the bundle,
    "unet", "transformer", "text_encoder", ...) except those matching ``keep``, fnmatch patterns on
    ``"<component>.<module name>"`` (a family's ``quant_keep``: embedders and input/output projections)."""
    keep = tuple(keep)

    def kept(name: str) -> bool:
        return any(fnmatch.fnmatch(f"{component}.{name}", p) for p in keep)

    report = quantize_linears(module, fmt, include=lambda name: not kept(name), block_size=block_size, where=where)
    report.kept = [n for n, m in module.named_modules() if type(m) is nn.Linear and kept(n)]
    return report


def require_trainable(module: nn.Module, where: str = "TrainLoop", what: str = "") -> None:
    """Refuse a full fine-tune of a model with quantized layers (their weights cannot learn)."""
    names = [n for n, m in module.named_modules() if isinstance(m, QuantizedLinear)]
    if names:
        fmt = next(m for m in module.modules() if isinstance(m, QuantizedLinear)).fmt
        raise QuantError(f"{where}: {what + ' has ' if what else ''}{len(names)} layers (e.g. {names[0]}) holding "
                         f"quantized ({fmt}) frozen weights, which a full fine-tune cannot train; set LoadModel's "
                         "denoiser_quant / text_encoder_quant to none for the parts you fine-tune, or train an adapter "
                         "(LoRAInject before TrainLoop: QLoRA) on top of the quantized model")
