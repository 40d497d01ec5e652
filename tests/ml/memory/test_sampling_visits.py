"""Sampling visits the device one component at a time: the text encoders encode the prompts, go back, the denoiser
denoises, goes back, the VAE decodes, goes back; so a sample peaks at the largest component (Flux: the transformer),
not at the sum of all of them. The latents stay what the family's diffusers pipeline makes of the text itself.

On this CPU the device and the host are the same memory, so the placement gets an instrumented mover: a component
"in RAM" holds NaN weights (the real ones kept aside), so any use of a component that is not on the device shows.
"""
from __future__ import annotations

import pytest
import torch

from app.ml.adapters import AdapterConfig, attached, create_adapter_set
from app.ml.memory.placement import DEVICE, HOST, Placement, module_bytes
from app.ml.models import load_model
from app.ml.sampling import sample_images
from app.ml.sampling.generate import build_pipeline
from app.ml.sampling.samplers import make_scheduler
from poison_mover import Mover

MODELS = ["builtin:tiny-sd", "builtin:tiny-sdxl", "builtin:tiny-flux"]
LONG = ", ".join(f"a red cube number {i} on a blue table" for i in range(12))  # past 75 tokens


@pytest.fixture(scope="module", params=MODELS)
def bundle(request):
    return load_model(request.param)


def _parts(bundle):
    parts = {f"te{i}": te for i, te in enumerate(bundle.text_encoders)}
    return {**parts, "denoiser": bundle.denoiser, "vae": bundle.vae}


def _sample_in_ram(bundle, extras=(), prompt="a red cube", **kw):
    """Sample with every component (and ``extras``) starting "in RAM"; returns the result, where every component
    was whenever one of them computed or moved, and where they ended."""
    parts = _parts(bundle)
    states: list[tuple[str, dict]] = []
    mover = Mover()
    now = lambda: {k: mover.where.get(id(m)) for k, m in parts.items()}  # noqa: E731
    mover.on_move = lambda: states.append(("move", now()))
    place = Placement("cpu", mover)
    for m in (*parts.values(), *extras):
        place.move(m, HOST)
    states.clear()
    computing = {**{k: m for k, m in parts.items() if k != "vae"}, "vae": bundle.vae.decoder}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=k: states.append((name, now())))
               for k, m in computing.items()]
    if "true_cfg" in kw:
        kw["options"] = {"true_cfg": kw.pop("true_cfg")}
    try:
        with place.active():
            result = sample_images(bundle, [prompt], width=32, height=32, steps=2, seed=3, sampler="euler", **kw)
        ended = {**now(), **{f"extra{i}": mover.where.get(id(m)) for i, m in enumerate(extras)}}
    finally:
        for h in handles:
            h.remove()
        mover.restore()
    return result, states, ended


def _reference(bundle, prompt="a red cube", *, negative_prompt="", cfg=7.0, clip_skip=1, true_cfg=1.0, seed=3,
               embeds=None):
    """What the family's diffusers pipeline makes of the text itself (every component in place, nothing moved)."""
    gen = torch.Generator("cpu").manual_seed(seed)
    kw = dict(width=32, height=32, num_inference_steps=2, guidance_scale=cfg, generator=gen, output_type="latent")
    if bundle.family.id.startswith("flux"):
        from app.ml.flux.latents import unpack

        pipe = bundle.family.build_pipeline(bundle)
        pipe.set_progress_bar_config(disable=True)
        if true_cfg > 1:
            kw.update(negative_prompt=negative_prompt, true_cfg_scale=true_cfg)
        packed = pipe(prompt=prompt, max_sequence_length=bundle.tokenizers[1].model_max_length, **kw).images
        return unpack(packed, 4, 4)[0].float()
    pipe = build_pipeline(bundle, make_scheduler("euler", bundle.scheduler_config, seed=seed)[0])
    if embeds is not None:  # a long prompt: our 75-token pieces, handed over as embeddings
        kw.update(embeds)
    else:
        kw.update(prompt=prompt, negative_prompt=negative_prompt, clip_skip=(clip_skip - 1) or None)
    return pipe(**kw).images[0].float()


