"""Adapter layers: LoRA/LoCon, LoHa, LoKr and DoRA, each owning only its own small weights.

An adapter module never holds or changes the base layer; it is handed the base layer, its input
and its output when the base layer runs (see ``attach.py``) and returns the adapted output. Its
parameter names are the LyCORIS/kohya tensor names (``lora_down``/``lora_up``, ``hada_w1_a``,
``lokr_w1``, ``dora_scale``), so saving is a rename of the prefix only.

Shapes follow LyCORIS so files round-trip with it and ComfyUI:

* LoRA linear: ``lora_down`` (r, in), ``lora_up`` (out, r); conv: ``lora_down`` (r, in, kh, kw)
  with the base layer's stride/padding, ``lora_up`` (out, r, 1, 1).
* LoHa: ``hada_w{1,2}_a`` (out, r), ``hada_w{1,2}_b`` (r, in*kh*kw); delta = (w1a w1b) * (w2a w2b).
* LoKr: ``lokr_w1`` (out_l, in_m) and ``lokr_w2`` (out_k, in_n[, kh, kw]) or its factors
  ``lokr_w2_a`` (out_k, r) / ``lokr_w2_b`` (r, in_n*kh*kw); delta = kron(w1, w2). As in LyCORIS
  and ComfyUI, alpha/rank applies only when ``w2`` is factorised; a full ``w2`` uses scale 1.
* DoRA (``dora_scale``, shape (1, in[, 1, 1])): W' = m * (W + dW) / ||W + dW||, the norm taken per
  input channel over the output axis (LyCORIS ``wd_on_out=False``), the magnitude starting at ||W||.
  That is the one form ComfyUI, A1111 and LyCORIS all compute as we train it: for an output-axis
  ``dora_scale`` (out, 1) ComfyUI divides by the norm of the original W instead. Files with an
  output-axis scale (ours before, LyCORIS ``wd_on_out=True``) still load and keep LyCORIS' form.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _dims(base: nn.Module) -> tuple[int, int, tuple[int, ...]]:
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, ()
    if isinstance(base, nn.Conv2d):
        return base.in_channels, base.out_channels, tuple(base.kernel_size)
    raise TypeError(f"cannot adapt {type(base).__name__}")


def _input_axis_norm(w: torch.Tensor) -> torch.Tensor:
    """||W[:, j]|| per input channel j (conv: over out, kh, kw), shaped (1, in[, 1, 1]) like LyCORIS' dora_scale."""
    return w.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(1, w.shape[1], *[1] * (w.dim() - 2))


