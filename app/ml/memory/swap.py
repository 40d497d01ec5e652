"""Block swap: keep N blocks of a ModuleList on the compute device, stream the others from host memory.

The first ``resident - 1`` blocks stay on the device; the remaining ("streamed") blocks share one
slot and are brought in just before they run, in forward and in backward, with ``prefetch`` more
on their way. So at most ``resident + prefetch`` blocks are on the device at any moment.

* Forward: a forward pre-hook makes the block resident (waiting for its copy if one is in flight),
  starts copying the next streamed block(s) in forward order and sends the other streamed blocks
  back to host memory.
* Backward: blocks are needed in reverse order. A full backward pre-hook brings the block in before
  its gradients are computed (the autograd graph holds the block's weights by reference, so moving
  the parameters' data back restores what backward reads) and prefetches the previous block. With
  gradient checkpointing the recompute runs the block's forward inside backward; the forward
  pre-hook sees that (``in_backward``) and prefetches in backward order.

On CUDA the copies run on a side stream from pinned host buffers and the compute stream waits on a
per-block event, so copies overlap compute. On CPU (or with ``mover=``) moves are synchronous; tests
pass a mover that only records a tag per block (or poisons off-device weights) to check the schedule.
"""

from __future__ import annotations

from typing import Callable

import warnings

import torch
import torch.nn as nn

DEVICE, HOST = "device", "host"

# the backward pre-hook on a block whose input needs no gradient (the first block under a LoRA) is
# exactly what block swap wants; torch warns about it on every step
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect "
                                          "to module outputs since no inputs require gradients")


def in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block's recompute)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class _CudaMover:
    """Moves a block's tensors between the device and pinned host buffers on a side stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.events: dict[int, torch.cuda.Event] = {}
        self.pinned: dict[int, list[torch.Tensor]] = {}

    def __call__(self, index: int, block: nn.Module, target: str) -> None:
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # the block's last use on the compute stream comes first
        with torch.cuda.stream(self.stream):
            if target == DEVICE:
                block.to(self.device, non_blocking=True)
            else:
                buffers = self.pinned.setdefault(index, [])
                counter = iter(range(1 << 30))

                def to_pinned(t: torch.Tensor) -> torch.Tensor:
                    i = next(counter)
                    if i == len(buffers):
                        buffers.append(torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
                    t.record_stream(self.stream)
                    return buffers[i].copy_(t, non_blocking=True)

                block._apply(to_pinned)
            for t in list(block.parameters()) + list(block.buffers()):
                if t.device.type == "cuda":
                    t.record_stream(compute)  # allocated on the side stream, used on the compute stream
            event = torch.cuda.Event()
            event.record(self.stream)
            self.events[index] = event

    def wait(self, index: int) -> None:
        event = self.events.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)


class BlockSwap:
    """Install block swap on ``blocks`` (see the module docstring); ``remove()`` takes it off and
    brings every block back to the device."""

    def __init__(self, blocks: nn.ModuleList, resident: int, device: torch.device | str, *, prefetch: int = 1,
                 mover: Callable[[int, nn.Module, str], None] | None = None, where: str = "BlockSwap"):
        n = len(blocks)
        if not 1 <= resident <= n:
            raise ValueError(f"{where}: blocks resident must be between 1 and {n} (the number of blocks), got {resident}")
        if prefetch < 0:
            raise ValueError(f"{where}: prefetch must be 0 or more, got {prefetch}")
        self.blocks = blocks
        self.device = torch.device(device)
        self.resident, self.prefetch = int(resident), int(prefetch)
        self.fixed = self.resident - 1  # blocks [0, fixed) never move
        self.streamed = list(range(self.fixed, n))
        if mover is not None:
            self._move, self._wait = mover, lambda index: None
        elif self.device.type == "cuda":
            cuda = _CudaMover(self.device)
            self._move, self._wait = cuda, cuda.wait
        else:
            self._move = lambda index, block, target: block.to(self.device if target == DEVICE else "cpu")
            self._wait = lambda index: None
        self.where: dict[int, str] = {}
        for i, block in enumerate(blocks):
            target = DEVICE if i < self.fixed or i == self.fixed else HOST  # the slot starts with the first streamed
            self._set(i, target)
        self._handles = []
        for i, block in enumerate(blocks):
            if i >= self.fixed:
                self._handles.append(block.register_forward_pre_hook(self._forward_hook(i)))
                self._handles.append(block.register_full_backward_pre_hook(self._backward_hook(i)))

    # -- moves ------------------------------------------------------------------------------
    def _set(self, index: int, target: str) -> None:
        if self.where.get(index) != target:
            self._move(index, self.blocks[index], target)
            self.where[index] = target

    def on_device(self) -> list[int]:
        return sorted(i for i, w in self.where.items() if w == DEVICE)

    def _next(self, index: int, backward: bool) -> list[int]:
        """The next ``prefetch`` streamed blocks after ``index`` in this pass's order."""
        pos = self.streamed.index(index)
        order = self.streamed[pos - 1::-1] if backward else self.streamed[pos + 1:]
        if not backward and len(order) < self.prefetch:
            order = order + self.streamed[:pos]  # wrap: the next step's forward (sampling, no backward)
        return order[: self.prefetch]

    def _bring(self, index: int, backward: bool) -> None:
        ahead = self._next(index, backward)
        keep = {index, *ahead}
        for j in self.streamed:  # first free the slot, so the device never holds more than resident + prefetch
            if j not in keep:
                self._set(j, HOST)
        self._set(index, DEVICE)
        self._wait(index)
        for j in ahead:
            self._set(j, DEVICE)

    def _forward_hook(self, index: int):
        def hook(module, args):
            self._bring(index, backward=in_backward())
        return hook

    def _backward_hook(self, index: int):
        def hook(module, grad_output):
            self._bring(index, backward=True)
        return hook

    def remove(self, target: str = DEVICE) -> None:
        """Take the hooks off and put every block on ``target`` (HOST: the end of a run, when the
        whole model goes back to RAM without first gathering on the device)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in range(len(self.blocks)):
            self._set(i, target)
            self._wait(i)
        if target == HOST and isinstance(self._move, _CudaMover):
            torch.cuda.synchronize(self.device)  # the copies into host buffers are complete before RAM is read
