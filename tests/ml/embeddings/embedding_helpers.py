"""Helpers shared by the embedding tests."""
from __future__ import annotations

import pytest
import torch

from app.ml.adapters import attached

KWARGS = [
    {}, {"add_special_tokens": False}, {"return_tensors": "pt"}, {"padding": True, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 12, "truncation": True, "return_tensors": "pt"},
    {"padding": "max_length", "max_length": 5, "truncation": True}, {"truncation": True, "max_length": 4},
    {"return_length": True, "padding": "longest"}, {"return_attention_mask": False}, {"pad_to_multiple_of": 8, "padding": True},
]


def tokenizes_like_a_word(bundle, emb, word: str):
    """With a one-vector embedding, a prompt with the placeholder tokenizes like the same prompt with a
    one-token word in its place, for every tokenizer option the code base and diffusers use."""
    texts = ["a {0} shape", "{0}", "big {0} and {0} circle"]
    for tok in bundle.tokenizers:
        (wid,) = tok(word, add_special_tokens=False).input_ids
        for kw in KWARGS:
            for batch in (False, True):
                with_word = [t.format(word) for t in texts] if batch else texts[0].format(word)
                placeholder = [t.format(emb.token) for t in texts] if batch else texts[0].format(emb.token)
                try:
                    plain = tok(with_word, **kw)
                except ValueError:  # ragged rows as tensors: refused with or without the patch
                    with attached(bundle, emb), pytest.raises(ValueError):
                        tok(placeholder, **kw)
                    continue
                with attached(bundle, emb):
                    got = tok(placeholder, **kw)
                assert set(got.keys()) == set(plain.keys()), kw
                for key in plain:
                    assert type(got[key]) is type(plain[key]), (key, kw)
                    have = _lists(got[key])
                    if key == "input_ids":
                        have = _swap(have, len(tok), wid)
                    assert have == _lists(plain[key]), (key, kw, batch)


def _lists(x):
    return x.tolist() if torch.is_tensor(x) else x


def _swap(ids, old: int, new: int):
    return [_swap(i, old, new) for i in ids] if isinstance(ids, list) else (new if ids == old else ids)