def _conv_kwargs(base: nn.Conv2d) -> dict:
    return dict(stride=base.stride, padding=base.padding, dilation=base.dilation, groups=base.groups)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into (m, n), m <= n, m*n = dimension; m is ``factor`` if it divides, else
    the divisor closest to sqrt (LyCORIS' rule, so our LoKr shapes match theirs)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
        length = m + n
    return (m, n) if m <= n else (n, m)


class AdapterModule(nn.Module):
    """Common part: scale, dropouts, DoRA and the weight-delta forward path."""

    kind = "base"

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, dora: bool = False,
                 dropout: float = 0.0, rank_dropout: float = 0.0, module_dropout: float = 0.0):
        super().__init__()
        self.in_dim, self.out_dim, self.kernel = _dims(base)
        self.is_conv = isinstance(base, nn.Conv2d)
        self.rank = int(rank)
        self.dropout = float(dropout)
        self.rank_dropout = float(rank_dropout)
        self.module_dropout = float(module_dropout)
        # The real alpha, stored so it is saved as ``.alpha`` and restored on load.
        self.register_buffer("alpha", torch.tensor(float(alpha)), persistent=True)
        self._scale = float(alpha) / self.rank  # a Python float: reading the buffer would sync a GPU per call
        if dora:
            w = base.weight.detach().float()
            self.dora_scale = nn.Parameter(_input_axis_norm(w).clone())
        else:
            self.dora_scale = None

    @property
    def scale(self) -> float:
        return self._scale

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._scale = float(self.alpha) / self.rank  # a loaded file may carry another alpha

    def delta_weight(self) -> torch.Tensor:
        """dW with the base weight's shape (scale included), in the adapter's dtype."""
        raise NotImplementedError

    def _weight_shape(self) -> tuple[int, ...]:
        return (self.out_dim, self.in_dim, *self.kernel)

    def _skip(self) -> bool:
        return self.training and self.module_dropout > 0 and torch.rand(()) < self.module_dropout

    def _row_dropout(self, delta: torch.Tensor) -> torch.Tensor:
        """LoHa/LoKr dropout: drop whole output rows of dW while training (rescaled)."""
        p = max(self.dropout, self.rank_dropout)
        if not self.training or p <= 0:
            return delta
        keep = (torch.rand(delta.shape[0], device=delta.device) >= p).to(delta.dtype) / (1 - p)
        return delta * keep.reshape(-1, *[1] * (delta.dim() - 1))

    def _functional(self, base: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        bias = base.bias
        if self.is_conv:
            return F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), **_conv_kwargs(base))
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merged_weight(self, base: nn.Module, strength: float = 1.0) -> torch.Tensor:
        """The base weight with this adapter applied at ``strength`` (a new tensor; base untouched)."""
        w = base.weight.detach()
        delta = self.delta_weight().to(torch.float32)
        if self.dora_scale is None:
            return (w.float() + strength * delta).to(w.dtype)
        dora = self._dora_weight(w.float(), delta)
        return (w.float() + strength * (dora - w.float())).to(w.dtype)

    def _dora_weight(self, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        wc = w + delta
        if self.dora_scale.shape[0] == self.out_dim and self.out_dim != 1:  # an output-axis file (ComfyUI's test)
            norm = wc.reshape(wc.shape[0], -1).norm(dim=1).reshape(self.dora_scale.shape)
        else:
            norm = _input_axis_norm(wc)
        return wc * (self.dora_scale.float() / (norm + torch.finfo(torch.float32).eps))

    def forward(self, base: nn.Module, x: torch.Tensor, base_out: torch.Tensor, strength: float) -> torch.Tensor:
        if strength == 0 or self._skip():
            return base_out
        if self.dora_scale is not None:
            w = base.weight.float()
            new = self._functional(base, x, self._dora_weight(w, self._row_dropout(self.delta_weight().float())))
            return base_out + strength * (new - base_out)
        delta = self._row_dropout(self.delta_weight())
        if self.is_conv:
            extra = F.conv2d(x, delta.to(x.dtype), None, **_conv_kwargs(base))
        else:
            extra = F.linear(x, delta.to(x.dtype))
        return base_out + strength * extra


class LoRAModule(AdapterModule):
    """LoRA / LoCon: dW = up @ down * alpha/rank; runs on activations (no full-size delta)."""

    kind = "lora"

    def __init__(self, base: nn.Module, rank: int, alpha: float, **kw):
        super().__init__(base, rank, alpha, **kw)
        if self.is_conv:
            self.lora_down = nn.Conv2d(self.in_dim, self.rank, self.kernel, stride=base.stride, padding=base.padding,
                                       dilation=base.dilation, bias=False)
            self.lora_up = nn.Conv2d(self.rank, self.out_dim, 1, bias=False)
        else:
            self.lora_down = nn.Linear(self.in_dim, self.rank, bias=False)
            self.lora_up = nn.Linear(self.rank, self.out_dim, bias=False)
        # kohya's init: a random down projection and a zero up projection, so training starts at the base model.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def delta_weight(self) -> torch.Tensor:
        up = self.lora_up.weight.reshape(self.out_dim, self.rank)
        down = self.lora_down.weight.reshape(self.rank, -1)
        return (up @ down).reshape(self._weight_shape()) * self.scale

    def forward(self, base, x, base_out, strength):
        if self.dora_scale is not None:
            return super().forward(base, x, base_out, strength)
        if strength == 0 or self._skip():
            return base_out
        h = self.lora_down(x.to(self.lora_down.weight.dtype))
        if self.training and self.dropout > 0:
            h = F.dropout(h, p=self.dropout)
        if self.training and self.rank_dropout > 0:
            if self.is_conv:  # B x r x H x W: one mask per sample and rank channel
                shape = (h.shape[0], self.rank, 1, 1)
            else:  # B x ... x r
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.rank,)
            mask = (torch.rand(shape, device=h.device) >= self.rank_dropout).to(h.dtype) / (1 - self.rank_dropout)
            h = h * mask
        up = self.lora_up.weight
        same = base_out.dtype == h.dtype == up.dtype or torch.is_autocast_enabled(base_out.device.type)
        if not self.is_conv and same and base_out.is_contiguous():
            # base_out + s·(h @ upᵀ) as one addmm: no output-sized product and scaled copy, forward or
            # backward (peft's ``result + lora_B(lora_A(x)) * scaling`` makes both); the same math.
            # Under autocast addmm casts all three to the autocast dtype, as lora_up and the add did.
            flat = torch.addmm(base_out.reshape(-1, self.out_dim), h.reshape(-1, self.rank), up.t(),
                               alpha=self.scale * strength)
            return flat.reshape(base_out.shape)
        return base_out + (self.lora_up(h) * (self.scale * strength)).to(base_out.dtype)


