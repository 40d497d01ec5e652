"""The training loop on the tiny model: exact resume, stop with a backup, NaN handling, EMA."""

import pytest
import torch

from app.engine.errors import Cancelled
from app.ml.models.load import load_model
from app.ml.train.loop import Batch, Hooks, Trainer, TrainingError, TrainSettings
from app.ml.train.trainables import FullFinetune


class Pixels:
    """Deterministic random batches: a pure function of (epoch, index)."""

    def __init__(self, n=4, batch=2, size=16, poison=None):
        self.n, self.b, self.size, self.poison = n, batch, size, poison

    def iterations(self, epoch):
        return self.n

    def batch(self, epoch, index, rank=0, world=1):
        g = torch.Generator().manual_seed(epoch * 1000 + index)
        px = torch.rand((self.b * world, 3, self.size, self.size), generator=g) * 2 - 1
        px = px[rank * self.b:(rank + 1) * self.b]
        if self.poison == (epoch, index):
            px = px * float("nan")
        return Batch(captions=[f"red {index}"] * self.b, loss_weights=torch.ones(self.b), pixels=px.clamp(-1, 1)
                     if self.poison != (epoch, index) else px)


@pytest.fixture(scope="module")
def bundle():
    return load_model("builtin:tiny-sd")


OPT = {"optimizer": "adamw", "lr": 1e-3, "schedule": "cosine", "warmup": 2}


def weights(trainable):
    return {k: v.detach().clone() for k, v in trainable.state_dict().items()}


def test_resume_after_stop_equals_uninterrupted(bundle, tmp_path):
    settings = TrainSettings(epochs=2, grad_accumulation=1, seed=3, backup_every=1, backup_unit="steps")
    full_t = FullFinetune(bundle)
    full = Trainer(bundle, full_t, Pixels(), OPT, settings, tmp_path / "a").run()
    assert full.steps == 8 and len(full.losses) == 8

    stopped_t = FullFinetune(bundle)
    calls = {"n": 0}

    def cancel_at_5():
        calls["n"] += 1
        if calls["n"] == 6:  # before the 6th step
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        Trainer(bundle, stopped_t, Pixels(), OPT, settings, tmp_path / "b", Hooks(check_cancel=cancel_at_5)).run()
    resumed_t = FullFinetune(bundle)
    backup = sorted((tmp_path / "b" / "backups").iterdir())[-1]
    assert backup.name == "step_0000005"
    rest = Trainer(bundle, resumed_t, Pixels(), OPT, settings, tmp_path / "b").run(resume_from=backup)
    assert rest.losses == full.losses[5:]
    a, b = weights(full_t), weights(resumed_t)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and the epoch's last step
def test_a_stop_right_after_a_step_resumes_after_it(bundle, tmp_path, stop_after):
    """Ctrl-C lands anywhere, e.g. in the progress or metric report of a step that is already taken:
    the backup then resumes at the next batch, not by redoing that step's batch."""
    settings = TrainSettings(epochs=2, grad_accumulation=1, seed=3)
    full_t = FullFinetune(bundle)
    full = Trainer(bundle, full_t, Pixels(), OPT, settings, tmp_path / "a").run()

    def stop(step, total):
        if step == stop_after:
            raise Cancelled("stop")

    with pytest.raises(Cancelled):
        Trainer(bundle, FullFinetune(bundle), Pixels(), OPT, settings, tmp_path / "b", Hooks(progress=stop)).run()
    backup = tmp_path / "b" / "backups" / f"step_{stop_after:07d}"
    resumed_t = FullFinetune(bundle)
    rest = Trainer(bundle, resumed_t, Pixels(), OPT, settings, tmp_path / "b").run(resume_from=backup)
    assert rest.losses == full.losses[stop_after:]
    a, b = weights(full_t), weights(resumed_t)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_model_is_not_changed_by_full_finetune(bundle, tmp_path):
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    t = FullFinetune(bundle)
    Trainer(bundle, t, Pixels(n=2), OPT, TrainSettings(epochs=1), tmp_path).run()
    assert all(torch.equal(before[k], v) for k, v in bundle.unet.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in t.unet.state_dict().items())


def test_nan_loss_stops_with_a_backup_of_the_last_good_state(bundle, tmp_path):
    t = FullFinetune(bundle)
    with pytest.raises(TrainingError) as err:
        Trainer(bundle, t, Pixels(poison=(0, 2)), OPT, TrainSettings(epochs=1), tmp_path).run()
    assert "became nan at step 3" in str(err.value) and "backed up" in str(err.value)
    backup = tmp_path / "backups" / "step_0000002"
    assert backup.is_dir()
    from safetensors.torch import load_file

    saved = load_file(str(backup / "trainable.safetensors"))
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_backups_roll(bundle, tmp_path):
    t = FullFinetune(bundle)
    s = TrainSettings(epochs=1, backup_every=1, backup_unit="steps", backups_kept=2)
    Trainer(bundle, t, Pixels(n=4), OPT, s, tmp_path).run()
    assert sorted(p.name for p in (tmp_path / "backups").iterdir()) == ["step_0000002", "step_0000003"]


def test_grad_accumulation_and_max_steps(bundle, tmp_path):
    t = FullFinetune(bundle)
    r = Trainer(bundle, t, Pixels(n=5), OPT, TrainSettings(epochs=3, grad_accumulation=2), tmp_path).run()
    assert r.steps == 9  # ceil(5 / 2) per epoch
    r = Trainer(bundle, FullFinetune(bundle), Pixels(n=5), OPT, TrainSettings(epochs=1, max_steps=7), tmp_path).run()
    assert r.steps == 7


def test_max_tokens_feeds_the_unet_every_75_token_piece(bundle, tmp_path):
    lengths = []
    t = FullFinetune(bundle)
    hook = t.unet.register_forward_pre_hook(lambda m, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]),
                                            with_kwargs=True)
    try:
        for chunks in (1, 3):
            Trainer(bundle, t, Pixels(n=1), OPT, TrainSettings(epochs=1, prompt_chunks=chunks), tmp_path).run()
    finally:
        hook.remove()
    assert lengths == [77, 3 * 77]
