"""Embeddings patch into the shared model only while attached: the placeholder reads as its vectors,
the tokenizer and token table are exactly as before afterwards, and only the new vectors train."""
from __future__ import annotations

import copy

import pytest
import torch

from app.ml.adapters import attached
from app.ml.embeddings import (
    EmbeddingError,
    create_embedding,
    embeddings_identity,
    expand_caption,
    known_token_warning,
)
from app.ml.handle import ModelHandle
from app.ml.sampling import sample_images
from embedding_helpers import tokenizes_like_a_word

PROMPTS = ["a <ohwx> shape", "a red square", "<ohwx>", "a blue circle, <ohwx> and <ohwx>", ""]


def _state(bundle):
    """Everything a patch could leave behind: vocab, added tokens, ids, instance attributes, tables."""
    out = []
    for tok, te in zip(bundle.tokenizers, bundle.text_encoders):
        out.append((
            len(tok), dict(tok.get_vocab()), dict(tok.added_tokens_encoder), sorted(tok.__dict__),
            [tok(p).input_ids for p in PROMPTS], tok.tokenize(PROMPTS[0]),
            te.get_input_embeddings().weight.detach().clone(), len(te._forward_hooks), len(te._forward_pre_hooks),
            len(te.get_input_embeddings()._forward_hooks),
        ))
    return out


def _assert_same(a, b):
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if torch.is_tensor(u):
                assert torch.equal(u, v)
            else:
                assert u == v


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_placeholder_encodes_as_its_vectors_and_leaves_nothing_behind(name, request):
    bundle = request.getfixturevalue(name)
    before = _state(bundle)
    # vectors seeded from "red square": the placeholder must encode exactly as those words do
    emb = create_embedding(bundle, "<ohwx>", 2, "red square")
    want = bundle.encode_prompts(["a red square shape"])
    plain = bundle.encode_prompts(["a <ohwx> shape"])
    with attached(bundle, [emb]):
        got = bundle.encode_prompts(["a <ohwx> shape"])
        ids = bundle.tokenize(["a <ohwx> shape"])
    for key in want:  # prompt_embeds (both encoders for SDXL) and SDXL's pooled output
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        assert (plain[key] - want[key]).abs().max() > 1e-3  # without the embedding the words differ
    for tok, row in zip(bundle.tokenizers, ids):
        v = len(tok)
        assert row[0, :6].tolist() == [tok.bos_token_id, *tok("a", add_special_tokens=False).input_ids, v, v + 1,
                                       *tok("shape", add_special_tokens=False).input_ids, tok.eos_token_id][:6]
    _assert_same(before, _state(bundle))


def test_other_ids_unchanged_and_slots_follow_the_vector_count(sd):
    tok = sd.tokenizers[0]
    v = len(tok)
    texts = ["a red square", "red, blue; circle!", "<ohwx>y is not the token", "ohwx"]
    plain = [tok(t).input_ids for t in texts]
    for n in (1, 3, 5, 2):  # sequential runs with other counts: never stacked
        emb = create_embedding(sd, "<ohwx>", n, "red")
        with attached(sd, emb):
            assert [tok(t).input_ids for t in texts[:2]] == plain[:2]
            ids = tok("a <ohwx> b").input_ids
            assert ids[2:2 + n] == list(range(v, v + n))
            assert len(ids) == 4 + n
            assert tok("ohwx").input_ids == plain[3]  # the bare word is not the placeholder
            assert tok.decode(ids, skip_special_tokens=True) == "a <ohwx> b"
        assert len(tok) == v and tok("a <ohwx> b").input_ids == tok("a <ohwx> b").input_ids


def test_bare_word_token_matches_only_whole_words(sd):
    tok = sd.tokenizers[0]
    emb = create_embedding(sd, "ohwx", 1, "red")
    plain = tok("ohwxy", add_special_tokens=False).input_ids
    with attached(sd, emb):
        assert tok("ohwx", add_special_tokens=False).input_ids == [len(tok)]
        assert tok("ohwxy", add_special_tokens=False).input_ids == plain


def test_two_embeddings_coexist_and_nesting_does_not_stack(sd):
    tok = sd.tokenizers[0]
    v = len(tok)
    a = create_embedding(sd, "<a>", 2, "red square")
    b = create_embedding(sd, "<b>", 3, "blue circle")
    want = sd.encode_prompts(["red square and blue circle *"])["prompt_embeds"]  # "blue circle" padded with "*"
    with attached(sd, [a, b]):
        got = sd.encode_prompts(["<a> and <b>"])["prompt_embeds"]
        assert tok("<b> <a>", add_special_tokens=False).input_ids == [v + 2, v + 3, v + 4, v, v + 1]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)

    with attached(sd, a):
        with attached(sd, b):  # nested: the inner block adds its slots after the outer ones
            assert tok("<a> <b>", add_special_tokens=False).input_ids == [v, v + 1, v + 2, v + 3, v + 4]
        assert tok("<a> <b>", add_special_tokens=False).input_ids[:2] == [v, v + 1]
        assert max(tok("<a> <b>", add_special_tokens=False).input_ids[2:]) < v  # <b> is plain text again
        other = create_embedding(sd, "<a>", 4, "red")
        with pytest.raises(EmbeddingError, match="placeholder <a>"):
            with attached(sd, other):
                pass
        with pytest.raises(EmbeddingError, match="already attached"):
            with attached(sd, a):
                pass
        assert tok("<a>", add_special_tokens=False).input_ids == [v, v + 1]  # the refusals left the outer intact
    assert len(tok) == v and "_encode_plus" not in tok.__dict__


def test_training_step_changes_only_the_new_vectors(sd):
    te = sd.text_encoders[0]
    te_before = {k: t.clone() for k, t in te.state_dict().items()}
    emb = create_embedding(sd, "<ohwx>", 2, "red")
    start = emb.vectors["text_encoder"].detach().clone()
    opt = torch.optim.AdamW([{"params": p} for p in emb.parameter_groups().values()], lr=5e-3)
    target = sd.encode_prompts(["a blue circle"])["prompt_embeds"]
    with attached(sd, [emb]):
        for _ in range(2):
            out = sd.encode_prompts(["a <ohwx>"], with_grad=True)["prompt_embeds"]
            loss = torch.nn.functional.mse_loss(out, target)
            opt.zero_grad()
            loss.backward()
            assert all(p.grad is None for p in te.parameters())
            opt.step()
    assert not torch.equal(emb.vectors["text_encoder"].detach(), start)
    for k, t in te.state_dict().items():
        assert torch.equal(t, te_before[k]), k


def test_deep_copy_trains_apart_and_state_dict_round_trips(sd):
    emb = create_embedding(sd, "<ohwx>", 3, "red")
    twin = copy.deepcopy(emb)
    with torch.no_grad():
        twin.vectors["text_encoder"].add_(1.0)
    assert not torch.equal(twin.vectors["text_encoder"], emb.vectors["text_encoder"])
    emb.load_state_dict(twin.state_dict())
    assert torch.equal(twin.vectors["text_encoder"], emb.vectors["text_encoder"])
    emb.requires_grad_(False)
    assert not emb.trainable and emb.parameter_groups() == {}
    emb.trainable = True
    assert list(emb.parameter_groups()) == ["embedding"] and emb.num_vectors == 3 and emb.family_id == sd.family.id


def test_sample_on_a_handle_uses_the_embedding(sd):
    """Sampling goes through the diffusers pipeline's own tokenizer call: the patch must reach it."""
    emb = create_embedding(sd, "<ohwx>", 2, "red square")
    handle = ModelHandle(sd).with_adapter(emb)
    kw = dict(width=64, height=64, steps=3, seed=5, sampler="Euler")
    ours = sample_images(sd, "a <ohwx>", adapters=handle.adapter_pairs(), **kw)
    words = sample_images(sd, "a red square", **kw)
    plain = sample_images(sd, "a <ohwx>", **kw)
    torch.testing.assert_close(ours.latents[0], words.latents[0], rtol=0, atol=1e-5)
    assert (plain.latents[0] - words.latents[0]).abs().max() > 1e-3
    with handle.patched():
        again = sample_images(sd, "a <ohwx>", **kw)
    torch.testing.assert_close(again.latents[0], words.latents[0], rtol=0, atol=1e-5)


def test_long_prompts_count_the_slots(sd):
    emb = create_embedding(sd, "<ohwx>", 10, "red")
    with attached(sd, emb):
        assert sd.token_counts(["a <ohwx>"]) == [11]
        ids = sd.tokenize(["a " * 70 + "<ohwx>"], chunks=2)[0]  # 70 + 10 tokens: two pieces
        v = len(sd.tokenizers[0])
        assert (ids >= v).sum() == 10 and ids.shape == (1, 2, 77)


def test_wrong_family_refused_by_name(sd, sdxl):
    emb = create_embedding(sd, "<ohwx>", 1, "red")
    with pytest.raises(EmbeddingError, match="made for Stable Diffusion 1.5 but the model is Stable Diffusion XL"):
        with attached(sdxl, emb):
            pass
    assert "_encode_plus" not in sdxl.tokenizers[0].__dict__