class LoHaModule(AdapterModule):
    kind = "loha"

    def __init__(self, base: nn.Module, rank: int, alpha: float, **kw):
        super().__init__(base, rank, alpha, **kw)
        flat_in = self.in_dim * math.prod(self.kernel or (1,))
        self.hada_w1_a = nn.Parameter(torch.empty(self.out_dim, self.rank))
        self.hada_w1_b = nn.Parameter(torch.empty(self.rank, flat_in))
        self.hada_w2_a = nn.Parameter(torch.empty(self.out_dim, self.rank))
        self.hada_w2_b = nn.Parameter(torch.empty(self.rank, flat_in))
        # LyCORIS' init: one factor of the second pair is zero, so dW starts at 0.
        nn.init.normal_(self.hada_w1_b, std=1.0)
        nn.init.normal_(self.hada_w1_a, std=0.1)
        nn.init.normal_(self.hada_w2_b, std=1.0)
        nn.init.zeros_(self.hada_w2_a)

    def delta_weight(self) -> torch.Tensor:
        d = (self.hada_w1_a @ self.hada_w1_b) * (self.hada_w2_a @ self.hada_w2_b)
        return d.reshape(self._weight_shape()) * self.scale


class LoKrModule(AdapterModule):
    kind = "lokr"

    def __init__(self, base: nn.Module, rank: int, alpha: float, *, factor: int = -1, full_w2: bool | None = None,
                 w1_shape: tuple[int, int] | None = None, **kw):
        super().__init__(base, rank, alpha, **kw)
        if w1_shape is not None:  # loading a file: its w1 fixes the split
            out_l, in_m = w1_shape
            out_k, in_n = self.out_dim // out_l, self.in_dim // in_m
        else:
            in_m, in_n = factorization(self.in_dim, factor)
            out_l, out_k = factorization(self.out_dim, factor)
        self.shape_l = (out_l, in_m)
        self.shape_k = (out_k, in_n)
        k = math.prod(self.kernel or (1,))
        self.lokr_w1 = nn.Parameter(torch.empty(out_l, in_m))
        if full_w2 is None:  # LyCORIS: a rank this large would not save anything, so keep w2 whole
            full_w2 = self.rank >= max(out_k, in_n) / 2
        self.full_w2 = bool(full_w2)
        nn.init.kaiming_uniform_(self.lokr_w1, a=math.sqrt(5))
        if self.full_w2:
            self.lokr_w2 = nn.Parameter(torch.zeros(out_k, in_n, *self.kernel))
        else:
            self.lokr_w2_a = nn.Parameter(torch.empty(out_k, self.rank))
            self.lokr_w2_b = nn.Parameter(torch.zeros(self.rank, in_n * k))
            nn.init.kaiming_uniform_(self.lokr_w2_a, a=math.sqrt(5))

    @property
    def scale(self) -> float:
        return self._scale if not self.full_w2 else 1.0

    def delta_weight(self) -> torch.Tensor:
        if self.full_w2:
            w2 = self.lokr_w2.reshape(self.shape_k[0], -1)
        else:
            w2 = self.lokr_w2_a @ self.lokr_w2_b
        return torch.kron(self.lokr_w1, w2).reshape(self._weight_shape()) * self.scale


def make_module(algorithm: str, base: nn.Module, rank: int, alpha: float, *, factor: int = -1, lokr: dict | None = None,
                **kw) -> AdapterModule:
    if algorithm in ("lora", "locon"):
        return LoRAModule(base, rank, alpha, **kw)
    if algorithm == "dora":
        return LoRAModule(base, rank, alpha, dora=True, **kw)
    if algorithm == "loha":
        return LoHaModule(base, rank, alpha, **kw)
    if algorithm == "lokr":
        return LoKrModule(base, rank, alpha, factor=factor, **(lokr or {}), **kw)
    raise ValueError(f"unknown adapter algorithm {algorithm!r}")
