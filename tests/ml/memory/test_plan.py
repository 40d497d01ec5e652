"""The memory planner: a breakdown checked by hand, fit proposals that fit, coefficients measured."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from app.ml.memory.plan import (Component, Recipe, activation_coefficient, count_params, fit, predict,
                                saved_bytes)


def _recipe(**kw):
    base = dict(
        components=[Component("transformer", params=1_000_000, linear_params=900_000, dtype="bf16"),
                    Component("text_encoder", params=200_000, linear_params=150_000, dtype="bf16", on_device=False),
                    Component("vae", params=50_000, linear_params=0, dtype="fp32")],
        denoiser="transformer", blocks=10, block_params=800_000, block_linear_params=800_000,
        act_per_token=1000.0, ckpt_per_token=100.0, tokens=256, adapter_params=10_000, optimizer="adamw")
    base.update(kw)
    return Recipe(**base)


def test_breakdown_matches_hand_computation():
    p = predict(_recipe())
    # transformer bf16: 1e6 * 2; text encoder off the device; vae fp32: 5e4 * 4
    assert p.parts["weights transformer (bf16)"] == 2_000_000
    assert "weights text_encoder (bf16)" not in p.parts
    assert p.parts["weights vae (fp32)"] == 200_000
    assert p.parts["adapter weights (fp32)"] == 40_000 and p.parts["adapter gradients (fp32)"] == 40_000
    assert p.parts["optimizer state (adamw)"] == 80_000  # two fp32 moments
    assert p.parts["activations"] == 1000 * 256 * 10
    assert p.peak == 2_000_000 + 200_000 + 40_000 * 2 + 80_000 + 2_560_000

    # nf4 linear weights (0.5 B + a 4-byte absmax per 64) and bf16 for the rest; 8-bit AdamW;
    # checkpointing; block swap keeping 3 (+1 prefetch) of 10 blocks of 800k nf4 weights
    r = _recipe(components=[Component("transformer", 1_000_000, 900_000, "bf16", quant="nf4")],
                optimizer="adamw8bit", checkpointing=True, blocks_resident=3, prefetch=1)
    p = predict(r)
    nf4 = 0.5 + 4 / 64
    assert p.parts["weights transformer (nf4)"] == pytest.approx(900_000 * nf4 + 100_000 * 2)
    assert p.parts["block swap (weights in RAM)"] == pytest.approx(-800_000 * nf4 * 6 / 10)
    assert p.parts["optimizer state (adamw8bit)"] == pytest.approx(10_000 * (2 + 8 / 2048))
    assert p.parts["activations (checkpointed inputs)"] == 100 * 256 * 10
    assert p.parts["activations (one block recomputed)"] == 1000 * 256
    assert predict(replace_offload(r)).parts["activations (checkpointed inputs)"] == 0


def replace_offload(r):
    from dataclasses import replace

    return replace(r, offload_activations=True)


def test_adafactor_and_lion_state():
    r = _recipe(optimizer="adafactor", adapter_params=16 * 512 + 512 * 16, adapter_shapes=[(16, 512), (512, 16)])
    assert predict(r).parts["optimizer state (adafactor)"] == 4 * ((16 + 512) * 2)
    assert predict(_recipe(optimizer="lion")).parts["optimizer state (lion)"] == 40_000
    with pytest.raises(ValueError, match="unknown optimizer 'adam9'"):
        predict(_recipe(optimizer="adam9"))


@pytest.mark.parametrize("target", [3_000_000, 2_000_000, 1_200_000])
def test_fit_proposes_changes_that_fit(target):
    r = _recipe()
    assert predict(r).peak > target
    plan = fit(r, target)
    assert plan is not None and plan.peak <= target and plan.changes
    assert " -> " in plan.summary()


def test_fit_prefers_cheap_changes_and_reports_impossible():
    r = _recipe()
    # checkpointing alone saves 2.56 MB - 0.512 MB of activations: enough for 3.0 MB
    assert fit(r, 3_000_000).changes == ["gradient checkpointing"]
    assert fit(r, predict(r).peak + 1).changes == []
    assert fit(r, 1000) is None


def test_count_params_on_meta_and_measured_coefficients():
    with torch.device("meta"):
        block = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64))
    total, linear = count_params(block)
    assert linear == 64 * 256 * 2 and total == linear + 256 + 64 + 128

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).requires_grad_(False)

    def run(n, ckpt=False):
        x = torch.randn(n, 64, requires_grad=True)
        return checkpoint(block, x, use_reentrant=False) if ckpt else block(x)

    # frozen weights: only GELU's input (256 fp32 per token) is saved - Linear input grads need the weight only
    assert activation_coefficient(run, exclude=block) == 4 * 256
    ckpt = activation_coefficient(lambda n: run(n, True), exclude=block)
    assert ckpt == pytest.approx(4 * 64, rel=0.01)  # checkpointing keeps only the input
    assert saved_bytes(lambda: run(32), exclude=block) > 0


def test_measured_transient_enters_the_plan():
    from app.ml.memory.plan import measure_transient

    # a quantized layer is dequantized whole (bf16: 2 bytes per weight) to run; a plain one is not
    fp8 = measure_transient("fp8", torch.bfloat16, shape=(1024, 4096))
    plain = measure_transient(None, torch.bfloat16, shape=(1024, 4096))
    assert fp8 >= 1.5 and plain < 1.0, (fp8, plain)
    p = predict(_recipe(largest_linear=1000, transient_per_weight=fp8))
    assert p.parts["largest layer (transient)"] == 1000 * fp8
    q = predict(_recipe(components=[Component("transformer", 1_000_000, 900_000, "bf16", quant="fp8")],
                        largest_linear=1000))
    assert q.parts["dequantized layer (transient)"] == 2000  # no measurement: the bf16 copy


def test_step_coefficient_is_the_per_token_slope():
    from app.ml.memory.plan import step_coefficient

    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).requires_grad_(False)

    def step(n):
        block(torch.randn(n, 256, requires_grad=True)).sum().backward()

    coef = step_coefficient(step, (2048, 6144))
    # saved: GELU's input (1024 fp32 per token); live at the peak also the first Linear's output, GELU's
    # output and their gradients (about 5 of those 4 KiB rows per token), sampled from the resident size
    assert 4 * 1024 <= coef <= 4 * 1024 * 8, coef


def test_fit_never_proposes_what_the_recipe_already_does():
    r = _recipe(checkpointing=True)
    for target in (2_000_000, 1_500_000):
        plan = fit(r, target)
        assert plan is not None and "gradient checkpointing" not in plan.changes, plan.changes
    q = _recipe(components=[Component("transformer", 1_000_000, 900_000, "bf16", quant="fp8")])
    plan = fit(q, 1_900_000)
    assert plan is not None and not any(c.startswith("fp8 ") for c in plan.changes), plan.changes


def test_measured_profile_activations_and_full_finetune_parts():
    # activations from a measured profile: bytes per token of the whole step, per mode
    r = _recipe(act_full=500.0, act_ckpt=80.0, act_ckpt_offloaded=30.0, adapter_inputs=4000.0,
                adapter_inputs_ckpt=1000.0, adapter_factor=0.5)
    assert predict(r).parts["activations"] == 500 * 256
    assert predict(r).parts["activations (adapted layers' inputs)"] == 2000
    c = predict(_recipe(act_full=500.0, act_ckpt=80.0, checkpointing=True, adapter_inputs_ckpt=1000.0,
                        adapter_factor=0.5)).parts
    assert c["activations (checkpointed)"] == 80 * 256 and c["activations (adapted layers' inputs)"] == 500
    o = predict(_recipe(act_full=500.0, act_ckpt=80.0, act_ckpt_offloaded=30.0, checkpointing=True,
                        offload_activations=True)).parts
    assert o["activations (checkpointed, inputs offloaded)"] == 30 * 256
    # full fine-tune in bf16: the weights are the trained ones; gradients and AdamW moments in bf16;
    # a fused backward holds one gradient (the largest parameter) at a time
    f = predict(_recipe(full_finetune=True, trainable_dtype="bf16", adapter_params=1_000_000)).parts
    assert "adapter weights (fp32)" not in f and f["gradients (bf16)"] == 2_000_000
    assert f["optimizer state (adamw)"] == 8.0 * 1_000_000 / 2
    fused = predict(_recipe(full_finetune=True, trainable_dtype="bf16", adapter_params=1_000_000, fused_backward=True,
                            largest_param=50_000)).parts
    assert fused["gradients (bf16, fused backward)"] == 100_000
