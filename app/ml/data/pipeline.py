"""What flows on the BUCKETS socket: a dataset plus how it is bucketed and batched, and
(after a Cache node) where its latents and text embeddings are cached.

Planning stays lazy: a Buckets value is cheap, and each epoch's plan is a pure function of
(seed, epoch), so TrainLoop plans epochs as it reaches them and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bucketing import BucketSettings
from .concept import Dataset


@dataclass(frozen=True)
class CacheSpec:
    folder: Path
    vae_identity: str  # latents are valid only for this VAE (and dtype)
    text_identity: str | None  # None: captions are encoded on the fly (e.g. a text encoder trains)
    variations: int = 1  # cached augmentation draws; epoch e uses variation (e + k) mod N


@dataclass(frozen=True)
class Buckets:
    dataset: Dataset
    settings: BucketSettings
    batch_size: int
    leftover: str = "drop"  # drop | repeat | keep
    cache: CacheSpec | None = None
