"""The two tiny tokenizers learn from one word list, and the shipped CLIP files are what the script makes."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "app" / "ml" / "models" / "assets"


def _generator():
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", ASSETS / "make_tiny_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_both_tiny_tokenizers_learn_from_the_one_word_list():
    from app.ml.flux import t5_tokenizer
    from app.ml.tiny_words import WORDS

    assert t5_tokenizer.WORDS is WORDS
    assert _generator().WORDS is WORDS
    assert len(WORDS) == len(set(WORDS)) and {"red", "circle", "photo", "ohwx"} <= set(WORDS)


def test_shipped_clip_tokenizer_is_what_the_script_generates():
    vocab, merges = _generator().build()
    shipped = ASSETS / "tiny_clip_tokenizer"
    assert (shipped / "vocab.json").read_text(encoding="utf-8") == json.dumps(vocab, ensure_ascii=False, indent=0) + "\n"
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    assert (shipped / "merges.txt").read_text(encoding="utf-8") == "\n".join(lines) + "\n"
