"""Optimizers and learning-rate schedules."""

import math

import pytest
import torch

from app.ml.train.names import OPTIMIZERS
from app.ml.train.optim import OptimizerError, build_optimizer, build_scheduler, lr_factor


def quadratic_groups():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(torch.randn(8))
    return [{"name": "unet", "params": [a], "lr": 1e-2}, {"name": "text_encoder", "params": [b], "lr": 5e-3}], a, b


@pytest.mark.parametrize("name", [o for o in OPTIMIZERS if "8bit" not in o])
def test_every_optimizer_reduces_a_loss_and_keeps_group_rates(name):
    groups, a, b = quadratic_groups()
    settings = {"optimizer": name, "lr": 1.0 if name in ("prodigy", "dadapt_adam") else 1e-2, "weight_decay": 0.0}
    if name in ("prodigy", "dadapt_adam"):
        for g in groups:
            g["lr"] = 1.0
    opt = build_optimizer(settings, groups)
    assert len(opt.param_groups) == 2
    start = ((a.detach() ** 2).sum() + (b.detach() ** 2).sum()).item()
    for _ in range(400 if name in ("prodigy", "dadapt_adam") else 60):  # adaptive: d grows from 1e-6
        opt.zero_grad()
        loss = (a ** 2).sum() + (b ** 2).sum()
        loss.backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()
    assert ((a.detach() ** 2).sum() + (b.detach() ** 2).sum()).item() < start * 0.9, name


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizers_explain_what_they_need(name):
    groups, _, _ = quadratic_groups()
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed: tests/ml/memory/test_optim8bit.py trains with it")
    except ImportError:
        pass
    with pytest.raises(OptimizerError, match="bitsandbytes"):
        build_optimizer({"optimizer": name, "lr": 1e-4}, groups)


def test_unknown_optimizer_and_nothing_to_train():
    groups, _, _ = quadratic_groups()
    with pytest.raises(OptimizerError, match="unknown optimizer"):
        build_optimizer({"optimizer": "sgd9000", "lr": 1e-4}, groups)
    with pytest.raises(OptimizerError, match="nothing to train"):
        build_optimizer({"optimizer": "adamw", "lr": 1e-4}, [{"params": [], "lr": 1e-4}])


def test_schedules():
    total = 100
    f = lambda step, **s: lr_factor(step, total, s)  # noqa: E731
    assert f(0, schedule="constant") == 1.0 and f(99, schedule="constant") == 1.0
    assert f(0, schedule="linear") == 1.0 and f(50, schedule="linear") == pytest.approx(0.5)
    assert f(50, schedule="cosine") == pytest.approx(0.5) and f(100, schedule="cosine") == pytest.approx(0.0)
    # restarts: back to the top at each cycle start
    assert f(50, schedule="cosine_restarts", cycles=2) == pytest.approx(1.0)
    assert f(25, schedule="cosine_restarts", cycles=2) == pytest.approx(0.5)
    assert f(50, schedule="polynomial", power=2.0) == pytest.approx(0.25)
    # warmup as a count and as a fraction, and a floor
    assert f(0, schedule="constant", warmup=10) == pytest.approx(0.1)
    assert f(9, schedule="constant", warmup=10) == pytest.approx(1.0)
    assert f(4, schedule="cosine", warmup=0.1) == pytest.approx(0.5)
    assert f(100, schedule="cosine", min_factor=0.1) == pytest.approx(0.1)
    assert all(0.0 <= f(s, schedule="cosine_restarts", cycles=3, warmup=5) <= 1.0 for s in range(total))


def test_scheduler_drives_every_group():
    groups, a, b = quadratic_groups()
    opt = build_optimizer({"optimizer": "adamw", "lr": 1e-2}, groups)
    sched = build_scheduler(opt, {"schedule": "linear"}, 10)
    for _ in range(5):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-3, 2.5e-3])
    assert math.isclose(sched.get_last_lr()[0], 5e-3)


def test_adamw_and_sgd_use_fused_kernels_and_match_the_per_tensor_update():
    torch.manual_seed(0)
    start = [torch.randn(8, 4) for _ in range(3)]
    grads = [[torch.randn(8, 4) for _ in range(3)] for _ in range(4)]
    for name, cls, kw in (("adamw", torch.optim.AdamW, dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)),
                          ("sgd_nesterov", torch.optim.SGD, dict(momentum=0.9, nesterov=True, weight_decay=0.01))):
        ours = [torch.nn.Parameter(t.clone()) for t in start]
        ref = [torch.nn.Parameter(t.clone()) for t in start]
        opt = build_optimizer({"optimizer": name, "lr": 1e-2}, [{"name": "unet", "params": ours, "lr": 1e-2}])
        assert opt.defaults["fused"] is True, name
        ref_opt = cls(ref, lr=1e-2, foreach=False, **kw)
        for step_grads in grads:
            for p, q, g in zip(ours, ref, step_grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_lion_multi_tensor_step_equals_the_formula():
    from app.ml.train.optim import Lion

    for wd in (0.1, 0.0):
        torch.manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)]
        idle = torch.nn.Parameter(torch.randn(2))  # never gets a gradient: untouched, no state
        expect = [p.detach().clone() for p in params]
        moms = [torch.zeros_like(p) for p in params]
        opt = Lion([*params, idle], lr=0.1, betas=(0.9, 0.99), weight_decay=wd)
        idle_before = idle.detach().clone()
        for _ in range(3):
            grads = [torch.randn(5, 3) for _ in params]
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            for i, g in enumerate(grads):
                expect[i] = expect[i] * (1 - 0.1 * wd) - 0.1 * (moms[i] * 0.9 + g * 0.1).sign()
                moms[i] = moms[i] * 0.99 + g * 0.01
        for p, e in zip(params, expect):
            torch.testing.assert_close(p.detach(), e)
        assert torch.equal(idle.detach(), idle_before) and idle not in opt.state


def test_a_backup_from_other_kernels_resumes_with_this_optimizers_kernels():
    from app.ml.train.optim import load_optimizer_state

    torch.manual_seed(2)
    start = [torch.randn(6, 3) for _ in range(2)]
    grads = [[torch.randn(6, 3) for _ in range(2)] for _ in range(4)]

    def apply(opt, params, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()

    # an uninterrupted run with our (fused) AdamW
    ref = [torch.nn.Parameter(t.clone()) for t in start]
    ref_opt = build_optimizer({"optimizer": "adamw", "lr": 1e-2}, [{"name": "unet", "params": ref, "lr": 1e-2}])
    apply(ref_opt, ref, grads)
    # two steps with per-tensor kernels (a backup from an older version), then resumed fused
    old = [torch.nn.Parameter(t.clone()) for t in start]
    old_opt = torch.optim.AdamW(old, lr=1e-2, weight_decay=0.01, foreach=False)
    apply(old_opt, old, grads[:2])
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in old]
    opt = build_optimizer({"optimizer": "adamw", "lr": 1e-2}, [{"name": "unet", "params": resumed, "lr": 1e-2}])
    load_optimizer_state(opt, old_opt.state_dict())
    assert opt.param_groups[0]["fused"] is True and opt.param_groups[0]["foreach"] is None
    apply(opt, resumed, grads[2:])
    for p, q in zip(resumed, ref):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
