"""Nothing idle on the device: where each component is during a training step, an encode and a sample.

On this CPU the device and the host are the same memory, so the Trainer gets an instrumented mover:
it records where each component is and, while a component is "in RAM", replaces its weights by NaN
(the real ones kept aside), so any use of a component that is not on the device poisons the loss.
"""
from __future__ import annotations

import pytest
import torch

from app.ml.adapters import AdapterConfig, create_adapter_set
from app.ml.handle import ModelHandle
from app.ml.memory.placement import DEVICE, HOST, Placement
from app.ml.models.load import load_model
from app.ml.train.loop import Batch, Hooks, Trainer, TrainSettings
from app.ml.train.trainables import AdapterTrainable
from poison_mover import Mover

OPT = {"optimizer": "adamw", "lr": 1e-3}


class Source:
    """Two batches of random images; latents and text cached (encoded up front) or not."""

    def __init__(self, bundle, cached_latents, cached_text, n=2, size=16):
        g = torch.Generator().manual_seed(0)
        self.pixels = [torch.rand((2, 3, size, size), generator=g) * 2 - 1 for _ in range(n)]
        self.captions = [["red square", "blue circle"]] * n
        self.latents = [bundle.encode_images(p) for p in self.pixels] if cached_latents else None
        self.text = [bundle.encode_prompts(c) for c in self.captions] if cached_text else None

    def iterations(self, epoch):
        return len(self.pixels)

    def batch(self, epoch, index, rank=0, world=1):
        return Batch(captions=self.captions[index], loss_weights=torch.ones(2),
                     pixels=None if self.latents else self.pixels[index],
                     latents=self.latents[index] if self.latents else None,
                     text=self.text[index] if self.text else None)


def lora(bundle, te="none"):
    config = AdapterConfig(rank=4, alpha=4, targets={"unet": "attn-only", "text_encoder": te}, seed=1)
    return AdapterTrainable(ModelHandle(bundle).with_adapter(create_adapter_set(bundle, config)))


def watch(bundle, mover):
    """Where the VAE and text encoder are whenever one of the three components computes."""
    seen = []
    parts = {"unet": bundle.unet, "vae": bundle.vae, "te": bundle.text_encoders[0]}

    def hook(name):
        def record(module, args, kwargs=None):
            seen.append((name, {k: mover.where.get(id(m)) for k, m in parts.items()}))
        return record

    handles = [bundle.unet.register_forward_pre_hook(hook("unet")),
               bundle.vae.encoder.register_forward_pre_hook(hook("vae.encode")),
               bundle.vae.decoder.register_forward_pre_hook(hook("vae.decode")),
               bundle.text_encoders[0].register_forward_pre_hook(hook("te"))]
    return seen, handles


@pytest.fixture
def bundle():
    return load_model("builtin:tiny-sd")


def _train(bundle, trainable, source, tmp_path, hooks=None, **settings):
    mover = Mover()
    seen, handles = watch(bundle, mover)
    try:
        result = Trainer(bundle, trainable, source, OPT, TrainSettings(epochs=1, **settings), tmp_path,
                         hooks or Hooks(), device=torch.device("cpu"), mover=mover).run()
        after = {k: mover.where.get(id(m)) for k, m in
                 {"unet": bundle.unet, "vae": bundle.vae, "te": bundle.text_encoders[0]}.items()}
    finally:
        for h in handles:
            h.remove()
        mover.restore()
    return result, seen, after, mover


def test_cached_latents_and_text_keep_vae_and_text_encoder_in_ram(bundle, tmp_path):
    logs = []
    result, seen, after, _ = _train(bundle, lora(bundle), Source(bundle, True, True), tmp_path, Hooks(log=logs.append))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    steps = [where for name, where in seen if name == "unet"]
    assert len(steps) == 2
    assert all(w == {"unet": DEVICE, "vae": HOST, "te": HOST} for w in steps)
    assert not [name for name, _ in seen if name != "unet"]  # neither the VAE nor the encoder ran
    assert after == {"unet": HOST, "vae": HOST, "te": HOST}  # the run puts everything back in RAM
    kept = [m for m in logs if m.startswith("kept in RAM")]
    assert len(kept) == 1 and "VAE" in kept[0] and "text_encoder" in kept[0]


