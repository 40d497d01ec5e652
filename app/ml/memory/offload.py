"""Activation offload: tensors autograd saves for backward are kept in host memory.

With gradient checkpointing only each block's input is saved between forward and backward; this
moves those (and any other saved tensor above ``min_bytes``) to the host, pinned on CUDA so the
copies are asynchronous, and brings each back when backward unpacks it. Gradients are unchanged:
the same values come back. Small tensors stay where they are - the round trip costs more than it saves.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


@contextmanager
def activations_on_host(enabled: bool = True, min_bytes: int = 1 << 16, counter: dict | None = None,
                        copy_host_tensors: bool = False) -> Iterator[None]:
    """Run forward passes inside this block to keep their saved activations on the host.

    ``counter`` (a dict) receives ``offloaded`` (count) and ``bytes`` - for tests and the run report.
    ``copy_host_tensors`` copies tensors already on the host too (nothing to gain; it lets the
    round trip run on a machine without a GPU).
    """
    if not enabled:
        yield
        return
    stats = counter if counter is not None else {}
    stats.setdefault("offloaded", 0)
    stats.setdefault("bytes", 0)

    def pack(t: torch.Tensor):
        size = t.numel() * t.element_size()
        if size < min_bytes or (t.device.type == "cpu" and not copy_host_tensors):
            return t
        stats["offloaded"] += 1
        stats["bytes"] += size
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=t.device.type == "cuda")
        return (t.device, host)

    def unpack(packed):
        if isinstance(packed, torch.Tensor):
            return packed
        device, host = packed
        return host.to(device, non_blocking=True)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield
