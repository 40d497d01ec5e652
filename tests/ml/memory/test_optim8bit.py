"""bitsandbytes' 8-bit AdamW and Lion run on CPU through the project's optimizer builder."""
from __future__ import annotations

import pytest
import torch

from app.ml.train.optim import build_optimizer

pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("name", ["adamw8bit", "lion8bit"])
def test_8bit_optimizer_reduces_a_loss_on_cpu(name):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(64, 64))  # >= 4096 elements: bitsandbytes keeps its state in 8 bits
    target = torch.randn(64, 64)
    opt = build_optimizer({"optimizer": name, "lr": 1e-2, "weight_decay": 0.0},
                          [{"name": "unet", "params": [w], "lr": 1e-2}])
    start = (w.detach() - target).square().mean().item()
    for _ in range(100):
        opt.zero_grad()
        loss = (w - target).square().mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * start, (name, start, loss.item())
    state = opt.state[w]
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit
