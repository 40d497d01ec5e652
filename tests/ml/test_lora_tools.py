"""LoRA tools math on the tiny models: resize, merge and extract by SVD, with the losses they claim."""

import pytest
import torch

from app.ml.adapters import AdapterConfig, AdapterError, attached, create_adapter_set, load_adapter_file
from app.ml.lora_tools import effective_deltas, extract_lora, merge_loras, rank_for, resize_lora
from app.ml.save import save_adapter


def random_lora(bundle, algorithm="locon", rank=4, alpha=2.0, seed=0, te="attn-only"):
    cfg = AdapterConfig(algorithm=algorithm, rank=rank, alpha=alpha, seed=seed,
                        targets={"unet": "full", "text_encoder": te, "text_encoder_2": "none"})
    aset = create_adapter_set(bundle, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in aset.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (p if p.dim() > 1 and algorithm == "dora" and p.shape[-1] == 1 else 0))
    return aset


def rel(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def test_rank_rules_follow_kohya():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5])
    assert rank_for(s, "fixed", 0, 3) == 3
    assert rank_for(s, "sv_ratio", 4, 5) == 2  # values above 10/4
    assert rank_for(s, "sv_cumulative", 0.8, 5) == 2  # 15/18.5 = 0.81
    fro = (torch.cumsum(s ** 2, 0) / (s ** 2).sum()).sqrt()  # 0.885, 0.99, ...
    assert rank_for(s, "sv_fro", 0.9, 5) == 2 and fro[0] < 0.9 <= fro[1]
    assert rank_for(s, "sv_fro", 0.9, 1) == 1  # capped by the rank asked for
    with pytest.raises(AdapterError, match="sv_ratio"):
        rank_for(s, "sv_ratio", 0.5, 5)


def test_resize_to_full_rank_is_lossless_and_lower_rank_keeps_the_share_it_reports(sd):
    aset = random_lora(sd, rank=6)
    before = effective_deltas(sd, aset)
    full, rep = resize_lora(sd, aset, rank=6)
    after = effective_deltas(sd, full)
    worst = max(rel(after[k], before[k]) for k in before)
    assert worst < 1e-5, worst
    assert all(r.fro_share > 1 - 1e-6 for r in rep)
    assert any(k[1].endswith("conv1") for k in after), "3x3 conv layers are resized too"
    small, rep = resize_lora(sd, aset, rank=2)
    kept = effective_deltas(sd, small)
    by = {(r.component, r.name): r for r in rep}
    for k, d in before.items():
        share = float(kept[k].norm() / d.norm())
        assert share >= by[k].fro_share - 1e-5
        # Eckart-Young: what is lost is exactly the rest of the spectrum.
        lost = float((kept[k] - d).norm() / d.norm())
        assert abs(lost ** 2 - (1 - by[k].fro_share ** 2)) < 1e-4
        assert by[k].rank == 2
    assert min(r.fro_share for r in rep) < 0.99  # a real loss, reported


def test_dynamic_resize_keeps_the_share_asked_for(sd):
    aset = random_lora(sd, rank=8, seed=3)
    out, rep = resize_lora(sd, aset, rank=8, method="sv_fro", target=0.9)
    assert all(r.fro_share >= 0.9 for r in rep)
    assert len({r.rank for r in rep}) > 1  # ranks differ per layer
    assert max(r.rank for r in rep) <= 8


@pytest.mark.parametrize("algorithm", ["loha", "lokr", "dora"])
def test_resize_turns_any_algorithm_into_a_lora_with_the_same_effect(sd, algorithm):
    aset = random_lora(sd, algorithm=algorithm, rank=4, te="none")
    before = effective_deltas(sd, aset)
    out, rep = resize_lora(sd, aset, rank=64)
    after = effective_deltas(sd, out)
    assert out.config.algorithm in ("lora", "locon")
    assert max(rel(after[k], before[k]) for k in before) < 1e-5