def test_helpers(sd):
    emb = create_embedding(sd, "<ohwx>", 1)
    assert expand_caption("a <embedding> on grass", [emb]) == ("a <ohwx> on grass", False)
    assert expand_caption("a photo of <ohwx>", emb) == ("a photo of <ohwx>", False)
    assert expand_caption("a photo", [emb], prepend_missing=False) == ("a photo", True)
    assert expand_caption("a photo", [emb], prepend_missing=True) == ("<ohwx> a photo", True)
    assert known_token_warning(sd, "<ohwx>") is None
    assert "'red'" in known_token_warning(sd, "red")
    ident = embeddings_identity([(emb, 1.0)])
    assert ident and embeddings_identity([]) == ""
    with torch.no_grad():
        emb.vectors["text_encoder"].add_(1e-3)
    assert embeddings_identity([emb]) != ident
    with pytest.raises(EmbeddingError, match="1 to 75"):
        create_embedding(sd, "<x>", 76)
    with pytest.raises(EmbeddingError, match="space"):
        create_embedding(sd, "my token", 1)
    with pytest.raises(EmbeddingError, match="<\\|endoftext\\|> is a special token of the CLIP ViT-L/14 tokenizer"):
        create_embedding(sd, "<|endoftext|>", 1)


def test_a_block_ending_elsewhere_never_shifts_anothers_slots(sd):
    """Blocks on two threads end in any order: an embedding keeps its slots while it is attached."""
    tok = sd.tokenizers[0]
    v = len(tok)
    a = create_embedding(sd, "<a>", 2, "red square")
    b = create_embedding(sd, "<b>", 2, "blue circle")
    c = create_embedding(sd, "<c>", 1, "red")
    want_b = sd.encode_prompts(["a blue circle"])["prompt_embeds"]
    block_a, block_b = attached(sd, a), attached(sd, b)
    block_a.__enter__()
    block_b.__enter__()
    ids_b = tok("a <b>").input_ids
    block_a.__exit__(None, None, None)  # not the innermost block
    try:
        assert tok("a <b>").input_ids == ids_b == [tok.bos_token_id, 320, v + 2, v + 3, tok.eos_token_id]
        torch.testing.assert_close(sd.encode_prompts(["a <b>"])["prompt_embeds"], want_b, rtol=0, atol=1e-6)
        with attached(sd, c):  # reuses the freed range
            assert tok("<c> <b>", add_special_tokens=False).input_ids == [v, v + 2, v + 3]
            want = sd.encode_prompts(["red blue circle"])["prompt_embeds"]
            torch.testing.assert_close(sd.encode_prompts(["<c> <b>"])["prompt_embeds"], want, rtol=0, atol=1e-6)
        with pytest.raises(EmbeddingError, match="belongs to no embedding attached now"):
            sd.text_encoders[0](torch.tensor([[tok.bos_token_id, v, tok.eos_token_id]]))
    finally:
        block_b.__exit__(None, None, None)
    assert "_encode_plus" not in tok.__dict__ and tok("a <b>").input_ids != ids_b


