"""Latent and text caches: content-keyed, partial re-encoding, atomic writes."""
import numpy as np
import pytest

from app.ml.data.augment import AugmentSettings
from app.ml.data.batches import plan_epoch
from app.ml.data.bucketing import BucketSettings
from app.ml.data.cache import LatentCache, TextCache
from app.ml.data.concept import ConceptSettings, scan_dataset
from data_helpers import write_image

SD = BucketSettings("64", quantization=8)
NO_AUG = AugmentSettings(flip="off", crop_jitter=False)


class CountingEncoder:
    """Fake VAE: 8x mean-pool; records every batch it sees."""

    def __init__(self):
        self.encoded = 0
        self.batches = []

    def __call__(self, arrays):
        self.batches.append([a.shape for a in arrays])
        self.encoded += len(arrays)
        out = []
        for a in arrays:
            c, h, w = a.shape
            out.append(a.reshape(c, h // 8, 8, w // 8, 8).mean(axis=(2, 4)).astype(np.float32))
        return out


def make_dataset(folder, n=6, aug=NO_AUG):
    for i in range(n):
        write_image(folder / f"img{i}.png", (64, 64) if i % 2 else (100, 60), seed=i)
    return scan_dataset([ConceptSettings("c", folder, augment=aug)])


def items_of(folder, aug=NO_AUG, epoch=0, variations=None):
    ds = scan_dataset([ConceptSettings("c", folder, augment=aug)])
    return plan_epoch(ds, SD, 1, seed=0, epoch=epoch, variations=variations).items


def test_second_run_encodes_nothing_and_returns_same_values(tmp_path):
    make_dataset(tmp_path / "data")
    items = items_of(tmp_path / "data")
    enc = CountingEncoder()
    first = LatentCache(tmp_path / "cache", "vae-a").get_or_encode(items, enc, batch_size=2)
    assert (first.hits, first.misses, enc.encoded) == (0, 6, 6)
    assert all(len(set(b)) == 1 and len(b) <= 2 for b in enc.batches)  # one shape per encode call
    enc2 = CountingEncoder()
    second = LatentCache(tmp_path / "cache", "vae-a").get_or_encode(items_of(tmp_path / "data"), enc2, 2)
    assert (second.hits, second.misses, enc2.encoded) == (6, 0, 0)
    for a, b in zip(first.values, second.values):
        assert np.array_equal(a, b)


def test_changing_one_image_reencodes_exactly_one(tmp_path):
    make_dataset(tmp_path / "data")
    cache = LatentCache(tmp_path / "cache", "vae-a")
    cache.get_or_encode(items_of(tmp_path / "data"), CountingEncoder(), 4)
    write_image(tmp_path / "data" / "img3.png", (64, 64), seed=99)  # new pixels, same name and size
    enc = CountingEncoder()
    result = LatentCache(tmp_path / "cache", "vae-a").get_or_encode(items_of(tmp_path / "data"), enc, 4)
    assert enc.encoded == 1 and (result.hits, result.misses) == (5, 1)


def test_encoder_identity_and_crop_are_part_of_the_key(tmp_path):
    make_dataset(tmp_path / "data")
    items = items_of(tmp_path / "data")
    LatentCache(tmp_path / "cache", "vae-a").get_or_encode(items, CountingEncoder(), 4)
    enc = CountingEncoder()
    LatentCache(tmp_path / "cache", "vae-b").get_or_encode(items, enc, 4)
    assert enc.encoded == 6
    jittered = items_of(tmp_path / "data", aug=AugmentSettings(flip="off", crop_jitter=True))
    enc = CountingEncoder()
    LatentCache(tmp_path / "cache", "vae-a").get_or_encode(jittered, enc, 4)
    moved = sum(a.crop != b.crop for a, b in zip(sorted(items, key=lambda i: i.path), sorted(jittered, key=lambda i: i.path)))
    assert moved > 0 and enc.encoded == moved  # only items whose crop box changed are re-encoded


def test_variations_cache_n_draws(tmp_path):
    make_dataset(tmp_path / "data")
    aug = AugmentSettings(flip="random", rotation=5)
    cache = LatentCache(tmp_path / "cache", "vae")
    encoded = []
    for epoch in range(6):
        enc = CountingEncoder()
        cache.get_or_encode(items_of(tmp_path / "data", aug, epoch, variations=2), enc, 8)
        encoded.append(enc.encoded)
    assert encoded[0] == 6 and encoded[1] > 0 and encoded[2:] == [0, 0, 0, 0]
    # epoch e uses variation e mod 2
    e0, e2 = items_of(tmp_path / "data", aug, 0, 2), items_of(tmp_path / "data", aug, 2, 2)
    assert {i.path: i.augment_params for i in e0} == {i.path: i.augment_params for i in e2}


def test_writes_are_atomic_and_damaged_entries_reencode(tmp_path):
    make_dataset(tmp_path / "data")
    items = items_of(tmp_path / "data")
    cache = LatentCache(tmp_path / "cache", "vae")

    def failing(arrays):
        raise RuntimeError("GPU fell off")

    with pytest.raises(RuntimeError):
        cache.get_or_encode(items, failing, 2)
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    cache.get_or_encode(items, CountingEncoder(), 2)
    files = list((tmp_path / "cache").rglob("*"))
    assert not [f for f in files if f.name.endswith(".tmp")]
    victim = cache.path_for(items[0])
    victim.write_bytes(victim.read_bytes()[:20])
    logs, enc = [], CountingEncoder()
    LatentCache(tmp_path / "cache", "vae").get_or_encode(items, enc, 2, log=logs.append)
    assert enc.encoded == 1 and any("unreadable" in m for m in logs)


def test_progress_reports_encoding(tmp_path):
    make_dataset(tmp_path / "data", n=3)
    calls = []
    LatentCache(tmp_path / "cache", "vae").get_or_encode(items_of(tmp_path / "data"), CountingEncoder(), 1,
                                                         progress=lambda v, t: calls.append((v, t)))
    assert calls[0] == (0, 3) and calls[-1] == (3, 3)


def test_text_cache(tmp_path):
    calls = []

    def encode(texts):
        calls.extend(texts)
        return [{"hidden": np.full((2, 4), len(t), np.float32), "pooled": np.ones(4, np.float32)} for t in texts]

    cache = TextCache(tmp_path / "cache", "clip-l")
    r = cache.get_or_encode(["a cat", "a dog", "a cat", ""], encode, batch_size=2)
    assert sorted(calls) == ["", "a cat", "a dog"] and r.misses == 3
    assert r.values[0]["hidden"][0, 0] == 5 and r.values[2] is r.values[0]
    calls.clear()
    r = TextCache(tmp_path / "cache", "clip-l").get_or_encode(["a dog", "a cat"], encode)
    assert calls == [] and r.hits == 2 and r.values[0]["hidden"][0, 0] == 5
    TextCache(tmp_path / "cache", "clip-g").get_or_encode(["a dog"], encode)
    assert calls == ["a dog"]
    plain = TextCache(tmp_path / "cache2", "t5").get_or_encode(["x"], lambda ts: [np.zeros(3)] * len(ts))
    assert isinstance(plain.values[0], np.ndarray)
    again = TextCache(tmp_path / "cache2", "t5").get_or_encode(["x"], lambda ts: 1 / 0)
    assert isinstance(again.values[0], np.ndarray) and again.values[0].shape == (3,)


def test_precached_variations_make_every_epoch_a_hit(tmp_path):
    from app.ml.data.batches import variation_items

    ds = make_dataset(tmp_path / "data", aug=AugmentSettings(flip="random", rotation=5))
    cache = LatentCache(tmp_path / "cache", "vae")
    enc = CountingEncoder()
    cache.get_or_encode(variation_items(ds, SD, seed=0, variations=3), enc, 8)
    assert enc.encoded == 18
    enc = CountingEncoder()
    for epoch in range(5):
        cache.get_or_encode(plan_epoch(ds, SD, 1, seed=0, epoch=epoch, variations=3).items, enc, 8)
    assert enc.encoded == 0
