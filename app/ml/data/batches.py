"""One epoch's batches, and loading a planned item into pixels.

Planning is cheap and pure (no pixels are read): for every sample of the epoch it fixes the
bucket, resize size, crop box, augmentation draw and the caption after text augmentation, then
groups by bucket and shuffles. Because everything comes from the seeded rng, planning epoch 3
in a fresh process equals epoch 3 of a continuous run (exact resume), and the plan can be
previewed (bucket histogram, dropped files) before any training. Leftovers that cannot fill a
batch are reported by file name, never dropped silently.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .augment import AugmentParams, AugmentSettings, apply_params, draw_params
from .bucketing import BucketSettings, Resolution, assign_bucket, cover_size, crop_box, parse_resolution
from .captions import TextAugment, augment_caption, choose_line
from .concept import Dataset, epoch_samples, validation_samples
from .errors import DataError, Problem, check_cancelled
from .images import open_image_rgb, open_mask
from .rng import rng_for

LEFTOVER_POLICIES = ("drop", "repeat", "keep")
RESAMPLE = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class PlannedItem:
    """Everything needed to produce one training example, decided before any pixel is read."""

    concept_index: int
    sample_index: int
    path: Path
    bucket: tuple[int, int]  # (width, height) of the training tensor
    resize: tuple[int, int]  # (width, height) the image is resized to before cropping
    crop: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    caption: str  # after line choice and text augmentation
    loss_weight: float
    mask_path: Path | None
    concept_type: str
    concept_name: str
    seed: int
    epoch: int
    variation: int | None  # cached-variation index, or None for per-epoch draws
    pixel_index: tuple[int, ...]  # rng index of the pixel draws (sample key [, occurrence])
    augment: AugmentSettings
    augment_params: AugmentParams

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class PlanReport:
    dropped: tuple[PlannedItem, ...] = ()  # leftovers left out this epoch (leftover="drop")
    repeated: tuple[PlannedItem, ...] = ()  # extra copies that filled a bucket's last batch
    problems: tuple[Problem, ...] = ()

    @property
    def dropped_files(self) -> list[str]:
        return [str(i.path) for i in self.dropped]

    @property
    def repeated_files(self) -> list[str]:
        return [str(i.path) for i in self.repeated]

    def messages(self) -> list[str]:
        out = []
        by_bucket: dict[tuple[int, int], list[str]] = {}
        for i in self.dropped:
            by_bucket.setdefault(i.bucket, []).append(i.path.name)
        for (w, h), names in sorted(by_bucket.items()):
            out.append(
                f"bucket {w}x{h}: {len(names)} leftover images do not fill a batch and are skipped this "
                f"epoch: {', '.join(names)} (set the Bucketer's leftovers to repeat, use a smaller batch, or add images)"
            )
        if self.repeated:
            out.append(f"{len(self.repeated)} images repeated to fill batches: "
                       + ", ".join(i.path.name for i in self.repeated))
        out += [str(p) for p in self.problems]
        return out


@dataclass(frozen=True)
class EpochPlan:
    seed: int
    epoch: int
    batch_size: int
    batches: tuple[tuple[PlannedItem, ...], ...]
    report: PlanReport = field(default_factory=PlanReport)

    @property
    def iterations(self) -> int:
        return len(self.batches)

    @property
    def items(self) -> list[PlannedItem]:
        return [i for b in self.batches for i in b]

    def bucket_histogram(self) -> dict[tuple[int, int], int]:
        return bucket_histogram(self.items)


def bucket_histogram(items: Iterable[PlannedItem]) -> dict[tuple[int, int], int]:
    """bucket (width, height) -> number of items, largest first (for previews)."""
    counts = Counter(i.bucket for i in items)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _plan_items(dataset: Dataset, pairs, settings: BucketSettings, seed: int, epoch: int,
                variations: int | None, augment: bool, check_cancel) -> list[PlannedItem]:
    resolutions: dict[int, Resolution] = {}
    occurrences: Counter = Counter()
    items = []
    for n, (ci, si) in enumerate(pairs):
        if n % 256 == 0:
            check_cancelled(check_cancel)
        concept = dataset.concepts[ci]
        cs = concept.settings
        smp = concept.samples[si]
        if ci not in resolutions:
            resolutions[ci] = parse_resolution(cs.resolution or settings.resolution)
        res = resolutions[ci]
        occ = occurrences[(ci, si)]
        occurrences[(ci, si)] += 1
        if variations:
            variation = (epoch + occ) % variations
            pixel_index = (smp.key,)
        else:
            variation = None
            pixel_index = (smp.key, occ)
        target = None
        if res.fixed is None:
            target = res.targets[0]
            if len(res.targets) > 1:
                r = rng_for(seed, epoch, pixel_index, "resolution", variation=variation)
                target = res.targets[int(r.integers(len(res.targets)))]
        bucket = assign_bucket(smp.size, res, target, settings)
        resize = cover_size(smp.size, bucket)
        aug = cs.augment if augment else AugmentSettings(flip="off", crop_jitter=False)
        jitter = rng_for(seed, epoch, pixel_index, "crop", variation=variation) if aug.crop_jitter else None
        box = crop_box(resize, bucket, jitter)
        text_index = (smp.key, occ)
        line = choose_line(smp.caption_lines, rng_for(seed, epoch, text_index, "caption_line"))
        text_aug = cs.text_augment if augment else TextAugment()
        caption = augment_caption(line, text_aug, rng_for(seed, epoch, text_index, "text_augment"))
        items.append(PlannedItem(
            concept_index=ci, sample_index=si, path=smp.path, bucket=bucket, resize=resize, crop=box,
            caption=caption, loss_weight=cs.loss_weight, mask_path=smp.mask_path,
            concept_type=cs.concept_type, concept_name=cs.name, seed=seed, epoch=epoch, variation=variation,
            pixel_index=pixel_index, augment=aug,
            augment_params=draw_params(aug, seed, epoch, pixel_index, variation),
        ))
    return items


def check_upscaling(dataset: Dataset, settings: BucketSettings, concepts=None) -> list[Problem]:
    """Images smaller than their bucket at the largest target resolution (they get upscaled).

    A warning in "skip" mode; concepts with on_bad_image="error" raise a DataError instead, so
    training does not start on blurry upscaled images by accident.
    """
    problems = []
    for c in concepts if concepts is not None else dataset.training_concepts:
        res = parse_resolution(c.settings.resolution or settings.resolution)
        target = None if res.fixed else max(res.targets)
        bad = []
        for smp in c.samples:
            bucket = assign_bucket(smp.size, res, target, settings)
            w, h = smp.size
            if w < bucket[0] or h < bucket[1]:
                scale = max(bucket[0] / w, bucket[1] / h)
                bad.append(Problem(
                    str(smp.path),
                    f"image is {w}x{h}, smaller than its bucket {bucket[0]}x{bucket[1]}; it is upscaled "
                    f"x{scale:.2f} (use a larger image, a lower resolution, or no_upscale)",
                    c.name, "warning"))
        if bad and c.settings.on_bad_image == "error":
            shown = "; ".join(f"{p.path}: {p.message}" for p in bad[:10])
            raise DataError(f"{len(bad)} images would be upscaled and on_bad_image='error': {shown}",
                            bad[0].path, c.name)
        problems += bad
    return problems


def plan_epoch(dataset: Dataset, bucket_settings: BucketSettings, batch_size: int, seed: int, epoch: int,
               leftover: str = "drop", *, variations: int | None = None, progress=None,
               check_cancel=None, log=None) -> EpochPlan:
    """Batches of one training epoch, each from a single bucket, in a deterministic shuffled order.

    leftover: "drop" leaves each bucket's incomplete last batch out and lists the files in the
    report; "repeat" fills it with other items of the same bucket (listed too); "keep" trains a
    smaller last batch. variations=N: pixel draws (crop, resolution, augmentation) use variation
    (epoch + k) % N instead of the epoch, so a latent cache can hold N draws per image.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if leftover not in LEFTOVER_POLICIES:
        raise ValueError(f"leftover must be one of {LEFTOVER_POLICIES}, got {leftover!r}")
    if variations is not None and variations < 1:
        raise ValueError("variations must be >= 1")
    problems = check_upscaling(dataset, bucket_settings)
    pairs = epoch_samples(dataset, seed, epoch)
    items = _plan_items(dataset, pairs, bucket_settings, seed, epoch, variations, True, check_cancel)
    plan = _batch(items, batch_size, seed, epoch, leftover, problems)
    if progress is not None:
        progress(1, 1)
    if log is not None:
        for m in plan.report.messages():
            log(m)
    return plan


def plan_validation(dataset: Dataset, bucket_settings: BucketSettings, batch_size: int, seed: int = 0) -> EpochPlan:
    """Batches of the validation concepts: every image once, centre crop, no augmentation."""
    pairs = validation_samples(dataset)
    items = _plan_items(dataset, pairs, bucket_settings, seed, 0, 1, False, None)
    problems = check_upscaling(dataset, bucket_settings, dataset.validation_concepts)
    return _batch(items, batch_size, seed, 0, "keep", problems, shuffle=False)


def variation_items(dataset: Dataset, bucket_settings: BucketSettings, seed: int, variations: int,
                    check_cancel=None) -> list[PlannedItem]:
    """Every training sample at every cached variation 0..N-1: what a latent cache must hold.

    These are exactly the pixels plan_epoch(..., variations=N) asks for in any epoch (first
    occurrence of a sample), so pre-caching them makes every later epoch a cache hit.
    """
    if variations < 1:
        raise ValueError("variations must be >= 1")
    pairs = [(c.index, i) for c in dataset.training_concepts for i in range(len(c.samples))]
    out: list[PlannedItem] = []
    for v in range(variations):
        out += _plan_items(dataset, pairs, bucket_settings, seed, v, variations, True, check_cancel)
    return out


def _batch(items, batch_size, seed, epoch, leftover, problems, shuffle=True) -> EpochPlan:
    by_bucket: dict[tuple[int, int], list[PlannedItem]] = {}
    for it in items:
        by_bucket.setdefault(it.bucket, []).append(it)
    batches, dropped, repeated = [], [], []
    for bucket in sorted(by_bucket):
        group = by_bucket[bucket]
        if shuffle:
            order = rng_for(seed, epoch, bucket, "shuffle").permutation(len(group))
            group = [group[i] for i in order]
        full = len(group) // batch_size * batch_size
        for k in range(0, full, batch_size):
            batches.append(tuple(group[k:k + batch_size]))
        rest = group[full:]
        if not rest:
            continue
        if leftover == "drop":
            dropped += rest
        elif leftover == "keep":
            batches.append(tuple(rest))
        else:
            need = batch_size - len(rest)
            r = rng_for(seed, epoch, bucket, "leftover_fill")
            pool = group[:full] if full else group
            picks = []
            while len(picks) < need:  # without replacement while possible, then cycle again
                perm = r.permutation(len(pool))
                picks += [pool[i] for i in perm[: need - len(picks)]]
            repeated += picks
            batches.append(tuple(rest + picks))
    if shuffle:
        order = rng_for(seed, epoch, 0, "batch_order").permutation(len(batches))
        batches = [batches[i] for i in order]
    return EpochPlan(seed=seed, epoch=epoch, batch_size=batch_size, batches=tuple(batches),
                     report=PlanReport(tuple(dropped), tuple(repeated), tuple(problems)))


@dataclass(frozen=True)
class LoadedItem:
    image: np.ndarray  # float32 (3, H, W) in [-1, 1]
    mask: np.ndarray | None  # float32 (H, W) in [0, 1], or None
    item: PlannedItem


def _resize(img: Image.Image, size: tuple[int, int], resample) -> Image.Image:
    if img.size == size:
        return img
    # reducing_gap: integer-factor box reduction first (fast), then the chosen filter.
    return img.resize(size, resample, reducing_gap=2.0 if size[0] < img.size[0] else None)


def _check_aspect(size: tuple[int, int], item: PlannedItem, what: str = "image") -> None:
    """A file whose shape changed since the scan would be distorted: ask for a rescan instead."""
    w, h = size
    rw, rh = item.resize
    tolerance = 2.0 / min(rw, rh, w, h) + 0.01
    if abs((w / h) / (rw / rh) - 1.0) > tolerance:
        raise DataError(f"{what} is {w}x{h} but was planned from a different shape; the file changed "
                        "since the dataset was scanned — rescan the dataset", item.mask_path if what == "mask" else item.path)


def load_item(item: PlannedItem, augment_settings: AugmentSettings | None = None, seed: int | None = None,
              epoch: int | None = None, *, resample: str = "lanczos") -> LoadedItem:
    """Pixels of a planned item at its bucket size, augmented as planned.

    Passing augment_settings/seed/epoch redraws the augmentation with them (defaults: the
    plan's). JPEGs are decoded at a reduced scale (draft) when the bucket is much smaller.
    """
    params = item.augment_params
    if augment_settings is not None or seed is not None or epoch is not None:
        params = draw_params(augment_settings or item.augment, item.seed if seed is None else seed,
                             item.epoch if epoch is None else epoch, item.pixel_index, item.variation)
    filt = RESAMPLE[resample]
    try:
        img = open_image_rgb(item.path, draft_size=item.resize)
        _check_aspect(img.size, item)
        img = _resize(img, item.resize, filt).crop(item.crop)
        mask = None
        if item.mask_path is not None:
            mask = open_mask(item.mask_path)
            _check_aspect(mask.size, item, "mask")
            mask = _resize(mask, item.resize, Image.Resampling.BILINEAR).crop(item.crop)
    except DataError as exc:
        raise DataError(exc.reason, exc.path, item.concept_name) from exc
    img, mask = apply_params(img, mask, params)
    arr = np.asarray(img).transpose(2, 0, 1).astype(np.float32)  # uint8 CHW -> one float copy
    arr *= 2.0 / 255.0
    arr -= 1.0
    marr = None if mask is None else np.asarray(mask, dtype=np.float32) * (1.0 / 255.0)
    return LoadedItem(arr, marr, item)


def iter_loaded(items: Iterable[PlannedItem], *, workers: int = 0, prefetch: int = 8,
                resample: str = "lanczos", check_cancel=None) -> Iterator[LoadedItem]:
    """load_item over items, in order; workers > 0 uses threads (PIL decodes without the GIL)."""
    items = list(items)
    if workers <= 0:
        for it in items:
            check_cancelled(check_cancel)
            yield load_item(it, resample=resample)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        it_iter = iter(items)
        for it in it_iter:
            pending.append(pool.submit(load_item, it, resample=resample))
            if len(pending) >= prefetch:
                break
        while pending:
            check_cancelled(check_cancel)
            fut = pending.pop(0)
            nxt = next(it_iter, None)
            if nxt is not None:
                pending.append(pool.submit(load_item, nxt, resample=resample))
            yield fut.result()


def stack_batch(loaded: list[LoadedItem]) -> tuple[np.ndarray, np.ndarray | None]:
    """(B, 3, H, W) images and (B, H, W) masks (ones where an item has no mask, None if none has)."""
    images = np.stack([x.image for x in loaded])
    if all(x.mask is None for x in loaded):
        return images, None
    h, w = images.shape[2:]
    masks = np.stack([x.mask if x.mask is not None else np.ones((h, w), np.float32) for x in loaded])
    return images, masks


__all__ = [
    "PlannedItem", "PlanReport", "EpochPlan", "LoadedItem", "plan_epoch", "plan_validation",
    "bucket_histogram", "check_upscaling", "variation_items", "load_item", "iter_loaded", "stack_batch",
]