def test_pooled_output_reads_the_real_end_of_text_on_legacy_configs():
    """Real SD/SDXL CLIP configs say eos_token_id 2, so CLIP pools at the highest id in the prompt: the
    slot ids past the vocabulary must not be seen there (A1111/ComfyUI pool at the end-of-text token)."""
    from app.ml.models import load_model

    xl = load_model("builtin:tiny-sdxl")
    pooled_te = xl.text_encoders[1]
    pooled_te.text_model.eos_token_id = 2  # what real SDXL checkpoints' configs carry
    emb = create_embedding(xl, "<ohwx>", 2, "red square")
    want = xl.encode_prompts(["a red square shape"])["pooled_prompt_embeds"]
    with attached(xl, emb):
        got = xl.encode_prompts(["a <ohwx> shape"])["pooled_prompt_embeds"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_low_precision_encoder_trains_fp32_vectors(sd):
    import dataclasses

    te16 = copy.deepcopy(sd.text_encoders[0]).to(torch.bfloat16)
    bf = dataclasses.replace(sd, text_encoders=(te16,))
    emb = create_embedding(bf, "<ohwx>", 2, "red")
    with attached(bf, emb):
        out = bf.encode_prompts(["a <ohwx>"], with_grad=True)["prompt_embeds"]
        out.square().mean().backward()
    grad = emb.vectors["text_encoder"].grad
    assert emb.vectors["text_encoder"].dtype == torch.float32 and grad.dtype == torch.float32
    assert grad.abs().sum() > 0 and all(p.grad is None for p in te16.parameters())


def test_long_prompt_sampling_and_merging_with_an_embedding(sd):
    from app.ml.adapters import merged_state_dicts

    emb = create_embedding(sd, "<ohwx>", 10, "red")
    prompt = "a " * 70 + "<ohwx>"  # 80 tokens with the slots: encoded in two 75-token pieces
    kw = dict(width=64, height=64, steps=2, seed=1, sampler="Euler")
    with_emb = sample_images(sd, prompt, adapters=[emb], **kw)
    without = sample_images(sd, prompt, **kw)
    assert (with_emb.latents[0] - without.latents[0]).abs().max() > 1e-3
    merged = merged_state_dicts(sd, [(emb, 1.0)])  # an embedding merges into no weight: the base tensors
    base = sd.text_encoders[0].state_dict()
    assert merged["text_encoder"].keys() == base.keys()
    assert all(merged["text_encoder"][k].data_ptr() == v.data_ptr() for k, v in base.items())


def test_clip_matches_the_placeholder_in_any_case(sd):
    tok = sd.tokenizers[0]
    emb = create_embedding(sd, "<ohwx>", 1, "red")
    with attached(sd, emb):  # CLIP lowercases prompts: A1111 users write <OHWX> for <ohwx>
        assert tok("<OHWX>", add_special_tokens=False).input_ids == [len(tok)]
        with pytest.raises(EmbeddingError, match="placeholder <ohwx> is attached"):
            with attached(sd, create_embedding(sd, "<OHWX>", 1)):
                pass


def test_a_copy_of_an_encoder_sharing_the_tokenizer_is_patched_too(sd):
    """A full fine-tune trains copies of the encoders next to the shared tokenizer: both must read the vectors."""
    import dataclasses

    twin = dataclasses.replace(sd, text_encoders=(copy.deepcopy(sd.text_encoders[0]),))
    a = create_embedding(sd, "<a>", 2, "red square")
    b = create_embedding(sd, "<b>", 2, "blue circle")
    with attached(sd, a), attached(twin, b):
        got = twin.encode_prompts(["<a> <b>"])["prompt_embeds"]
        base = sd.encode_prompts(["<a> <b>"])["prompt_embeds"]
    want = sd.encode_prompts(["red square blue circle"])["prompt_embeds"]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(base, want, rtol=0, atol=1e-6)


def test_a_refused_attach_leaves_no_patch(sdxl):
    import dataclasses

    tok = sdxl.tokenizers[0]
    shared = dataclasses.replace(sdxl, tokenizers=(tok, tok))  # one tokenizer for both encoders
    half = create_embedding(shared, "<ohwx>", 1, "red", encoders=["clip_l"])
    before = _state(sdxl)
    with pytest.raises(EmbeddingError, match="no vectors for text_encoder_2, which shares its tokenizer"):
        with attached(shared, half):
            pass
    _assert_same(before, _state(sdxl))
    with attached(shared, create_embedding(shared, "<ohwx>", 1, "red")):  # covering both is fine
        assert tok("<ohwx>", add_special_tokens=False).input_ids == [len(tok)]
    _assert_same(before, _state(sdxl))


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_denoising_step_trains_only_the_new_vectors(name, request):
    """A full training step (prompt -> text encoders -> UNet -> noise loss): the model stays bit-identical."""
    bundle = request.getfixturevalue(name)
    models = {"unet": bundle.unet, "vae": bundle.vae, **{f"te{i}": te for i, te in enumerate(bundle.text_encoders)}}
    before = {n: {k: t.clone() for k, t in m.state_dict().items()} for n, m in models.items()}
    emb = create_embedding(bundle, "<ohwx>", 2, "red")
    start = {c: v.detach().clone() for c, v in emb.vectors.items()}
    opt = torch.optim.AdamW(emb.parameter_groups()["embedding"], lr=5e-3)
    sched = bundle.make_noise_scheduler()
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.tensor([100, 700])
    with attached(bundle, emb):
        text = bundle.encode_prompts(["a <ohwx> shape", "<ohwx>"], with_grad=True)
        cond = bundle.family.conditioning(bundle, text, pixel_size=(64, 64), batch=2, device=latents.device)
        pred = bundle.family.predict(bundle.unet, sched.add_noise(latents, noise, t), t, cond)
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for c, v in emb.vectors.items():
        assert not torch.equal(v.detach(), start[c]), c  # every covered encoder's vectors learn
    for n, m in models.items():
        assert all(p.grad is None for p in m.parameters()), n
        for k, v in m.state_dict().items():
            assert torch.equal(v, before[n][k]), (n, k)


def test_tokenizer_options_behave_as_without_the_patch(sd):
    tokenizes_like_a_word(sd, create_embedding(sd, "<ohwx>", 1), "red")
