"""On-disk latent and text-encoder caches keyed by content, not by file name.

A latent's key is the sha256 of (image bytes, encoder identity, bucket, resize, crop box,
augmentation draw, resample filter), so changing one image re-encodes exactly that image,
changing the VAE re-encodes everything, and an unchanged second run encodes nothing — no
"clear cache before training" switch and no stale `.npz` files beside the images. Entries are
safetensors files written atomically (temp file, then os.replace), so a crash or a parallel
run never leaves a half-written entry that a later run would trust.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from app.atomic import atomic_file

from .batches import PlannedItem, load_item
from .errors import DataError, check_cancelled

_SINGLE = "__value__"
_digest_memo: dict[tuple[str, int, int], str] = {}
_memo_lock = threading.Lock()


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, memoised by (path, size, mtime) within the process."""
    p = str(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", p) from exc
    memo_key = (p, st.st_size, st.st_mtime_ns)
    with _memo_lock:
        hit = _digest_memo.get(memo_key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read file ({exc.strerror or exc})", p) from exc
    digest = h.hexdigest()
    with _memo_lock:
        _digest_memo[memo_key] = digest
    return digest


def _sha(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        b = part.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


def _pack(value) -> dict[str, np.ndarray]:
    if isinstance(value, dict):
        if _SINGLE in value:
            raise ValueError(f"{_SINGLE!r} is reserved")
        return {k: np.ascontiguousarray(v) for k, v in value.items()}
    return {_SINGLE: np.ascontiguousarray(value)}


def _unpack(tensors: dict[str, np.ndarray]):
    return tensors[_SINGLE] if set(tensors) == {_SINGLE} else tensors


@dataclass
class CacheResult:
    values: list  # one array (or dict of arrays) per input, in input order
    hits: int
    misses: int


class _Store:
    """Content-addressed safetensors files under folder/kind/ab/abcdef....safetensors."""

    def __init__(self, folder: str | Path, kind: str, encoder_identity: str):
        if not encoder_identity:
            raise ValueError("encoder_identity must name the encoder (model + weights hash/version)")
        self.folder = Path(folder) / kind
        self.encoder_identity = encoder_identity
        self.hits = 0
        self.misses = 0

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str, log=None):
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            return _unpack(load_file(str(path)))
        except Exception as exc:  # damaged entry: re-encode rather than fail or trust it
            if log is not None:
                log(f"cache entry {path} is unreadable ({exc}); re-encoding it")
            return None

    def save(self, key: str, value, metadata: dict[str, str]) -> None:
        with atomic_file(self.path_for(key), overwrite=True) as target:
            save_file(_pack(value), str(target.tmp), metadata=metadata)

    def run(self, keys: list[str], make_inputs: Callable[[list[int]], list], encode_fn, batch_size: int,
            group_of: Callable[[int], object], metadata_of: Callable[[int], dict], progress, check_cancel, log):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        n = len(keys)
        values: list = [None] * n
        first_of: dict[str, int] = {}
        todo: dict[object, list[int]] = {}
        hits = 0
        for i, key in enumerate(keys):
            if key in first_of:
                continue
            first_of[key] = i
            v = self.load(key, log)
            if v is None:
                todo.setdefault(group_of(i), []).append(i)
            else:
                values[i] = v
                hits += 1
        misses = sum(len(v) for v in todo.values())
        done = 0
        if progress is not None:
            progress(0, misses)
        for group in todo.values():  # one shape per group, so encode_fn can stack
            for k in range(0, len(group), batch_size):
                check_cancelled(check_cancel)
                chunk = group[k:k + batch_size]
                outputs = list(encode_fn(make_inputs(chunk)))
                if len(outputs) != len(chunk):
                    raise ValueError(f"encode_fn returned {len(outputs)} results for {len(chunk)} inputs")
                for i, out in zip(chunk, outputs):
                    self.save(keys[i], out, metadata_of(i))
                    values[i] = out
                done += len(chunk)
                if progress is not None:
                    progress(done, misses)
        for i, key in enumerate(keys):  # duplicates share the first occurrence's value
            if values[i] is None:
                values[i] = values[first_of[key]]
        self.hits += hits
        self.misses += misses
        if log is not None:
            log(f"{self.folder.name} cache: {hits} hits, {misses} encoded")
        return CacheResult(values, hits, misses)


class _Counted:
    """Hit and miss counts of the store behind a cache."""

    _store: "_Store"

    @property
    def hits(self) -> int:
        return self._store.hits

    @property
    def misses(self) -> int:
        return self._store.misses


class LatentCache(_Counted):
    """Latents (e.g. VAE outputs) of planned items.

    encoder_identity must change whenever the encoder's output would (model name + weights hash,
    dtype, scaling): it is part of every key. Random augmentation is part of the key too, so
    plan with variations=N to let the cache hold N draws per image (epoch e uses e mod N);
    without it every new per-epoch draw is a miss.
    """

    def __init__(self, folder: str | Path, encoder_identity: str, *, resample: str = "lanczos"):
        self._store = _Store(folder, "latents", encoder_identity)
        self.resample = resample

    def key_for(self, item: PlannedItem) -> str:
        return _sha(
            "latent-v1", file_digest(item.path), self._store.encoder_identity,
            "bucket=%dx%d" % item.bucket, "resize=%dx%d" % item.resize, "crop=%d,%d,%d,%d" % item.crop,
            item.augment_params.key(), "resample=" + self.resample,
        )

    def path_for(self, item: PlannedItem) -> Path:
        return self._store.path_for(self.key_for(item))

    def get_or_encode(self, items: Sequence[PlannedItem], encode_fn, batch_size: int = 8, progress=None,
                      *, check_cancel=None, log=None) -> CacheResult:
        """Cached latents for `items`, encoding (in batches of one bucket) only the misses.

        encode_fn(list of float32 CHW arrays in [-1, 1]) -> list of arrays (or dicts of arrays).
        """
        items = list(items)
        keys = [self.key_for(it) for it in items]

        def inputs(idx):
            return [load_item(items[i], resample=self.resample).image for i in idx]

        def meta(i):
            it = items[i]
            return {"source": str(it.path), "encoder": self._store.encoder_identity,
                    "bucket": "%dx%d" % it.bucket, "crop": "%d,%d,%d,%d" % it.crop,
                    "augment": it.augment_params.key()}

        return self._store.run(keys, inputs, encode_fn, batch_size, lambda i: items[i].bucket, meta,
                               progress, check_cancel, log)


class TextCache(_Counted):
    """Text-encoder outputs keyed by (caption text, encoder identity); only for frozen encoders."""

    def __init__(self, folder: str | Path, encoder_identity: str):
        self._store = _Store(folder, "text", encoder_identity)

    def key_for(self, text: str) -> str:
        return _sha("text-v1", text, self._store.encoder_identity)

    def get_or_encode(self, texts: Sequence[str], encode_fn, batch_size: int = 32, progress=None,
                      *, check_cancel=None, log=None) -> CacheResult:
        """encode_fn(list of str) -> list of arrays (or dicts of arrays, e.g. hidden + pooled)."""
        texts = list(texts)
        keys = [self.key_for(t) for t in texts]
        return self._store.run(
            keys, lambda idx: [texts[i] for i in idx], encode_fn, batch_size, lambda i: 0,
            lambda i: {"encoder": self._store.encoder_identity, "text": texts[i][:1000]},
            progress, check_cancel, log,
        )
