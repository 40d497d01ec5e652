"""Optimizers and learning-rate schedules, built from the plain settings an Optimizer node carries.

The settings are data (a dict), so they can be cached, shown and saved in a backup; the torch
objects are built by the training loop once it knows which parameters train.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

from app.ml.train.names import OPTIMIZERS, SCHEDULES
ADAPTIVE = {"prodigy", "dadapt_adam"}


class OptimizerError(ValueError):
    pass


def build_optimizer(settings: dict, groups: list[dict]) -> torch.optim.Optimizer:
    """`groups`: torch param groups, each with "params", "lr" and a "name" (unet, text_encoder, ...)."""
    name = settings.get("optimizer", "adamw")
    groups = [g for g in groups if list(g["params"])]
    if not groups:
        raise OptimizerError("nothing to train: no parameter requires a gradient")
    betas = (float(settings.get("beta1", 0.9)), float(settings.get("beta2", 0.999)))
    eps = float(settings.get("eps", 1e-8))
    wd = float(settings.get("weight_decay", 0.01))
    lr = groups[0]["lr"]
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, **_fused(groups))
    if name in ("adamw8bit", "lion8bit"):
        bnb = _bitsandbytes(name)
        cls = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.Lion8bit
        kwargs = {"eps": eps} if name == "adamw8bit" else {}
        return cls(groups, lr=lr, betas=betas, weight_decay=wd, **kwargs)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas, weight_decay=wd)
    if name == "sgd_nesterov":
        return torch.optim.SGD(groups, lr=lr, momentum=betas[0], nesterov=True, weight_decay=wd, **_fused(groups))
    if name == "adafactor":
        from transformers.optimization import Adafactor

        relative = bool(settings.get("relative_step", False))
        for g in groups:
            if relative:
                g["lr"] = None
        return Adafactor(groups, lr=None if relative else lr, eps=(1e-30, 1e-3), clip_threshold=1.0,
                         decay_rate=-0.8, beta1=None, weight_decay=wd, scale_parameter=relative,
                         relative_step=relative, warmup_init=False)
    if name == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, decouple=True,
                       use_bias_correction=bool(settings.get("bias_correction", True)),
                       safeguard_warmup=bool(settings.get("safeguard_warmup", True)),
                       d_coef=float(settings.get("d_coef", 1.0)))
    if name == "dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd, decouple=True,
                          d0=1e-6, growth_rate=float("inf"))
    if name == "schedulefree_adamw":
        from schedulefree import AdamWScheduleFree

        opt = AdamWScheduleFree(groups, lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                warmup_steps=int(settings.get("warmup", 0)) if settings.get("warmup", 0) >= 1 else 0)
        opt.train()
        return opt
    raise OptimizerError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


_FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fused(groups: list[dict]) -> dict:
    """Fused kernels where every parameter allows them (CUDA or CPU, float): one kernel per step
    instead of a handful of ops per tensor. On a LoRA's hundreds of small tensors the per-tensor
    loop costs milliseconds a step (measured 4.3 ms vs 0.7 ms for 192 tensors on one CPU core)."""
    params = [p for g in groups for p in g["params"]]
    ok = all(p.device.type in ("cuda", "cpu") and p.dtype in _FUSED_DTYPES for p in params)
    return {"fused": True} if ok and len({p.device for p in params}) == 1 else {}


FUSED_OPTIMIZERS = ("adamw", "adafactor")  # per-parameter updates, as kohya's fused_backward_pass allows


class FusedBackward:
    """The optimizer steps each parameter inside backward, as soon as its gradient is complete, and
    frees that gradient at once (kohya's ``--fused_backward_pass``, OneTrainer's "fused back pass").

    A full fine-tune then never holds every gradient at the same time: the step's peak loses about
    the model's size in gradients. The update is the unfused one for optimizers whose step treats
    each parameter on its own (AdamW, Adafactor); what it rules out: accumulating gradients over
    micro-batches and clipping by the norm over all parameters. ``clip_grad_norm`` > 0 clips each
    parameter's gradient to that norm on its own, as kohya does with fused_backward_pass.
    ``before_step([p])`` runs first (averaging the gradient across ranks).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clip_grad_norm: float = 0.0, before_step=None):
        self.optimizer = optimizer
        self.clip = float(clip_grad_norm)
        self.before_step = before_step
        self._handles = []
        for gi, group in enumerate(optimizer.param_groups):
            for p in group["params"]:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(gi)))

    def _hook(self, gi: int):
        def step(p: torch.Tensor) -> None:
            if self.before_step is not None:
                self.before_step([p])
            if self.clip > 0:
                torch.nn.utils.clip_grad_norm_([p], self.clip)
            groups = self.optimizer.param_groups
            kept = [g["params"] for g in groups]
            try:  # a step over this one parameter: the others' lists are empty meanwhile
                for i, g in enumerate(groups):
                    g["params"] = [p] if i == gi else []
                self.optimizer.step()
            finally:
                for g, params in zip(groups, kept):
                    g["params"] = params
            p.grad = None

        return step

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a backup's optimizer state, keeping this optimizer's kernel choice (fused or not): a
    backup written with other kernels (an older version, another machine) resumes all the same."""
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, chosen in zip(optimizer.param_groups, kernels):
        group.update(chosen)
        if group.get("fused"):  # fused kernels keep the step count as a float32 tensor beside the weights
            for p in group["params"]:
                st = optimizer.state.get(p, {})
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].to(device=p.device, dtype=torch.float32)


def _bitsandbytes(name: str):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise OptimizerError(f"{name} needs bitsandbytes: pip install 'bitsandbytes>=0.49' (it runs on CPU and "
                             "CUDA), or choose adamw / lion") from None
    return bnb


def lr_factor(step: int, total_steps: int, settings: dict) -> float:
    """The schedule's multiplier of the base learning rate at `step` (0-based)."""
    schedule = settings.get("schedule", "constant")
    warmup = float(settings.get("warmup", 0.0))
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)
    min_factor = float(settings.get("min_factor", 0.0))
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    p = min(1.0, max(0.0, (step - warmup_steps) / span))
    if schedule == "constant":
        f = 1.0
    elif schedule == "linear":
        f = 1.0 - p
    elif schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * p))
    elif schedule == "cosine_restarts":
        cycles = max(1, int(settings.get("cycles", 1)))
        f = 0.5 * (1.0 + math.cos(math.pi * ((p * cycles) % 1.0))) if p < 1.0 else 0.0
    elif schedule == "polynomial":
        f = (1.0 - p) ** float(settings.get("power", 1.0))
    else:
        raise OptimizerError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    return min_factor + (1.0 - min_factor) * f


def build_scheduler(optimizer: torch.optim.Optimizer, settings: dict, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, settings))


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; use a 3-10x lower LR than AdamW."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["exp_avg"] = torch.zeros_like(p)
            moms = [self.state[p]["exp_avg"] for p in params]
            # one multi-tensor op per line instead of a loop over the (many, small) adapter tensors
            if group["weight_decay"]:
                torch._foreach_mul_(params, 1 - group["lr"] * group["weight_decay"])
            updates = torch._foreach_mul(moms, b1)
            torch._foreach_add_(updates, grads, alpha=1 - b1)
            torch._foreach_sign_(updates)
            torch._foreach_add_(params, updates, alpha=-group["lr"])
            torch._foreach_mul_(moms, b2)
            torch._foreach_add_(moms, grads, alpha=1 - b2)
        return loss
