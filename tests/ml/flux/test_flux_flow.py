"""The flow-matching objective: distributions against their analytic CDFs, shifts against diffusers'
scheduler, the velocity sign against diffusers' Euler sampler, and a tiny transformer that learns."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from diffusers.training_utils import compute_loss_weighting_for_sd3

from app.ml.flux import flow as F
from app.ml.flux import latents as L

N = 40_000
KS_BOUND = 1.95 / math.sqrt(N) * 1.1  # ~99.9 % critical value, with a little room


def ks(samples: torch.Tensor, cdf) -> float:
    x, _ = torch.sort(samples.double())
    n = x.numel()
    f = cdf(x)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return max((i / n - f).abs().max().item(), (f - (i - 1) / n).abs().max().item())


def logit(x):
    return torch.log(x) - torch.log1p(-x)


CASES = {
    "uniform": (dict(timesteps="uniform", shift="none"), lambda x: x),
    "sigmoid": (dict(timesteps="sigmoid", logit_scale=1.0, shift="none"), lambda x: torch.special.ndtr(logit(x))),
    "sigmoid_scale2": (dict(timesteps="sigmoid", logit_scale=2.0, shift="none"), lambda x: torch.special.ndtr(logit(x) / 2)),
    "logit_normal": (dict(timesteps="logit_normal", logit_mean=0.5, logit_scale=0.7, shift="none"),
                     lambda x: torch.special.ndtr((logit(x) - 0.5) / 0.7)),
    # σ' = sσ/(1+(s−1)σ) of a uniform σ: P(σ' ≤ x) = x / (s − (s−1)x)
    "fixed_shift": (dict(timesteps="uniform", shift="fixed", shift_value=3.0), lambda x: x / (3.0 - 2.0 * x)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_distribution_matches_its_cdf(name):
    kw, cdf = CASES[name]
    s = F.sample_sigmas(N, F.FlowSettings(**kw).check(), torch.Generator().manual_seed(11))
    assert 0 <= s.min() and s.max() <= 1
    assert ks(s, cdf) < KS_BOUND
    # and a wrong distribution is told apart (the test can fail)
    assert ks(s, lambda x: x ** 1.2) > 3 * KS_BOUND


@pytest.mark.parametrize("seq", [256, 1024, 4096])
def test_resolution_shift_distribution(seq):
    s = F.FlowSettings(timesteps="uniform", shift="resolution")
    sig = F.sample_sigmas(N, s, torch.Generator().manual_seed(3), image_seq_len=seq)
    e = math.exp(F.resolution_mu(seq))
    # σ' = e/(e + 1/σ − 1) of a uniform σ: P(σ' ≤ x) = 1 / (1 + e(1/x − 1))
    assert ks(sig, lambda x: 1 / (1 + e * (1 / x - 1))) < KS_BOUND


def test_mu_matches_flux_pipeline():
    for seq in (16, 256, 1024, 2500, 4096, 8192):
        assert F.resolution_mu(seq) == pytest.approx(calculate_shift(seq), abs=1e-12)
    assert F.resolution_mu(L.image_seq_len(512, 512)) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)


def test_shifts_match_diffusers_scheduler():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    base = torch.linspace(1, 1000, 1000).flip(0) / 1000
    assert torch.allclose(F.shift_fixed(base, 3.0), sched.sigmas, atol=1e-6)

    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    for seq in (256, 1024, 4096):
        mu = F.resolution_mu(seq)
        raw = torch.linspace(1.0, 1 / 20, 20)  # what FluxPipeline passes as sigmas
        dyn.set_timesteps(sigmas=raw.numpy(), mu=mu)
        ours = F.shift_resolution(raw, mu)
        assert torch.allclose(ours, dyn.sigmas[:-1], atol=1e-6)
        assert torch.allclose(ours, dyn.time_shift(mu, 1.0, raw), atol=1e-6)


def test_loss_weighting_matches_diffusers():
    sig = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 0.98 + 0.01
    for scheme in ("sigma_sqrt", "cosmap"):
        assert torch.allclose(F.loss_weighting(sig, scheme), compute_loss_weighting_for_sd3(scheme, sig))
    assert torch.equal(F.loss_weighting(sig, "none"), torch.ones_like(sig))


def test_velocity_sign_matches_diffusers_euler_step():
    """An oracle that predicts exactly our target walks diffusers' sampler from pure noise to x0."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 64, generator=g)
    eps = F.make_noise(x0, g)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(8)
    x = eps.clone()
    for t, sig in zip(sched.timesteps, sched.sigmas[:-1]):
        assert torch.allclose(x, F.noisy(x0, eps, sig.expand(2)), atol=1e-5)
        x = sched.step(F.target(x0, eps), t, x).prev_sample
    assert torch.allclose(x, x0, atol=1e-5)


def test_draws_are_reproducible_from_the_generator():
    s = F.FlowSettings()
    a = F.sample_sigmas(8, s, torch.Generator().manual_seed(1), image_seq_len=1024)
    g = torch.Generator().manual_seed(1)
    b1 = F.sample_sigmas(3, s, g, image_seq_len=1024)
    b2 = F.sample_sigmas(5, s, g, image_seq_len=1024)
    assert torch.equal(a, torch.cat([b1, b2]))  # a resumed run continues the same stream


def test_bad_settings_name_the_field_and_choices():
    with pytest.raises(F.FlowSettingsError, match="timesteps 'gauss'.*uniform, sigmoid, logit_normal"):
        F.FlowSettings(timesteps="gauss").check()
    with pytest.raises(F.FlowSettingsError, match="Objective 'flow'.*shift_value"):
        F.FlowSettings(shift="fixed", shift_value=0).check("Objective 'flow'")
    with pytest.raises(F.FlowSettingsError, match="image_seq_len"):
        F.sample_sigmas(2, F.FlowSettings(shift="resolution"), torch.Generator())
    assert torch.equal(F.guidance_input(3), torch.ones(3))


def test_tiny_transformer_learns_the_velocity():
    """30 AdamW steps on one fixed batch (fresh noise and σ each step) lower the flow-matching loss."""
    from app.ml.flux.tiny import build_transformer

    torch.manual_seed(0)
    model = build_transformer().train()
    g = torch.Generator().manual_seed(42)
    x0 = L.pack(L.encode_scale(torch.randn(4, 16, 4, 4, generator=g) * 2 + 0.5))
    ctx = torch.randn(4, 6, 32, generator=g)
    pooled = torch.randn(4, 32, generator=g)
    img_ids, txt_ids = L.image_ids(4, 4), L.text_ids(6)
    settings = F.FlowSettings(shift="resolution")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss_at(sig, eps):
        pred = model(hidden_states=F.noisy(x0, eps, sig), encoder_hidden_states=ctx, pooled_projections=pooled,
                     timestep=sig, guidance=F.guidance_input(4, settings.guidance), img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]
        return F.flow_loss(pred, x0, eps, sig)

    eval_g = torch.Generator().manual_seed(99)
    eval_batches = [(F.sample_sigmas(4, settings, eval_g, image_seq_len=4), F.make_noise(x0, eval_g)) for _ in range(4)]

    def eval_loss():
        with torch.no_grad():
            return sum(loss_at(s, e).item() for s, e in eval_batches) / len(eval_batches)

    before = eval_loss()
    for _ in range(30):
        loss = loss_at(F.sample_sigmas(4, settings, g, image_seq_len=4), F.make_noise(x0, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)
