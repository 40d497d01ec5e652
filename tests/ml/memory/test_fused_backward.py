"""TrainLoop's fused_backward: the optimizer steps each parameter inside backward and frees its
gradient; a full fine-tune ends with the weights of the usual step, and what cannot work is refused."""
from __future__ import annotations

import pytest
import torch

from app.ml.models.load import load_model
from app.ml.train.loop import Trainer, TrainingError, TrainSettings
from app.ml.train.optim import FusedBackward, build_optimizer
from app.ml.train.trainables import FullFinetune
from tests.ml.memory.test_placement import Source


@pytest.fixture(scope="module")
def bundle():
    return load_model("builtin:tiny-sd")


def finetune(bundle, tmp_path, fused, optimizer, clip=0.0, steps=3):
    trainable = FullFinetune(bundle)
    grads_seen = []
    if fused:  # how many gradients exist at once: the fused pass frees each one as soon as it is used
        for p in trainable.unet.parameters():
            p.requires_grad_(True)  # as the trainer sets it; this hook runs before the step's
            p.register_post_accumulate_grad_hook(
                lambda p: grads_seen.append(sum(q.grad is not None for q in trainable.unet.parameters())))
    settings = TrainSettings(epochs=1, max_steps=steps, clip_grad_norm=clip, fused_backward=fused)
    opt = {"optimizer": optimizer, "lr": 1e-3, "weight_decay": 0.01}
    result = Trainer(bundle, trainable, Source(bundle, True, True, n=steps), opt, settings, tmp_path,
                     device=torch.device("cpu")).run()
    return result, {k: v.detach().clone() for k, v in trainable.state_dict().items()}, grads_seen


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_gives_the_weights_of_the_usual_step(bundle, tmp_path, optimizer):
    plain, plain_w, _ = finetune(bundle, tmp_path / "plain", False, optimizer)
    fused, fused_w, seen = finetune(bundle, tmp_path / "fused", True, optimizer)
    assert fused.losses == plain.losses
    changed, start = 0, bundle.unet.state_dict()
    for k in plain_w:
        torch.testing.assert_close(fused_w[k], plain_w[k], rtol=1e-6, atol=1e-7)
        changed += not torch.equal(fused_w[k], start[k.removeprefix("unet.")])
    assert changed > len(plain_w) // 2  # it trained
    assert seen and max(seen) == 1  # never more than the gradient about to be used


def test_per_parameter_clipping(bundle):
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(4))
    opt = build_optimizer({"optimizer": "adamw", "lr": 0.0, "weight_decay": 0.0}, [{"params": [a, b], "lr": 0.0}])
    seen = []
    FusedBackward(opt, clip_grad_norm=0.5, before_step=lambda ps: None)
    for p in (a, b):
        p.register_post_accumulate_grad_hook(lambda p: seen.append(float(opt.state[p]["exp_avg"].norm()) / 0.1))
    (a.sum() * 10 + b.sum() * 0.01).backward()
    # a's gradient (norm 17.3) is clipped to 0.5 alone; b's (norm 0.02) is left as it was
    assert sorted(seen) == pytest.approx([0.02, 0.5], rel=1e-5)
    assert a.grad is None and b.grad is None  # freed after the step


def test_combinations_that_cannot_work_are_refused_by_name(bundle, tmp_path):
    def run(optimizer="adamw", **settings):
        Trainer(bundle, FullFinetune(bundle), Source(bundle, True, True), {"optimizer": optimizer, "lr": 1e-3},
                TrainSettings(epochs=1, fused_backward=True, **settings), tmp_path, device=torch.device("cpu")).run()

    with pytest.raises(TrainingError, match="TrainLoop's fused_backward .* set grad_accumulation to 1 \\(it is 2"):
        run(grad_accumulation=2)
    with pytest.raises(TrainingError, match="TrainLoop's fused_backward .* prodigy .* use adamw or adafactor"):
        run("prodigy")
