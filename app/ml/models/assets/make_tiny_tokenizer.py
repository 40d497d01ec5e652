"""Generate the tiny CLIP byte-level BPE tokenizer shipped in ``tiny_clip_tokenizer/``.

Real CLIP vocabularies (49,408 entries) cannot be downloaded here and are far too big for tiny test
models, so this script learns a few hundred BPE merges over a small word list with the same
conventions as OpenAI's CLIP tokenizer: byte-to-unicode base symbols, an ``</w>`` end-of-word
suffix, vocab order "bytes, bytes+</w>, merges, <|startoftext|>, <|endoftext|>". The result loads
with transformers' ``CLIPTokenizer`` like the real files do, and common prompt words ("red",
"circle", "photo") become single tokens so tiny models can learn word-level conditioning.

Run ``python app/ml/models/assets/make_tiny_tokenizer.py`` to regenerate; the output is
deterministic (ties are broken lexicographically), so re-running gives identical files.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from app.ml.models.tokenizers import bytes_to_unicode  # noqa: E402  (the one table the loader uses too)
from app.ml.tiny_words import WORDS  # noqa: E402  (the T5 tokenizer learns from them too)

OUT_DIR = Path(__file__).resolve().parent / "tiny_clip_tokenizer"
NUM_MERGES = 320


def learn_merges(words: list[str], num_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training on a word-frequency table (every word counted once)."""
    byte_encoder = bytes_to_unicode()
    corpus: Counter[tuple[str, ...]] = Counter()
    for word in words:
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] += 1

    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in corpus.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, freq in corpus.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += freq
        corpus = merged
    return merges


def build() -> tuple[dict[str, int], list[tuple[str, str]]]:
    merges = learn_merges(WORDS, NUM_MERGES)
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    return vocab, merges


def main() -> None:
    vocab, merges = build()
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (OUT_DIR / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} vocab entries and {len(merges)} merges to {OUT_DIR}")


if __name__ == "__main__":
    main()
