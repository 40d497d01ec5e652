"""A run resumed past ``stop_text_encoder_after`` starts with the text encoder stopped, as the
uninterrupted run is at that step: its adapter weights do not move in the resumed steps."""

import pytest
import torch

from app.ml.models.load import load_model
from app.ml.train.loop import Hooks, Trainer, TrainSettings
from tests.ml.test_train_features import lora, part
from tests.ml.test_train_loop import OPT, Pixels


@pytest.fixture(scope="module")
def bundle():
    return load_model("builtin:tiny-sd")


def test_resume_past_the_text_encoder_stop_keeps_it_stopped(bundle, tmp_path):
    settings = TrainSettings(epochs=1, max_steps=5, stop_text_encoder_after=2, backup_every=1, backup_unit="steps",
                             backups_kept=10, seed=3)
    full = lora(bundle, te="attn-only")
    Trainer(bundle, full, Pixels(n=5), OPT, settings, tmp_path / "full").run()
    backup = tmp_path / "full" / "backups" / "step_0000003"  # one step past the stop
    resumed = lora(bundle, te="attn-only")
    logs: list[str] = []

    Trainer(bundle, resumed, Pixels(n=5), OPT, settings, tmp_path / "resumed", Hooks(log=logs.append)).run(
        resume_from=backup)
    at_stop = part(full, "text_encoder")
    te = part(resumed, "text_encoder")
    assert te and all(torch.equal(at_stop[k], te[k]) for k in te), "the text encoder trained after the resume"
    assert "text encoder training stopped" in logs
    # the rest of the run equals the uninterrupted one (the UNet adapter trained on)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
