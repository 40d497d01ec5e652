"""The tiny T5 sentencepiece tokenizer for the tiny Flux test model (backs the family's tokenizer loading
for ``builtin:tiny-flux``).

The real T5-XXL vocabulary (32,128 pieces) cannot be downloaded here and is far too big for a tiny
encoder, so a unigram sentencepiece model is trained on a small built-in word list with T5's
conventions (pad 0, eos 1, unk 2, no bos; the nmt_nfkc normaliser, since transformers rejects
"identity"). Its normaliser table alone is ~240 KB, so rather than ship the file it is generated at
first use (under a second) into a cache folder named by a hash of its inputs, and written atomically
so concurrent processes never see half a folder. Training is single-threaded and deterministic: the
same pieces come out on every machine.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from pathlib import Path

from app.ml.tiny_words import WORDS  # the same words as the tiny CLIP tokenizer's

VOCAB_SIZE = 96
MAX_LENGTH = 512  # Flux dev pads T5 prompts to 512 tokens (schnell: 256)
_FORMAT = 1  # bump when the training recipe changes, so old cache folders are not reused


class TokenizerBuildError(RuntimeError):
    pass


def _sentences() -> list[str]:
    """Short phrases over the word list (every word several times, in a fixed order)."""
    out = []
    for i, word in enumerate(WORDS):
        out.append(f"a {word}")
        out.append(f"{word} {WORDS[(i * 7 + 3) % len(WORDS)]} {WORDS[(i * 13 + 5) % len(WORDS)]}")
    return out


def train_spiece(vocab_size: int = VOCAB_SIZE) -> bytes:
    """The serialised sentencepiece model (``spiece.model`` bytes)."""
    try:
        import sentencepiece as spm
    except ImportError as exc:  # pragma: no cover - a dependency in pyproject.toml
        raise TokenizerBuildError(
            "builtin:tiny-flux: building its T5 tokenizer needs the 'sentencepiece' and 'protobuf' packages; "
            "install them with: pip install sentencepiece protobuf"
        ) from exc
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_sentences()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def _fingerprint() -> str:
    h = hashlib.sha256(f"{_FORMAT}|{VOCAB_SIZE}|{MAX_LENGTH}|".encode() + "\n".join(_sentences()).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$NODETRAINER_CACHE``, else ``$XDG_CACHE_HOME/nodetrainer``, else ``~/.cache/nodetrainer``."""
    if os.environ.get("NODETRAINER_CACHE"):
        return Path(os.environ["NODETRAINER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nodetrainer"


def tiny_t5_tokenizer_dir(root: Path | None = None) -> Path:
    """The folder holding the tiny T5 tokenizer (``spiece.model``, ``tokenizer.json``, config); built if missing."""
    root = Path(root) if root is not None else cache_root()
    final = root / f"tiny_t5_tokenizer-{_fingerprint()}"
    if (final / "tokenizer_config.json").is_file():
        return final
    from transformers import T5Tokenizer

    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny_t5_", dir=root))
    except OSError as exc:
        raise TokenizerBuildError(
            f"builtin:tiny-flux: cannot write its T5 tokenizer into {root} ({exc}); "
            "set NODETRAINER_CACHE to a writable folder."
        ) from exc
    try:
        (tmp / "spiece.model").write_bytes(train_spiece())
        # from_pretrained(dir), not T5Tokenizer(vocab_file=...): transformers 5 silently builds a
        # near-empty vocabulary from the latter.
        tok = T5Tokenizer.from_pretrained(str(tmp), extra_ids=0, model_max_length=MAX_LENGTH, legacy=False)
        tok.save_pretrained(str(tmp))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "tokenizer_config.json").is_file():  # not another process winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_tiny_t5_tokenizer(root: Path | None = None):
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(tiny_t5_tokenizer_dir(root)), model_max_length=MAX_LENGTH)