def test_merge_exact_equals_applying_both(sd):
    a, b = random_lora(sd, rank=4, seed=1), random_lora(sd, rank=2, alpha=1.0, seed=2, te="attn-mlp")
    merged, rep = merge_loras(sd, [(a, 0.7), (b, -0.4)], mode="exact")
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    ctx = torch.randn(1, 77, sd.unet.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with attached(sd, [(a, 0.7), (b, -0.4)]):
            want = sd.unet(x, t, ctx).sample
        with attached(sd, merged):
            got = sd.unet(x, t, ctx).sample
        plain = sd.unet(x, t, ctx).sample
    assert float((got - plain).abs().max()) > 1e-3  # the LoRAs do change the output
    err = float((got - want).abs().max())
    assert err < 1e-5, err
    da, db, dm = effective_deltas(sd, a), effective_deltas(sd, b), effective_deltas(sd, merged)
    for k in dm:
        want = 0.7 * da.get(k, 0) + (-0.4) * db.get(k, 0)
        assert rel(dm[k], want) < 1e-5
    shared = next(r for r in rep if (r.component, r.name) in da and (r.component, r.name) in db)
    assert shared.rank == 6


def test_merge_svd_compresses_the_sum(sd):
    a, b = random_lora(sd, rank=4, seed=1), random_lora(sd, rank=4, seed=2)
    full, rep = merge_loras(sd, [(a, 1.0), (b, 1.0)], mode="svd", rank=8)
    da, db, dm = effective_deltas(sd, a), effective_deltas(sd, b), effective_deltas(sd, full)
    assert max(rel(dm[k], da[k] + db[k]) for k in dm) < 1e-5
    small, rep = merge_loras(sd, [(a, 1.0), (b, 1.0)], mode="svd", rank=3)
    ds = effective_deltas(sd, small)
    for r in rep:
        k = (r.component, r.name)
        assert float(ds[k].norm() / (da[k] + db[k]).norm()) >= r.fro_share - 1e-5
    with pytest.raises(AdapterError, match="mode svd"):
        merge_loras(sd, [(random_lora(sd, algorithm="loha", te="none"), 1.0)], mode="exact")


def test_extract_recovers_a_known_low_rank_delta(sd):
    from app.ml.models import load_model

    tuned = load_model("builtin:tiny-sd")  # the same weights, loaded again
    g = torch.Generator().manual_seed(7)
    changed = {}
    with torch.no_grad():
        for comp, name in [("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
                           ("unet", "down_blocks.0.resnets.0.conv1"),
                           ("text_encoder", "encoder.layers.0.self_attn.k_proj")]:
            model = tuned.unet if comp == "unet" else tuned.text_encoders[0]
            w = model.get_submodule(name).weight
            up = torch.randn(w.shape[0], 3, generator=g)
            down = torch.randn(3, w[0].numel(), generator=g)
            delta = (up @ down).reshape(w.shape) * 0.01
            w.add_(delta)
            changed[(comp, name)] = delta
    lora, rep = extract_lora(tuned, sd, rank=3, min_diff=1e-7)
    got = effective_deltas(sd, lora)
    assert set(got) == set(changed)  # unchanged layers are left out
    for k, d in changed.items():
        err = float((got[k] - d).abs().max() / d.abs().max())
        assert err < 1e-4, (k, err)
    with pytest.raises(AdapterError, match="below the threshold"):
        extract_lora(sd, sd, rank=4)


@pytest.mark.parametrize("layout", ["kohya", "peft", "comfyui"])
def test_tool_outputs_round_trip_through_every_layout(sd, tmp_path, layout):
    aset = random_lora(sd, algorithm="lora" if layout == "peft" else "locon", rank=4)
    out, _ = resize_lora(sd, aset, rank=3)
    path = save_adapter(out, tmp_path / f"r_{layout}.safetensors", layout=layout, dtype="fp32")
    back = load_adapter_file(path, sd, trainable=False)
    a, b = effective_deltas(sd, out), effective_deltas(sd, back)
    assert set(a) == set(b)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
