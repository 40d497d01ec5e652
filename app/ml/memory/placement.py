"""Where a model's components live during a run: nothing idle on the compute device.

A training step needs the denoiser (and the text encoders when they train) on the device; with
cached latents and cached text the VAE and the text encoders are not needed at all, and without a
cache they are needed only for a moment, to encode. Keeping them on the device anyway costs their
whole size at the step's peak (Flux's T5 alone is 9.5 GB in bf16). So components stay in host RAM
and *visit* the device: ``visit`` brings them in for an encode or a sample and puts each back where
it was afterwards.

``mover(module, target, skip)`` replaces the real ``module.to(...)`` (``skip``: submodules left where
they are); tests on a machine whose only device is the CPU
pass one that records (or poisons) what is "on the host", so a test can check where every
component is at every point of a step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.nn as nn

DEVICE, HOST = "device", "host"

_ACTIVE: list["Placement"] = []  # the placement of the run in progress (sampling inside training uses it)


class Placement:
    """Moves components between the compute ``device`` and host RAM and remembers where each is."""

    def __init__(self, device: torch.device | str, mover: Callable[[nn.Module, str], None] | None = None):
        self.device = torch.device(device)
        self._mover = mover
        self._where: dict[int, str] = {}

    @property
    def instrumented(self) -> bool:
        return self._mover is not None

    def where(self, module: nn.Module) -> str:
        """DEVICE or HOST: as last moved here, else where its first parameter is."""
        if id(module) in self._where:
            return self._where[id(module)]
        p = next(module.parameters(), None)
        return DEVICE if p is None or _same(p.device, self.device) else HOST

    def move(self, module: nn.Module, target: str) -> None:
        if self.where(module) != target or id(module) not in self._where:
            if self._mover is not None:
                self._mover(module, target, ())
            else:
                module.to(self.device if target == DEVICE else "cpu")
        self._where[id(module)] = target

    def move_parts(self, module: nn.Module, target: str, skip: list[nn.Module]) -> None:
        """Move ``module`` except the submodules in ``skip`` (the blocks block swap streams), so the
        device never holds the whole denoiser at once."""
        if self._mover is not None:
            self._mover(module, target, skip)
        else:
            dev = self.device if target == DEVICE else torch.device("cpu")
            skipped = {id(m) for m in skip}

            def walk(m: nn.Module) -> None:
                if id(m) in skipped:
                    return
                m._apply(lambda t: t.to(dev), recurse=False)
                for child in m.children():
                    walk(child)

            walk(module)
        self._where[id(module)] = target

    @contextmanager
    def visit(self, *modules: nn.Module) -> Iterator[None]:
        """``modules`` on the device for the block, then each back where it was."""
        before = [(m, self.where(m)) for m in modules if m is not None]
        for m, _ in before:
            self.move(m, DEVICE)
        try:
            yield
        finally:
            for m, was in before:
                self.move(m, was)

    @contextmanager
    def active(self) -> Iterator["Placement"]:
        """Make this the placement sampling uses while a run is in progress."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.remove(self)


def current(device: torch.device | str | None = None) -> Placement:
    """The running training's placement, else one for ``device`` (default: CUDA when there is one)."""
    if _ACTIVE:
        return _ACTIVE[-1]
    return Placement(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)

