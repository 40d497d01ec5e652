"""Training options: EMA, validation loss, text-encoder training and its stop, full fine-tune of a
text encoder, and the objective's pieces (masks, weighting, targets, timesteps, zero terminal SNR)."""

import pytest
import torch

from app.ml.adapters import AdapterConfig, create_adapter_set
from app.ml.handle import ModelHandle
from app.ml.models.load import load_model
from app.ml.train.loop import Hooks, Trainer, TrainSettings
from app.ml.train.objective import (ObjectiveSettings, make_noise, per_sample_loss, rescale_zero_terminal_snr,
                                    sample_timesteps, target_for, timestep_weights)
from app.ml.train.trainables import AdapterTrainable, FullFinetune
from tests.ml.test_train_loop import OPT, Pixels


@pytest.fixture(scope="module")
def bundle():
    return load_model("builtin:tiny-sd")


def lora(bundle, te="none"):
    config = AdapterConfig(rank=4, alpha=4, targets={"unet": "attn-only", "text_encoder": te}, seed=1)
    return AdapterTrainable(ModelHandle(bundle).with_adapter(create_adapter_set(bundle, config)))


def part(trainable, component):
    """The adapter weights of one component (unet / text_encoder), keyed by layer."""
    return {f"{e.name}.{k}": v.detach().clone() for e in trainable.adapter.entries() if e.component == component
            for k, v in e.module.state_dict().items()}


def test_ema_weights_are_the_result(bundle, tmp_path):
    plain = lora(bundle)
    Trainer(bundle, plain, Pixels(n=3), OPT, TrainSettings(epochs=1), tmp_path / "a").run()
    ema = lora(bundle)
    Trainer(bundle, ema, Pixels(n=3), OPT, TrainSettings(epochs=1, ema=True, ema_decay=0.5), tmp_path / "b").run()
    a, b = plain.state_dict(), ema.state_dict()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed  # the EMA average, not the last weights
    # an EMA with decay 0 is the last weights
    zero = lora(bundle)
    Trainer(bundle, zero, Pixels(n=3), OPT, TrainSettings(epochs=1, ema=True, ema_decay=0.0), tmp_path / "c").run()
    assert all(torch.allclose(a[k], zero.state_dict()[k]) for k in a)


def test_validation_loss_is_deterministic(bundle, tmp_path):
    results = []
    for run in range(2):
        t = lora(bundle)
        hooks = Hooks(validation=Pixels(n=2, batch=2))
        r = Trainer(bundle, t, Pixels(n=2), OPT, TrainSettings(epochs=2, validate_every=1), tmp_path / str(run),
                    hooks).run()
        results.append(r.validation)
    assert len(results[0]) == 2 and results[0] == results[1]
    assert results[0][0][1] != results[0][1][1]  # it measures the model as it trains


def test_text_encoder_adapter_trains_and_stops_when_told(bundle, tmp_path):
    two = lora(bundle, te="attn-only")
    assert two.trains_text_encoder()
    te0 = part(two, "text_encoder")
    assert te0
    Trainer(bundle, two, Pixels(n=4), OPT, TrainSettings(epochs=1, max_steps=2), tmp_path / "a").run()
    te2 = part(two, "text_encoder")
    assert any(not torch.equal(te0[k], te2[k]) for k in te0)
    five = lora(bundle, te="attn-only")
    Trainer(bundle, five, Pixels(n=5), OPT, TrainSettings(epochs=1, max_steps=5, stop_text_encoder_after=2),
            tmp_path / "b").run()
    te5 = part(five, "text_encoder")
    assert all(torch.equal(te2[k], te5[k]) for k in te2)  # frozen after step 2
    unet2, unet5 = part(two, "unet"), part(five, "unet")
    assert any(not torch.equal(unet2[k], unet5[k]) for k in unet2)


