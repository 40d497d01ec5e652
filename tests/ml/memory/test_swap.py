"""Block swap schedule on CPU: a mover records where each block is (and poisons off-device weights)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from app.ml.memory.swap import DEVICE, HOST, BlockSwap, in_backward


class Block(nn.Module):
    def __init__(self, index, dim=16):
        super().__init__()
        self.index = index
        self.lin = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.swap = None  # set by the test: asserts residency when the block computes

    def forward(self, x):
        self.swap.check(self.index, "backward" if in_backward() else "forward")
        h = self.lin(self.norm(x))
        if h.requires_grad:
            h.register_hook(lambda g: self.swap.check(self.index, "backward") or g)
        return x + torch.tanh(h)


class Recorder:
    """The instrumented mover: keeps the real weights aside while a block is 'on the host' and
    fills the block's tensors with NaN, so any use off the device shows in the gradients."""

    def __init__(self):
        self.where, self.log, self.saved, self.max_resident, self.swap = {}, [], {}, 0, None

    def __call__(self, index, block, target):
        # data is swapped the way a real move does it (param.data = ...), not written in place
        if target == HOST:
            self.saved[index] = [p.data for p in block.parameters()]
            for p in block.parameters():
                p.data = torch.full_like(p.data, float("nan"))
        elif index in self.saved:
            for p, s in zip(block.parameters(), self.saved.pop(index)):
                p.data = s
        self.where[index] = target
        self.log.append((index, target))
        self.max_resident = max(self.max_resident, sum(w == DEVICE for w in self.where.values()))

    def check(self, index, phase):
        assert self.where[index] == DEVICE, f"block {index} runs {phase} while on the host"
        self.log.append((index, phase))


def _model(n=6):
    torch.manual_seed(0)
    return nn.ModuleList([Block(i) for i in range(n)])


def _run(blocks, x, use_checkpoint=False):
    for b in blocks:
        x = checkpoint(b, x, use_reentrant=False) if use_checkpoint else b(x)
    return x.square().mean()


class _NoSwap:
    def check(self, index, phase):
        pass


@pytest.mark.parametrize("resident,prefetch", [(1, 0), (2, 1), (3, 2), (6, 1)])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_schedule_and_gradients_match_no_swap(resident, prefetch, use_checkpoint):
    ref = _model()
    for b in ref:
        b.swap = _NoSwap()
    x = torch.randn(4, 16)
    _run(ref, x, use_checkpoint).backward()

    blocks = _model()
    rec = Recorder()
    for b in blocks:
        b.swap = rec
    swap = BlockSwap(blocks, resident, "cpu", prefetch=prefetch, mover=rec)
    for step in range(2):  # the second step starts from the state the first one left
        for b in blocks:
            b.zero_grad()
        rec.log.clear()
        _run(blocks, x, use_checkpoint).backward()
        for r, b in zip(ref, blocks):
            for pr, pb in zip(r.parameters(), b.parameters()):
                assert torch.equal(pr.grad, pb.grad)
        ran = [e for e in rec.log if e[1] in ("forward", "backward")]
        assert [i for i, p in ran if p == "forward"][:6] == list(range(6))
        assert {i for i, p in ran if p == "backward"} == set(range(6))
    assert rec.max_resident <= resident + prefetch
    if resident < 6:
        assert any(t == HOST for _, t in rec.log)  # blocks really were streamed
    swap.remove()
    assert all(w == DEVICE for w in rec.where.values())
    assert all(torch.isfinite(p).all() for p in blocks.parameters())


def test_backward_streams_in_reverse_order():
    blocks = _model()
    rec = Recorder()
    for b in blocks:
        b.swap = rec
    BlockSwap(blocks, 1, "cpu", prefetch=0, mover=rec)
    rec.log.clear()
    _run(blocks, torch.randn(2, 16)).backward()
    brought = [i for i, t in rec.log if t == DEVICE]
    # forward brings 1..5 in order (0 starts in the slot); backward brings 4..0 back in reverse
    assert brought == [1, 2, 3, 4, 5, 4, 3, 2, 1, 0]


def test_sampling_prefetch_wraps_to_the_next_step():
    blocks = _model(4)
    rec = Recorder()
    for b in blocks:
        b.swap = rec
    BlockSwap(blocks, 2, "cpu", prefetch=1, mover=rec)
    with torch.no_grad():
        _run(blocks, torch.randn(2, 16))
    assert rec.where[1] == DEVICE  # block 1 (first streamed) is already on its way for the next step


def test_real_moves_on_cpu_and_bad_settings():
    blocks = _model(3)
    for b in blocks:
        b.swap = _NoSwap()
    swap = BlockSwap(blocks, 2, "cpu")
    _run(blocks, torch.randn(2, 16)).backward()
    swap.remove()
    with pytest.raises(ValueError, match="Swap: blocks resident must be between 1 and 3"):
        BlockSwap(blocks, 0, "cpu", where="Swap")
