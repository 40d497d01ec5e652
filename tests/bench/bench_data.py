"""Data-pipeline throughput: scan -> plan (bucket + augment draws) -> load_item, plus the cache.

Not a pytest test (no test_ prefix). Run from the repository root:

    python tests/bench/bench_data.py [--n 1000] [--workers 2]

Generates N 512x768 (width x height) JPEGs in a temp folder, then times one epoch at batch
size 4, SD1.5 bucketing at 512 (q=8), default augmentation (random flip + crop jitter) and
with colour/rotation augmentation on; serial and with a thread pool; and latent-cache
encode/hit throughput with a fake encoder.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.ml.data.augment import AugmentSettings  # noqa: E402
from app.ml.data.batches import iter_loaded, plan_epoch  # noqa: E402
from app.ml.data.bucketing import BucketSettings  # noqa: E402
from app.ml.data.cache import LatentCache  # noqa: E402
from app.ml.data.concept import ConceptSettings, scan_dataset  # noqa: E402


def generate(folder: Path, n: int, size=(512, 768)) -> None:
    w, h = size
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    for i in range(n):
        c = rng.uniform(0, 255, size=3).astype(np.float32)
        base = (xx[..., None] / w * c + yy[..., None] / h * (255 - c)) / 2 + 64
        noise = rng.normal(0, 12, size=(h // 4, w // 4, 3)).repeat(4, 0).repeat(4, 1)
        arr = np.clip(base + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:05d}.jpg", quality=90)
        (folder / f"img_{i:05d}.txt").write_text(f"photo {i}, tag a, tag b\n")


def fake_encoder(arrays):
    out = []
    for a in arrays:
        c, h, w = a.shape
        out.append(a.reshape(c, h // 8, 8, w // 8, 8).mean(axis=(2, 4)).astype(np.float16))
    return out


def timed(label, n, fn):
    t = time.perf_counter()
    result = fn()
    dt = time.perf_counter() - t
    print(f"{label:<48} {dt:8.2f} s  {n / dt:9.1f} images/s")
    return result, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        t = time.perf_counter()
        generate(folder, args.n)
        print(f"generated {args.n} 512x768 JPEGs in {time.perf_counter() - t:.1f} s (not timed below)")
        bs = BucketSettings("512", model_family="sd15")
        heavy = AugmentSettings(rotation=10, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)

        for verify in ("full", "header"):
            ds, t_scan = timed(f"scan (verify={verify})", args.n,
                               lambda: scan_dataset([ConceptSettings("bench", folder, verify=verify)]))
        plan, t_plan = timed("plan epoch (buckets, crops, captions, draws)", args.n,
                             lambda: plan_epoch(ds, bs, args.batch_size, seed=0, epoch=0))
        print(f"  -> {plan.iterations} batches of {args.batch_size}, buckets {plan.bucket_histogram()}")
        items = plan.items

        def load_all(workers, resample="lanczos", its=items):
            for _ in iter_loaded(its, workers=workers, resample=resample):
                pass

        _, t_load = timed("load_item, flip+jitter, lanczos, 1 thread", len(items), lambda: load_all(0))
        timed("load_item, flip+jitter, bilinear, 1 thread", len(items), lambda: load_all(0, "bilinear"))
        _, t_load2 = timed(f"load_item, flip+jitter, lanczos, {args.workers} threads", len(items),
                           lambda: load_all(args.workers))
        ds_heavy = scan_dataset([ConceptSettings("bench", folder, augment=heavy, verify="header")])
        heavy_items = plan_epoch(ds_heavy, bs, args.batch_size, seed=0, epoch=0).items
        timed("load_item, +rotation+colour+hue, 1 thread", len(heavy_items), lambda: load_all(0, its=heavy_items))
        timed(f"load_item, +rotation+colour+hue, {args.workers} threads", len(heavy_items),
              lambda: load_all(args.workers, its=heavy_items))
        total = t_scan + t_plan + t_load
        print(f"{'end to end (scan header + plan + load, 1 thread)':<48} {total:8.2f} s  {args.n / total:9.1f} images/s")
        total2 = t_scan + t_plan + t_load2
        print(f"{'end to end (scan header + plan + load, %d threads)' % args.workers:<48} {total2:8.2f} s  "
              f"{args.n / total2:9.1f} images/s")

        cache = LatentCache(Path(tmp) / "cache", "fake-vae")
        res, _ = timed("latent cache, cold (load + encode + write)", len(items),
                       lambda: cache.get_or_encode(items, fake_encoder, batch_size=8))
        assert res.misses == len(items)
        res, _ = timed("latent cache, warm (hash + read)", len(items),
                       lambda: LatentCache(Path(tmp) / "cache", "fake-vae").get_or_encode(items, fake_encoder, 8))
        assert res.misses == 0


if __name__ == "__main__":
    main()
