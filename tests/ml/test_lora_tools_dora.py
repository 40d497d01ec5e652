"""DoRA renders the same in ComfyUI, A1111 and LyCORIS as in training: value-level checks of our saved files
against independent implementations of their formulas (written here from their published code)."""

import json

import pytest
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, attached, component_modules, create_adapter_set, load_adapter_file, module_key
from app.ml.save import save_adapter

EPS = torch.finfo(torch.float32).eps


def comfy_weight_decompose(dora_scale, weight, lora_diff, alpha, strength):
    """comfy/weight_adapter/base.py weight_decompose in fp32 (function = identity)."""
    weight = weight.clone()
    weight_calc = weight + lora_diff * alpha
    if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: the norm of the ORIGINAL weight
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(
            weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_calc = weight_calc * (dora_scale / (weight_norm + EPS))
    if strength != 1.0:
        return weight + strength * (weight_calc - weight)
    return weight_calc


def a1111_updown(dora_scale, orig_weight, updown):
    """A1111 1.10 extensions-builtin/Lora/network.py apply_weight_decompose (input axis only); its
    finalize_updown scales up@down by alpha/rank before and by the multiplier after."""
    merged = updown + orig_weight
    norm = (merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (merged.dim() - 1)).transpose(0, 1))
    return merged * (dora_scale / norm) - orig_weight


def lycoris_out_axis(dora_scale, org_weight, diff, multiplier):
    """LyCORIS apply_weight_decompose with wd_on_out=True (norm of W + dW per output channel). LyCORIS scales
    the decomposition itself by the multiplier, so only strength 1 is the same quantity as ours."""
    weight = org_weight + diff
    norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], *[1] * (weight.dim() - 1)) + EPS
    scale = dora_scale / norm
    if multiplier != 1:
        scale = multiplier * (scale - 1) + 1
    return weight * scale


@pytest.fixture(scope="module")
def dora_file(sd, tmp_path_factory):
    aset = create_adapter_set(sd, AdapterConfig(algorithm="dora", rank=4, alpha=2.0,
                                                targets={"unet": "full", "text_encoder": "attn-only"}))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in aset.named_parameters():
            if name.endswith("dora_scale"):
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))  # a trained magnitude, not the initial one
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = save_adapter(aset, tmp_path_factory.mktemp("dora") / "d.safetensors", dtype="fp32")
    return aset, path


def _file_modules(sd, aset, path):
    comps = component_modules(sd)
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    for e in aset.entries():
        pre = module_key(e.component, e.name, "kohya", sd.family, sd.unet.config)
        base = comps[e.component].get_submodule(e.name)
        w = base.weight.detach().float()
        up, down = tensors[pre + ".lora_up.weight"], tensors[pre + ".lora_down.weight"]
        diff = (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        scale = float(tensors[pre + ".alpha"]) / down.shape[0]
        yield e, base, w, diff, scale, tensors[pre + ".dora_scale"], meta


@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_comfyui_and_a1111_compute_what_we_train(sd, dora_file, strength):
    aset, path = dora_file
    loaded = load_adapter_file(path, sd, trainable=False)
    worst_comfy = worst_a1111 = 0.0
    convs = 0
    for e, base, w, diff, scale, dora_scale, meta in _file_modules(sd, aset, path):
        assert dora_scale.shape[0] == 1 and dora_scale.shape[1] == w.shape[1]  # input axis, as LyCORIS writes it
        ours = e.module.merged_weight(base, strength).float()  # what training applies
        theirs = comfy_weight_decompose(dora_scale, w, diff, scale, strength)
        worst_comfy = max(worst_comfy, float((ours - theirs).abs().max() / (theirs - w).abs().max()))
        a1111 = w + strength * a1111_updown(dora_scale, w, diff * scale)  # A1111: multiplier on updown
        worst_a1111 = max(worst_a1111, float((ours - a1111).abs().max() / (a1111 - w).abs().max()))
        again = loaded.get(e.component, e.name).merged_weight(base, strength).float()
        assert torch.equal(again, ours)
        convs += w.dim() == 4 and w.shape[-1] == 3
    print(f"DoRA vs ComfyUI: {worst_comfy:.1e}, vs A1111: {worst_a1111:.1e} (relative to the change)")
    assert worst_comfy < 1e-5 and worst_a1111 < 1e-5 and convs > 0
    assert json.loads(meta["ss_network_args"])["wd_on_out"] == "False"


def test_training_forward_is_the_merged_weight(sd, dora_file):
    aset, _ = dora_file
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t, ctx = torch.tensor([10]), torch.randn(1, 77, sd.unet.config.cross_attention_dim)
    from app.ml.adapters import merged_state_dicts

    with torch.no_grad():
        with attached(sd, aset, 0.6):
            hooked = sd.unet(x, t, ctx).sample
        merged = merged_state_dicts(sd, aset, 0.6)["unet"]
        keep = {k: v.clone() for k, v in sd.unet.state_dict().items()}
        sd.unet.load_state_dict(merged)
        try:
            baked = sd.unet(x, t, ctx).sample
        finally:
            sd.unet.load_state_dict(keep)
    assert float((hooked - baked).norm() / baked.norm()) < 1e-5


def test_output_axis_files_still_load_with_lycoris_form(sd, dora_file, tmp_path):
    """A file whose dora_scale is per output channel (ours before, LyCORIS wd_on_out=True) keeps its meaning."""
    from safetensors.torch import save_file

    aset, path = dora_file
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    comps = component_modules(sd)
    for e in aset.entries():
        pre = module_key(e.component, e.name, "kohya", sd.family, sd.unet.config)
        w = comps[e.component].get_submodule(e.name).weight.detach().float()
        out_norm = w.reshape(w.shape[0], -1).norm(dim=1).reshape(w.shape[0], *[1] * (w.dim() - 1))
        tensors[pre + ".dora_scale"] = out_norm * 1.1
    old = tmp_path / "out_axis.safetensors"
    save_file(tensors, str(old), metadata=meta)
    loaded = load_adapter_file(old, sd, trainable=False)
    for e, base, w, diff, scale, dora_scale, _ in _file_modules(sd, aset, old):
        got = loaded.get(e.component, e.name).merged_weight(base, 1.0).float()
        want = lycoris_out_axis(dora_scale, w, diff * scale, 1.0)
        assert float((got - want).abs().max() / (want - w).abs().max()) < 1e-5
