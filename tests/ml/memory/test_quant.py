"""Quantized frozen Linear layers: accuracy per format, QLoRA on top, storage bytes of a Flux block."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from app.ml.adapters.modules import LoRAModule
from app.ml.memory.quant import QuantError, QuantizedLinear, module_bytes, quantize_linears, require_trainable

# Relative error ||y_q - y|| / ||y|| of one layer's output against the same layer in bf16, for
# Gaussian weights and inputs: fp8 e4m3 keeps 3 mantissa bits (~2.6 % measured), int8 row-wise
# absmax ~0.5 %, nf4 (16 levels per 64-weight block) ~9 %.
TOLERANCE = {("fp8", 0): 0.04, ("fp8", 128): 0.04, ("int8", None): 0.01, ("nf4", None): 0.12}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt,block", list(TOLERANCE))
def test_forward_within_tolerance_of_bf16(fmt, block):
    torch.manual_seed(0)
    lin = nn.Linear(512, 256).to(torch.bfloat16)
    x = torch.randn(8, 512, dtype=torch.bfloat16)
    q = QuantizedLinear(lin, fmt, block_size=block)
    assert isinstance(q, nn.Linear) and (q.in_features, q.out_features) == (512, 256)
    err = _rel(q(x), lin(x))
    assert err <= TOLERANCE[(fmt, block)], (fmt, block, err)
    # computed in the input's dtype: an fp32 input gives an fp32 output close to the fp32 layer
    x32 = x.float()
    assert q(x32).dtype == torch.float32
    assert _rel(q(x32), lin.float()(x32)) <= TOLERANCE[(fmt, block)]
    # the stored weight is no longer bf16, and casting the layer leaves it packed
    q.to(torch.float32)
    assert q.stored_bytes() < 0.6 * (512 * 256 * 2)


def test_fp8_block_scale_beats_per_tensor_on_uneven_rows():
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=False)
    with torch.no_grad():  # half the columns are below fp8's range under one scale for the whole tensor
        lin.weight[:, :128] *= 1e-5
    x = torch.randn(4, 256)
    x[:, 128:] = 0  # only the tiny columns matter
    ref = lin(x)
    assert _rel(QuantizedLinear(lin, "fp8", block_size=128)(x), ref) < 0.5 * _rel(
        QuantizedLinear(lin, "fp8", block_size=0)(x), ref)


def test_quantize_linears_by_name_and_report():
    net = nn.Sequential()
    net.add_module("attn", nn.Linear(64, 64))
    net.add_module("ff", nn.Linear(64, 128))
    net.add_module("head", nn.Linear(128, 4))
    before = module_bytes(net)
    report = quantize_linears(net, "fp8", include=["attn", "ff"], block_size=32)
    assert report.layers == ["attn", "ff"]
    assert isinstance(net.attn, QuantizedLinear) and type(net.head) is nn.Linear
    assert report.bytes_before == (64 * 64 + 64 + 64 * 128 + 128) * 4
    assert report.bytes_after < 0.35 * report.bytes_before  # fp32 -> fp8 + scales, fp32 bias
    assert module_bytes(net) == before - report.bytes_before + report.bytes_after
    assert not any(p.requires_grad for p in net.attn.parameters())
    with pytest.raises(QuantError, match="full fine-tune"):
        require_trainable(net, "TrainLoop")
    with pytest.raises(QuantError, match="Loader: unknown weight format 'fp2'"):
        quantize_linears(net, "fp2", where="Loader")


class _Adapted(nn.Module):
    """A base layer with a LoRA adapter, called the way attach.py's hook calls it."""

    def __init__(self, base, lora):
        super().__init__()
        self.base, self.lora = base, lora

    def forward(self, x):
        return self.lora(self.base, x, self.base(x), 1.0)


@pytest.mark.parametrize("fmt", ["nf4", "fp8", "int8"])
def test_qlora_trains_on_quantized_base_and_applies_on_full_precision_base(fmt):
    torch.manual_seed(0)
    base = nn.Linear(128, 64)
    teacher_delta = torch.randn(64, 4) @ torch.randn(4, 128) * 0.05
    xs = torch.randn(256, 128)
    target = xs @ (base.weight.detach() + teacher_delta).T + base.bias.detach()

    qbase = QuantizedLinear(base, fmt)
    lora = LoRAModule(base, rank=4, alpha=4)
    model = _Adapted(qbase, lora)
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2)
    first = None
    for step in range(150):
        idx = torch.randint(0, 256, (32,))
        x = xs[idx].clone().requires_grad_(True)
        loss = nn.functional.mse_loss(model(x), target[idx])
        opt.zero_grad()
        loss.backward()
        assert x.grad is not None and x.grad.abs().sum() > 0  # gradients flow through the quantized layer
        opt.step()
        first = first if first is not None else loss.item()
    assert all(p.grad is None for p in qbase.parameters())  # the base learns nothing
    assert loss.item() < 0.25 * first, (first, loss.item())

    # the trained delta applies on the unquantized base: it explains most of the teacher's delta
    with torch.no_grad():
        plain = nn.functional.mse_loss(base(xs), target).item()
        merged = nn.functional.linear(xs, lora.merged_weight(base), base.bias)
        assert nn.functional.mse_loss(merged, target).item() < 0.25 * plain


@pytest.fixture(scope="module")
def flux_single_block():
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock

    from app.ml.flux.variants import config

    cfg = config("dev", "transformer")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            block = FluxSingleTransformerBlock(cfg["num_attention_heads"] * cfg["attention_head_dim"],
                                               cfg["num_attention_heads"], cfg["attention_head_dim"])
    finally:
        torch.set_default_dtype(old)
    return block


@pytest.mark.parametrize("fmt,limit", [("nf4", 0.35), ("fp8", 0.55)])
def test_full_width_flux_block_weight_bytes(flux_single_block, fmt, limit):
    import copy

    block = copy.deepcopy(flux_single_block)
    bf16 = module_bytes(block)
    assert bf16 > 250e6  # 3072 wide: ~141 M parameters
    report = quantize_linears(block, fmt)
    ratio = module_bytes(block) / bf16
    assert ratio <= limit, (fmt, ratio, report.summary())
    # still runs: a few tokens through the quantized block
    x = torch.randn(1, 4, 3072, dtype=torch.bfloat16)
    temb = torch.randn(1, 3072, dtype=torch.bfloat16)
    ctx = torch.randn(1, 2, 3072, dtype=torch.bfloat16)
    with torch.no_grad():
        text, image = block(x, ctx, temb)
    assert image.shape == x.shape and torch.isfinite(image.float()).all()
