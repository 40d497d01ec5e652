"""The instrumented mover the placement tests hand to ``Placement``: on this CPU the device and the host
are the same memory, so it records where each module is and, while a module is "in RAM", replaces its
weights by NaN (the real ones kept aside), so any use of a module that is not on the device shows."""
from __future__ import annotations

import torch

from app.ml.memory.placement import DEVICE, HOST


class Mover:
    """Records where each module is (``where``, and every move in ``moves``); a module "in RAM" holds NaN
    weights until it comes back. ``on_move()`` is called after each move."""

    def __init__(self, on_move=None):
        self.where, self.saved, self.moves, self.on_move = {}, {}, [], on_move

    def __call__(self, module, target, skip=()):
        skipped = {id(p) for m in skip for p in m.parameters()}
        for p in module.parameters():  # kept per parameter: a block moves alone and with its model
            if id(p) in skipped:
                continue
            if target == HOST and id(p) not in self.saved:
                self.saved[id(p)] = (p, p.data)
                p.data = torch.full_like(p.data, float("nan"))
            elif target == DEVICE and id(p) in self.saved:
                p.data = self.saved.pop(id(p))[1]
        self.where[id(module)] = target
        self.moves.append((id(module), target))
        if self.on_move is not None:
            self.on_move()

    def restore(self):
        for p, data in self.saved.values():
            p.data = data
        self.saved.clear()
