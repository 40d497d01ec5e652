"""Turns a BUCKETS value into training batches: plan each epoch (pure in seed and epoch), load
the pixels (or cached latents and text embeddings) of one batch, and hand the loop tensors.

Loading overlaps with training: the next batch is read on a background thread while the model
works on the current one, so a GPU does not wait on JPEG decoding.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from app.ml.data.batches import EpochPlan, load_item, plan_epoch, plan_validation, stack_batch
from app.ml.data.cache import LatentCache, TextCache
from app.ml.data.pipeline import Buckets
from app.ml.train.loop import Batch


class BucketSource:
    def __init__(self, buckets: Buckets, seed: int, bundle=None, *, world: int = 1, validation: bool = False,
                 masks: bool = False, loader_threads: int = 2, log=None, captions=None) -> None:
        self.buckets = buckets
        self.captions = captions  # caption -> the text encoded (embedding placeholders); None: as written
        self.seed = seed
        self.bundle = bundle
        self.world = world
        self.validation = validation
        self.masks = masks
        self.log = log
        self._plans: dict[int, EpochPlan] = {}
        self._counts: dict[int, int] = {}  # batches per epoch, kept after the plan itself is let go
        self._reported = False
        self._plan_lock = threading.Lock()  # the loader thread plans too
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="loader")
        self._next: tuple[tuple[int, int, int], Future] | None = None
        cache = buckets.cache
        self.latents = LatentCache(cache.folder, cache.vae_identity) if cache else None
        self.texts = TextCache(cache.folder, cache.text_identity) if cache and cache.text_identity else None

    # ---- planning --------------------------------------------------------------------------
    def plan(self, epoch: int) -> EpochPlan:
        with self._plan_lock:
            return self._plan(epoch)

    def _plan(self, epoch: int) -> EpochPlan:
        plan = self._plans.get(epoch)
        if plan is None:
            b = self.buckets
            batch = b.batch_size * self.world  # every rank plans the same global batches
            if self.validation:
                plan = plan_validation(b.dataset, b.settings, batch, self.seed)
            else:
                variations = b.cache.variations if b.cache else None
                plan = plan_epoch(b.dataset, b.settings, batch, self.seed, epoch, b.leftover, variations=variations)
                if self.log and epoch == 0 and not self._reported:  # the same leftovers recur every epoch: say it once
                    self._reported = True
                    for message in plan.report.messages():
                        self.log(f"epoch 1: {message}")
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan
        return plan

    def iterations(self, epoch: int) -> int:
        e = 0 if self.validation else epoch
        if e not in self._counts:  # counting all epochs up front must not plan each one twice
            self._counts[e] = self.plan(e).iterations
        return self._counts[e]

    # ---- loading ---------------------------------------------------------------------------
    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> Batch:
        key = (epoch, index, rank)
        if self._next is not None and self._next[0] == key:
            future = self._next[1]
        else:
            future = self._pool.submit(self._load, epoch, index, rank, world)
        nxt = self._following(epoch, index)
        self._next = (nxt + (rank,), self._pool.submit(self._load, *nxt, rank, world)) if nxt else None
        return future.result()

    def _following(self, epoch: int, index: int) -> tuple[int, int] | None:
        if index + 1 < self.iterations(epoch):
            return epoch, index + 1
        return None  # the next epoch is planned when the loop gets there

    def _load(self, epoch: int, index: int, rank: int, world: int) -> Batch:
        items = list(self.plan(epoch).batches[index])
        per_rank = max(1, len(items) // world)
        items = items[rank * per_rank:(rank + 1) * per_rank]
        captions = [it.caption for it in items]
        if self.captions is not None:
            captions = [self.captions(c) for c in captions]
        weights = torch.tensor([it.loss_weight for it in items], dtype=torch.float32)
        batch = Batch(captions=captions, loss_weights=weights,
                      original_sizes=[(it.resize[1], it.resize[0]) for it in items],
                      crops_top_left=[(it.crop[1], it.crop[0]) for it in items])
        loaded = None
        if self.latents is not None and self.bundle is not None:
            result = self.latents.get_or_encode(items, self._encode_pixels)
            batch.latents = torch.from_numpy(np.stack(result.values))
        if batch.latents is None or self.masks:
            loaded = [load_item(it) for it in items]
            images, masks = stack_batch(loaded)
            if batch.latents is None:
                batch.pixels = torch.from_numpy(images)
            if self.masks and masks is not None:
                batch.masks = torch.from_numpy(masks)
        if self.texts is not None and self.bundle is not None:
            result = self.texts.get_or_encode(captions, self._encode_texts)
            batch.text = {k: torch.from_numpy(np.stack([v[k] for v in result.values])) for k in result.values[0]}
        return batch

    def _encode_pixels(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        latents = self.bundle.encode_images(torch.from_numpy(np.stack(arrays)))
        return [l.cpu().numpy() for l in latents]

    def _encode_texts(self, texts: list[str]) -> list[dict[str, np.ndarray]]:
        out = self.bundle.encode_prompts(list(texts))
        return [{k: v[i].cpu().numpy() for k, v in out.items()} for i in range(len(texts))]

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