def _one_at_a_time(states):
    for name, w in states:
        tes = [v for k, v in w.items() if k.startswith("te")]
        on = {k for k, v in w.items() if v == DEVICE}
        assert not (DEVICE in tes and "denoiser" in on), (name, w)  # never a text encoder beside the denoiser
        assert not ("denoiser" in on and "vae" in on), (name, w)
        assert not (DEVICE in tes and "vae" in on), (name, w)
        if name != "move":
            assert w[name] == DEVICE, (name, w)  # what computes is on the device


def test_one_component_on_the_device_at_a_time_and_all_back(bundle):
    extra = {"true_cfg": 2.0} if bundle.family.id.startswith("flux") else {"clip_skip": 2}
    result, states, ended = _sample_in_ram(bundle, negative_prompt="blurry", cfg=5.0, **extra)
    assert torch.isfinite(result.latents[0]).all()  # nothing computed with a component left "in RAM"
    computed = [n for n, _ in states if n != "move"]
    assert computed[0].startswith("te") and computed[-1] == "vae" and "denoiser" in computed
    first_denoise, last_denoise = computed.index("denoiser"), len(computed) - 1 - computed[::-1].index("denoiser")
    assert all(n.startswith("te") for n in computed[:first_denoise])  # encode, then denoise, then decode
    assert all(n == "denoiser" for n in computed[first_denoise:last_denoise + 1])
    _one_at_a_time(states)
    assert set(ended.values()) == {HOST}  # everything ends where it started
    size = {k: module_bytes(m) for k, m in _parts(bundle).items()}
    peak = max(sum(size[k] for k, v in w.items() if v == DEVICE) for _, w in states)
    text = sum(v for k, v in size.items() if k.startswith("te"))
    assert peak == max(text, size["denoiser"], size["vae"]) < sum(size.values())  # the largest, not the sum


@pytest.mark.parametrize("case", ["plain", "negative", "long"])
def test_latents_are_what_the_pipeline_makes_of_the_text(bundle, case):
    flux = bundle.family.id.startswith("flux")
    if case == "plain":
        kw = dict(negative_prompt="", cfg=7.0)
    elif case == "negative":
        extra = {"true_cfg": 2.0} if flux else {"clip_skip": 2} if bundle.family.id == "sdxl" else {}
        kw = dict(negative_prompt="blurry, dark", cfg=5.0, **extra)
    else:
        kw = dict(negative_prompt="blurry", cfg=5.0)
    prompt = LONG if case == "long" else "a red cube"
    got, states, _ = _sample_in_ram(bundle, prompt=prompt, **kw)
    embeds = None
    if case == "long" and not flux:  # past 75 tokens: two 75-token pieces each (A1111's long prompts)
        from app.ml.sampling.generate import _long_prompt_embeds

        embeds = _long_prompt_embeds(bundle, prompt, kw["negative_prompt"], 1)
        assert embeds["prompt_embeds"].shape[1] > 77
    want = _reference(bundle, prompt, embeds=embeds, **kw)
    assert torch.equal(got.latents[0], want)
    _one_at_a_time(states)


def test_a_text_encoder_lora_still_applies_while_the_encoders_visit(bundle):
    config = AdapterConfig(rank=4, alpha=4, targets={"text_encoder": "attn-only"}, seed=1)
    aset = create_adapter_set(bundle, config)
    with torch.no_grad():
        for p in aset.parameters():
            p.normal_(0, 0.2)
    plain = _reference(bundle)
    with attached(bundle, aset, 1.0):
        want = _reference(bundle)
    assert not torch.equal(want, plain)  # the LoRA changes the text, so the test can tell
    got, states, ended = _sample_in_ram(bundle, extras=(aset,), adapters=aset, negative_prompt="", cfg=7.0)
    assert torch.equal(got.latents[0], want)
    _one_at_a_time(states)
    assert set(ended.values()) == {HOST}


