"""Resolution text as the Bucketer and Augment nodes take it: '512', '512,768,1024' or '1024x768'.

Pure Python, so validating a recipe (no torch, no numpy) can check it before anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Resolution:
    """Parsed resolution text: target sizes R (one drawn per sample per epoch) or a fixed W x H."""

    targets: tuple[int, ...] = ()
    fixed: tuple[int, int] | None = None  # (width, height)

    @property
    def max_target(self) -> int:
        if self.fixed:
            return max(self.fixed)
        return max(self.targets)


def parse_resolution(text: str | int) -> Resolution:
    """"512" -> R=512; "512,768,1024" -> multi-resolution; "1024x768" -> fixed width 1024, height 768."""
    s = str(text).strip().lower().replace(" ", "")
    try:
        if "x" in s:
            w, h = s.split("x")
            res = Resolution(fixed=(int(w), int(h)))
            if min(res.fixed) < 1:
                raise ValueError
            return res
        targets = tuple(int(p) for p in s.split(",") if p)
        if not targets or min(targets) < 1:
            raise ValueError
        return Resolution(targets=targets)
    except ValueError:
        raise ValueError(
            f"resolution {text!r} not understood; use e.g. '512', '512,768,1024' or '1024x768' (width x height)"
        ) from None


def resolution_problem(text: str) -> str | None:
    """Why ``text`` is not a resolution, or None (a param check for the node specs)."""
    try:
        parse_resolution(text)
    except ValueError as e:
        return str(e)
    return None


def optional_resolution_problem(text: str) -> str | None:
    """As ``resolution_problem``, but empty text (no override) is fine."""
    return resolution_problem(text) if str(text).strip() else None
