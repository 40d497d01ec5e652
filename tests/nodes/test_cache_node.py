"""Cache node with the tiny VAE: encodes once, re-encodes exactly what changed, and stores what
training would compute on the fly."""
from __future__ import annotations

import numpy as np
import pytest
from dataset_node_helpers import bump_mtime, graph, run, write_image


def pipeline(folder, cache_dir, cache=None):
    nodes = [("1", "LoadModel", {"source": "builtin:tiny-sd"}),
             ("2", "Concept", {"folder": str(folder), "name": "things"}),
             ("3", "Augment", {"flip": "random", "brightness": 0.1}),
             ("4", "Bucketer", {"resolution": "64", "quantization": 0, "batch_size": 1}),
             ("5", "Cache", {"folder": str(cache_dir), **(cache or {})})]
    links = [("2", "dataset", "3", "dataset"), ("3", "dataset", "4", "datasets"), ("1", "model", "4", "model"),
             ("1", "model", "5", "model"), ("4", "buckets", "5", "buckets")]
    return graph(nodes, links)


def counts(r, what="latents"):
    """(total, cached, encoded) from the Cache node's preview table."""
    for name, total, hits, misses, _ in r.previews("5")["table"]["rows"]:
        if name == what:
            return total, hits, misses
    raise AssertionError(f"no {what} row")


@pytest.fixture(autouse=True)
def allow_cache_folder(tmp_path, monkeypatch):
    """The cache folders here lie outside the workspace: allowed, as a user allows a shared cache."""
    monkeypatch.setenv("NODETRAINER_ALLOW_OUTPUT", str(tmp_path))


@pytest.fixture
def small(tmp_path):
    folder = tmp_path / "imgs"
    for i, size in enumerate([(64, 64), (96, 64), (64, 96), (64, 64)]):
        write_image(folder / f"img_{i}.png", size, seed=i)
        (folder / f"img_{i}.txt").write_text(f"caption {i}\nalt caption {i}\n" if i == 0 else f"caption {i}")
    return folder


def test_cache_encodes_once_and_reencodes_only_what_changed(small, tmp_path):
    import torch

    from app.ml.data.batches import load_item, plan_epoch
    from app.ml.data.cache import LatentCache, TextCache

    cache_dir = tmp_path / "cache"
    g = pipeline(small, cache_dir)
    r, ex = run(g)
    assert r.status == "done", r.error()
    assert counts(r) == (4, 0, 4)
    assert counts(r, "captions") == (5, 0, 5)  # both lines of the two-line caption
    assert set(r.previews("5")) == {"table"}
    assert any("4 encoded, 0 already cached" in m for m in r.logs("5"))
    assert any(e["event"] == "progress" and e["node"] == "5" for e in r.events)

    b = r.output("5")
    spec = b.cache
    assert spec.folder == cache_dir and spec.variations == 1 and spec.text_identity
    assert len(list((cache_dir / "latents").rglob("*.safetensors"))) == 4

    # what training asks for at any epoch is in the cache, and equals encoding load_item's pixels
    from app.ml.models import load_model

    model = load_model("builtin:tiny-sd")
    assert spec.vae_identity == model.vae_identity and spec.text_identity == model.text_identity
    latents, texts = LatentCache(spec.folder, spec.vae_identity), TextCache(spec.folder, spec.text_identity)
    for epoch in (0, 3):
        plan = plan_epoch(b.dataset, b.settings, b.batch_size, 42, epoch, b.leftover, variations=spec.variations)
        for it in plan.items:
            assert latents.path_for(it).is_file()
        first = plan.items[0]
        got = latents.get_or_encode([first], lambda xs: pytest.fail("should be cached")).values[0]
        want = model.encode_images(torch.from_numpy(load_item(first).image[None]))[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        caps = texts.get_or_encode([it.caption for it in plan.items], lambda xs: pytest.fail("should be cached"))
        want_text = model.encode_prompts([first.caption])["prompt_embeds"][0].numpy()
        np.testing.assert_allclose(caps.values[0]["prompt_embeds"], want_text, rtol=1e-5, atol=1e-5)

    # same executor, nothing changed: nothing runs
    r, _ = run(g, ex)
    assert r.result.executed == [] and "5" in r.result.cached

    # a new executor (e.g. a new session): the node runs and finds everything on disk
    r, _ = run(g)
    assert counts(r) == (4, 4, 0) and counts(r, "captions") == (5, 5, 0)

    # change one image: the fingerprint re-runs Concept, and exactly one latent is encoded
    write_image(small / "img_1.png", (96, 64), seed=77)
    bump_mtime(small / "img_1.png")
    r, _ = run(g, ex)
    assert r.ran("2") and r.ran("5")
    assert counts(r) == (4, 3, 1) and counts(r, "captions") == (5, 5, 0)

    # change one caption: one text encode, no latents
    (small / "img_2.txt").write_text("a new caption")
    bump_mtime(small / "img_2.txt")
    r, _ = run(g, ex)
    assert counts(r) == (4, 4, 0) and counts(r, "captions")[2] == 1


def test_cached_variations_cover_every_epoch_at_the_trainloop_seed(small, tmp_path):
    """The Cache plans with the seed of the TrainLoop it feeds (read from the recipe), so every
    epoch of that training run finds its N variations on disk."""
    from app.ml.data.batches import plan_epoch
    from app.ml.data.cache import LatentCache

    g = pipeline(small, tmp_path / "c", {"variations": 3, "cache_text": False})
    g.add_node("Optimizer", 1, {}, node_id="6")
    g.add_node("TrainLoop", 1, {"seed": 7}, node_id="7")
    for src, out, inp in (("1", "model", "model"), ("5", "buckets", "buckets"), ("6", "optimizer", "optimizer")):
        g.add_link(src, out, "7", inp)
    r, _ = run(g, targets=["5"])
    assert r.status == "done", r.error()
    assert counts(r) == (12, 0, 12)
    assert any("seed 7 from the TrainLoop's seed" in m for m in r.logs("5"))
    b = r.output("5")
    assert b.cache.variations == 3 and b.cache.text_identity is None
    assert any("not cached" in m for m in r.logs("5"))
    latents = LatentCache(b.cache.folder, b.cache.vae_identity)
    for epoch in range(7):
        plan = plan_epoch(b.dataset, b.settings, b.batch_size, 7, epoch, b.leftover, variations=3)
        assert all(latents.path_for(it).is_file() for it in plan.items)
