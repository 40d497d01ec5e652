"""Adapters: base weights never change, no stacking, algorithm maths, presets, parameter counts."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from app.ml.adapters import AdapterConfig, AdapterError, attached, create_adapter_set, select_targets
from app.ml.adapters.modules import make_module


def _checksum(bundle) -> str:
    h = hashlib.sha256()
    for comp in (bundle.unet, bundle.vae, *bundle.text_encoders):
        for name, t in comp.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _unet_out(bundle):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    enc = torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return bundle.unet(x, torch.tensor([10, 500]), enc).sample


def _hook_count(bundle) -> int:
    bundle.encode_prompts(["warm up"])  # transformers 5 installs its own output-capture hooks on first use
    return sum(len(m._forward_hooks) for comp in (bundle.unet, *bundle.text_encoders) for m in comp.modules())


def test_training_adapter_leaves_base_untouched_and_rerun_does_not_stack(sd):
    before_sum, before_out, hooks0 = _checksum(sd), _unet_out(sd), _hook_count(sd)
    cfg = AdapterConfig(algorithm="locon", rank=4, alpha=8, targets={"unet": "full", "text_encoder": "attn-mlp"})
    aset = create_adapter_set(sd, cfg)
    opt = torch.optim.AdamW(aset.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    x, enc = torch.randn(2, 4, 8, 8, generator=g), None
    with attached(sd, aset):
        assert _hook_count(sd) == hooks0 + len(aset)
        for _ in range(3):
            enc = sd.encode_prompts(["a red cube", "a blue ball"], with_grad=True)["prompt_embeds"]
            loss = sd.unet(x, torch.tensor([100, 700]), enc).sample.pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained_out = _unet_out(sd)
    assert _hook_count(sd) == hooks0
    assert _checksum(sd) == before_sum  # every base tensor bit-identical
    assert torch.equal(_unet_out(sd), before_out)
    assert (trained_out - before_out).abs().max() > 1e-3  # the adapter did learn something

    # LoRAInject re-run with another rank: only the new (zero-initialised) adapter acts.
    fresh = create_adapter_set(sd, AdapterConfig(algorithm="lora", rank=2, alpha=1, targets={"unet": "attn-mlp"}))
    with attached(sd, fresh):
        assert _hook_count(sd) == hooks0 + len(fresh)
        assert torch.equal(_unet_out(sd), before_out)
    assert _checksum(sd) == before_sum


def test_trainable_parameter_count_matches_rank(sd):
    aset = create_adapter_set(sd, AdapterConfig(rank=4, targets={"unet": "attn-only"}))
    expected = 0
    for e in aset.entries():
        base = sd.unet.get_submodule(e.name)
        expected += 4 * (base.in_features + base.out_features)
    assert aset.num_parameters() == expected > 0
    assert aset.summary()["trainable_parameters"] == expected
    assert all(not p.requires_grad for p in sd.unet.parameters())


def _randomise(module):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name != "dora_scale":
                p.normal_(0, 0.1)
            else:
                p.mul_(1.3)


@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr", "dora"])
@pytest.mark.parametrize("kind", ["linear", "conv3", "conv1"])
def test_adapter_forward_equals_merged_weight(algorithm, kind):
    torch.manual_seed(0)
    if kind == "linear":
        base, x = nn.Linear(12, 16), torch.randn(3, 5, 12)
    else:
        k = 3 if kind == "conv3" else 1
        base, x = nn.Conv2d(8, 12, k, padding=k // 2), torch.randn(2, 8, 6, 6)
    base.requires_grad_(False)
    mod = make_module(algorithm, base, rank=2, alpha=3.0, factor=2)
    mod.eval()
    _randomise(mod)
    out = base(x)
    for strength in (1.0, 0.5):
        got = mod(base, x, out, strength)
        w = mod.merged_weight(base, strength)
        want = F.linear(x, w, base.bias) if kind == "linear" else F.conv2d(x, w, base.bias, padding=base.padding)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        assert (got - out).abs().max() > 1e-4
    assert torch.equal(mod(base, x, out, 0.0), out)
    assert float(mod.alpha) == 3.0  # the real alpha is kept
    if algorithm in ("lora", "loha"):
        assert mod.scale == pytest.approx(1.5)


def test_fresh_adapters_start_at_zero_delta():
    base = nn.Linear(8, 8)
    for algo in ("lora", "loha", "lokr", "dora"):
        mod = make_module(algo, base, rank=2, alpha=1.0)
        torch.testing.assert_close(mod.merged_weight(base), base.weight.detach(), rtol=0, atol=1e-6)


def test_dropouts_only_while_training():
    torch.manual_seed(0)
    base, x = nn.Linear(16, 16), torch.randn(4, 16)
    mod = make_module("lora", base, rank=8, alpha=8.0, dropout=0.5, rank_dropout=0.5)
    _randomise(mod)
    out = base(x)
    mod.eval()
    assert torch.equal(mod(base, x, out, 1.0), mod(base, x, out, 1.0))
    mod.train()
    assert not torch.equal(mod(base, x, out, 1.0), mod(base, x, out, 1.0))
    skip = make_module("lora", base, rank=2, alpha=1.0, module_dropout=0.999)
    _randomise(skip)
    skip.train()
    assert torch.equal(skip(base, x, out, 1.0), out)


def test_layer_presets(sd):
    unet, te = sd.unet, sd.text_encoders[0]
    attn = select_targets(unet, "unet", "attn-only")
    mlp = select_targets(unet, "unet", "attn-mlp")
    full_lora = select_targets(unet, "unet", "full", allow_3x3=False)
    full_locon = select_targets(unet, "unet", "full", allow_3x3=True)
    assert attn and all(n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) for n in attn)
    assert set(attn) < set(mlp) < set(full_lora) < set(full_locon)
    assert any(n.endswith("ff.net.2") for n in mlp) and any(n.endswith("proj_in") for n in mlp)
    assert not any("resnets" in n for n in mlp)
    assert "down_blocks.0.resnets.0.conv1" in full_locon and "down_blocks.0.resnets.0.conv1" not in full_lora
    te_attn = select_targets(te, "text_encoder", "attn-only")
    te_mlp = select_targets(te, "text_encoder", "attn-mlp")
    n_layers = te.config.num_hidden_layers
    assert len(te_attn) == 4 * n_layers and len(te_mlp) == 6 * n_layers
    custom = select_targets(unet, "unet", "custom", [r"attn2\.to_k$", "conv_in"])
    assert "conv_in" in custom and all(n == "conv_in" or n.endswith("attn2.to_k") for n in custom)
    with pytest.raises(AdapterError, match="matches no"):
        select_targets(unet, "unet", "custom", ["no_such_layer"])
    with pytest.raises(AdapterError, match="custom"):
        AdapterConfig(targets={"unet": "custom"})


def test_attach_errors(sd):
    from app.ml.models import load_model

    hooks0 = _hook_count(sd)
    aset = create_adapter_set(sd, AdapterConfig(rank=2, targets={"unet": "attn-only"}))
    with attached(sd, aset):
        with pytest.raises(AdapterError, match="already attached"):
            with attached(sd, aset):
                pass
    assert _hook_count(sd) == hooks0
    xl = load_model("builtin:tiny-sdxl")
    xl_hooks0 = _hook_count(xl)
    with pytest.raises(AdapterError, match="made for"):
        with attached(xl, aset):
            pass
    assert _hook_count(xl) == xl_hooks0
