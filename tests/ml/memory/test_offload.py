"""Activation offload: checkpointed activations go through the host and gradients stay identical."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from app.ml.memory.offload import activations_on_host


def _grads(offload, use_checkpoint, counter=None):
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)) for _ in range(3)])
    x = torch.randn(32, 64, requires_grad=True)
    with activations_on_host(offload, min_bytes=1024, counter=counter, copy_host_tensors=True):
        h = x
        for b in blocks:
            h = h + (checkpoint(b, h, use_reentrant=False) if use_checkpoint else b(h))
        loss = h.square().mean()
    loss.backward()
    return [p.grad.clone() for p in blocks.parameters()] + [x.grad.clone()]


@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_gradients_identical_with_offload(use_checkpoint):
    stats = {}
    ref = _grads(False, use_checkpoint)
    got = _grads(True, use_checkpoint, stats)
    assert stats["offloaded"] > 0 and stats["bytes"] >= 32 * 64 * 4
    assert all(torch.equal(a, b) for a, b in zip(ref, got))


def test_small_tensors_and_host_tensors_stay():
    stats = {}
    _grads(True, True, stats)
    few = stats["offloaded"]
    stats2 = {}
    with activations_on_host(True, counter=stats2):  # CPU tensors are already on the host
        x = torch.randn(512, 512, requires_grad=True)
        (x * x).sum().backward()
    assert stats2["offloaded"] == 0 and few > 0