def test_full_finetune_of_the_text_encoder_only(bundle, tmp_path):
    before_te = {k: v.clone() for k, v in bundle.text_encoders[0].state_dict().items()}
    t = FullFinetune(bundle, train_unet=False, train_text_encoders=True)
    assert t.unet is bundle.unet and t.text_encoders[0] is not bundle.text_encoders[0]
    Trainer(bundle, t, Pixels(n=2), OPT, TrainSettings(epochs=1), tmp_path).run()
    assert all(torch.equal(before_te[k], v) for k, v in bundle.text_encoders[0].state_dict().items())
    assert any(not torch.equal(before_te[k], v) for k, v in t.text_encoders[0].state_dict().items())


# ---- objective pieces -------------------------------------------------------------------------

def test_masked_loss_weights_black_areas_by_the_unmasked_weight():
    s = ObjectiveSettings(unmasked_weight=0.1)
    pred, target = torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half white
    loss = per_sample_loss(pred, target, s, mask, torch.tensor([True]))
    assert loss.item() == pytest.approx(0.5 * 1.0 + 0.5 * 0.1)
    ignored = per_sample_loss(pred, target, s, mask, torch.tensor([False]))
    assert ignored.item() == pytest.approx(1.0)
    norm = per_sample_loss(pred, target, ObjectiveSettings(unmasked_weight=0.1, normalize_masked_area=True), mask,
                           torch.tensor([True]))
    assert norm.item() == pytest.approx(1.0)


@pytest.mark.parametrize("loss,value", [("mse", 4.0), ("mae", 2.0), ("huber", 0.1 * (2.0 - 0.05))])
def test_losses(loss, value):
    s = ObjectiveSettings(loss=loss, huber_delta=0.1)
    out = per_sample_loss(torch.zeros(2, 4, 2, 2), torch.full((2, 4, 2, 2), 2.0), s)
    assert out.tolist() == pytest.approx([value, value])


def test_weighting_and_targets(bundle):
    sched = bundle.make_noise_scheduler()
    t = torch.tensor([10, 500, 990])
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    w = timestep_weights(sched, t, ObjectiveSettings(weighting="min_snr", min_snr_gamma=5.0), "epsilon")
    assert w.tolist() == pytest.approx((snr.clamp(max=5.0) / snr).tolist(), rel=1e-5)
    wv = timestep_weights(sched, t, ObjectiveSettings(weighting="min_snr", min_snr_gamma=5.0), "v_prediction")
    assert wv.tolist() == pytest.approx((snr.clamp(max=5.0) / (snr + 1)).tolist(), rel=1e-5)
    wd = timestep_weights(sched, t, ObjectiveSettings(weighting="debiased"), "epsilon")
    assert wd[0] < wd[1] < wd[2]
    x, n = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    assert torch.equal(target_for(sched, x, n, t, "epsilon"), n)
    torch.testing.assert_close(target_for(sched, x, n, t, "v_prediction"), sched.get_velocity(x, n, t))


def test_timesteps_and_noise():
    g = torch.Generator().manual_seed(0)
    s = ObjectiveSettings(min_noising=0.2, max_noising=0.6)
    for dist in ("uniform", "logit_normal", "sigmoid"):
        t = sample_timesteps(2000, ObjectiveSettings(timesteps=dist, min_noising=0.2, max_noising=0.6), 1000, g)
        assert t.min() >= 200 and t.max() < 600
    mid = sample_timesteps(4000, ObjectiveSettings(timesteps="logit_normal"), 1000, g).float()
    uni = sample_timesteps(4000, s.__class__(), 1000, g).float()
    assert ((mid - 500).abs() < 250).float().mean() > ((uni - 500).abs() < 250).float().mean()
    plain = make_noise(torch.zeros(64, 4, 8, 8), ObjectiveSettings(), torch.Generator().manual_seed(1))
    offset = make_noise(torch.zeros(64, 4, 8, 8), ObjectiveSettings(offset_noise=0.5), torch.Generator().manual_seed(1))
    assert offset.mean(dim=(2, 3)).std() > 2 * plain.mean(dim=(2, 3)).std()


def test_zero_terminal_snr(bundle):
    sched = bundle.make_noise_scheduler()
    assert sched.alphas_cumprod[-1] > 0
    rescale_zero_terminal_snr(sched)
    assert sched.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-6)