def test_uncached_batches_visit_the_device_to_encode_and_leave(bundle, tmp_path):
    result, seen, after, _ = _train(bundle, lora(bundle), Source(bundle, False, False), tmp_path)
    assert all(torch.isfinite(torch.tensor(result.losses)))  # a NaN-poisoned component would show here
    assert [n for n, _ in seen] == ["vae.encode", "te", "unet"] * 2
    for name, where in seen:
        if name == "vae.encode":
            assert where["vae"] == DEVICE and where["te"] == HOST
        elif name == "te":
            assert where["te"] == DEVICE and where["vae"] == HOST
        else:  # the denoiser's forward (and so its backward): the encoders are back in RAM
            assert where == {"unet": DEVICE, "vae": HOST, "te": HOST}
    assert after == {"unet": HOST, "vae": HOST, "te": HOST}


def test_a_training_text_encoder_stays_on_the_device(bundle, tmp_path):
    result, seen, _, _ = _train(bundle, lora(bundle, te="attn-only"), Source(bundle, True, False), tmp_path)
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert all(where["te"] == DEVICE and where["vae"] == HOST for name, where in seen)


def test_sampling_during_training_brings_what_it_needs_and_puts_it_back(bundle, tmp_path):
    from app.ml.sampling import sample_images

    images = []

    def sample(step, epoch):
        images.extend(sample_images(bundle, ["red square"], width=16, height=16, steps=2, cfg=1.0, seed=1,
                                    sampler="euler").latents)

    result, seen, after, _ = _train(bundle, lora(bundle), Source(bundle, True, True, n=3), tmp_path,
                                    Hooks(sample=sample), sample_every=1, sample_unit="steps")
    assert len(images) == 2 and all(torch.isfinite(z).all() for z in images)
    encodes = [where for name, where in seen if name == "te"]
    decodes = [where for name, where in seen if name == "vae.decode"]
    assert encodes and all(w["te"] == DEVICE and w["vae"] == HOST for w in encodes)  # one visits at a time
    assert decodes and all(w["vae"] == DEVICE and w["te"] == HOST for w in decodes)
    steps = [where for name, where in seen if name == "unet"]
    assert len(steps) == 3 + 2 * 2  # the training forwards and two sampling steps per sample
    assert all(w["te"] == HOST and w["vae"] == HOST for w in steps)  # the encoders back in RAM meanwhile


def test_the_sample_node_path_visits_and_restores(bundle):
    from app.ml.sampling import sample_images

    mover = Mover()
    place = Placement("cpu", mover)
    for m in (bundle.unet, bundle.vae, *bundle.text_encoders):
        place.move(m, HOST)
    seen, handles = watch(bundle, mover)
    try:
        with place.active():
            result = sample_images(bundle, ["red square"], width=16, height=16, steps=2, cfg=1.0, seed=1, sampler="euler")
    finally:
        for h in handles:
            h.remove()
    assert torch.isfinite(result.latents[0]).all()
    part = {"te": "te", "unet": "unet", "vae.decode": "vae"}
    assert [n for n, _ in seen] == ["te", "unet", "unet", "vae.decode"]  # one component on the device at a time
    assert all(w[part[n]] == DEVICE and list(w.values()).count(DEVICE) == 1 for n, w in seen)
    assert {mover.where[id(m)] for m in (bundle.unet, bundle.vae, *bundle.text_encoders)} == {HOST}
    mover.restore()


class Holding(Source):
    """Holds ``extra`` bytes for a moment while it makes each batch: a known peak above the weights."""

    extra = 160 * 2**20

    def batch(self, epoch, index, rank=0, world=1):
        block = torch.ones(self.extra // 4)  # written, so the pages are resident
        assert float(block[-1]) == 1.0
        del block
        return super().batch(epoch, index, rank, world)


def test_the_runs_peak_memory_is_measured(bundle, tmp_path):
    # the TrainLoop node logs it (tests/nodes/test_memory_params.py), next to the plan's prediction
    result = Trainer(bundle, lora(bundle), Holding(bundle, True, True), OPT, TrainSettings(epochs=1), tmp_path,
                     device=torch.device("cpu")).run()
    assert result.peak_kind == "RSS growth over the loaded process"
    assert Holding.extra <= result.peak_bytes < Holding.extra + 400 * 2**20
