"""Randomness as a pure function of (seed, epoch or variation, sample, purpose).

No global or stateful generator is shared between samples, so the same draw comes out in any
process, in any order, with any number of workers, and a run resumed at epoch 3 sees exactly what
a continuous run saw. Each purpose (flip, crop, caption line, ...) gets its own stream, so turning
one augmentation on does not change the draws of the others.
"""
from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable

import numpy as np

# Kinds of the "time" coordinate: a per-epoch draw, or a cached-variation draw (epoch % n).
EPOCH = 0
VARIATION = 1

_MASK64 = (1 << 64) - 1


def purpose_id(purpose: str) -> int:
    """Stable id for a purpose name (crc32: identical in every process, unlike hash())."""
    return zlib.crc32(purpose.encode("utf-8"))


def _words(value) -> list[int]:
    if isinstance(value, (tuple, list)):
        out = [len(value)]
        for v in value:
            out.extend(_words(v))
        return out
    return [int(value) & _MASK64]


def rng_for(seed: int, epoch: int, index, purpose: str, *, variation: int | None = None) -> np.random.Generator:
    """Generator for one draw. `index` is an int or a tuple of ints identifying the sample.

    If `variation` is given the draw depends on it instead of the epoch (cached variations).
    """
    kind, t = (VARIATION, variation) if variation is not None else (EPOCH, epoch)
    entropy = [purpose_id(purpose), int(seed) & _MASK64, kind, int(t) & _MASK64, *_words(index)]
    return np.random.default_rng(entropy)


def stable_key(*parts: str) -> int:
    """A 63-bit id from strings (e.g. concept name + relative path), stable across runs.

    Used as a sample's rng index so adding a file to a folder does not change the draws (and
    cache keys) of the other files.
    """
    h = hashlib.sha256("\x1f".join(parts).encode("utf-8")).digest()
    return int.from_bytes(h[:8], "little") >> 1


def permutation(n: int, seed: int, index: Iterable[int] | int, purpose: str, cycle: int = 0) -> np.ndarray:
    """Deterministic permutation of range(n), one per cycle."""
    return rng_for(seed, cycle, index, purpose).permutation(n)