def test_sd_clip_skip_takes_the_penultimate_layer_for_both_prompts():
    """diffusers' SD pipeline cannot skip on transformers 5's flat CLIPTextModel (it reaches for
    ``text_model.final_layer_norm``); the sample takes the penultimate layer through the final norm for the prompt and
    the negative prompt, as A1111 does, and hands the pipeline those embeddings."""
    bundle = load_model("builtin:tiny-sd")
    te, tok = bundle.text_encoders[0], bundle.tokenizers[0]

    def penultimate(text):
        ids = tok([text], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            return te.final_layer_norm(te(ids, output_hidden_states=True).hidden_states[-2])

    want = _reference(bundle, embeds={"prompt_embeds": penultimate("a red cube"),
                                      "negative_prompt_embeds": penultimate("blurry")}, cfg=5.0)
    got, states, ended = _sample_in_ram(bundle, negative_prompt="blurry", cfg=5.0, clip_skip=2)
    assert torch.equal(got.latents[0], want)
    assert not torch.equal(want, _reference(bundle, negative_prompt="blurry", cfg=5.0))  # the skip shows
    _one_at_a_time(states)
    assert set(ended.values()) == {HOST}


def test_a_streamed_denoiser_keeps_streaming_while_training_samples(tmp_path):
    """With blocks_to_swap the run places the denoiser with its blocks streaming; a sample during the run uses it so
    (no block moves in whole), with the text encoder and the VAE back in RAM while it denoises."""
    import torch.nn as nn

    from app.ml.adapters import AdapterConfig
    from app.ml.handle import ModelHandle
    from app.ml.train.loop import Batch, Hooks, Trainer, TrainSettings
    from app.ml.train.trainables import AdapterTrainable

    bundle = load_model("builtin:tiny-sd")
    blocks = bundle.family.swappable_blocks(bundle.denoiser)
    parts = {"te": bundle.text_encoders[0], "vae": bundle.vae}
    mover = Mover()
    sampling, record, whole = [False], [], []
    mover.on_move = lambda: whole.append(sampling[0] and mover.where.get(id(bundle.denoiser)) == HOST)

    def hook(block):
        def pre(module, args):  # every layer of a block says where its block is when it computes in a sample
            if sampling[0]:
                record.append((mover.where.get(id(block), DEVICE), {k: mover.where.get(id(v)) for k, v in parts.items()}))
        return pre

    for block in blocks:
        for m in block.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.register_forward_pre_hook(hook(block))
    latents = []

    def sample(step, epoch):
        sampling[0] = True
        try:
            latents.extend(sample_images(bundle, ["red square"], width=16, height=16, steps=2, cfg=1.0, seed=1,
                                         sampler="euler").latents)
        finally:
            sampling[0] = False

    class Cached:
        def __init__(self):
            g = torch.Generator().manual_seed(0)
            self.latents = bundle.encode_images(torch.rand((2, 3, 16, 16), generator=g) * 2 - 1)
            self.text = bundle.encode_prompts(["red square", "blue circle"])

        def iterations(self, epoch):
            return 2

        def batch(self, epoch, index, rank=0, world=1):
            return Batch(captions=["red square", "blue circle"], loss_weights=torch.ones(2), pixels=None,
                         latents=self.latents, text=self.text)

    config = AdapterConfig(rank=4, alpha=4, targets={"unet": "attn-only"}, seed=1)
    trainable = AdapterTrainable(ModelHandle(bundle).with_adapter(create_adapter_set(bundle, config)))
    settings = TrainSettings(epochs=1, blocks_to_swap=len(blocks) - 1, sample_every=1, sample_unit="steps")
    try:
        Trainer(bundle, trainable, Cached(), {"optimizer": "adamw", "lr": 1e-3}, settings, tmp_path,
                Hooks(sample=sample), device=torch.device("cpu"), mover=mover).run()
    finally:
        mover.restore()
    assert latents and all(torch.isfinite(z).all() for z in latents)
    assert record and all(where == DEVICE for where, _ in record)  # every block computed on the device
    assert all(others == {"te": HOST, "vae": HOST} for _, others in record)
    assert not any(whole)  # the denoiser was never put back in RAM whole by the sample
