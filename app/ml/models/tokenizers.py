"""Finding CLIP tokenizers offline for models that do not ship one (single-file checkpoints).

Every SD-family model uses the same OpenAI CLIP BPE vocabulary (49,408 tokens); only the padding
token differs (SD2 and SDXL's second encoder pad with "!"). A single-file checkpoint carries no
tokenizer, and we cannot download one, so we look, in order, for:

1. a folder the user passes (``tokenizer=``, then ``config=``): a diffusers model folder or one holding
   ``tokenizer/`` (and ``tokenizer_2/``), a folder with ``vocab.json`` + ``merges.txt``, or
   OpenAI/OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz`` file;
2. the same beside the checkpoint;
3. the BPE file shipped inside the ``open_clip_torch`` package, if installed (located without
   importing it), converted in memory to the vocab/merges transformers expects.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path
from typing import Any

from .families import ModelFamily, ModelLoadError

CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's reversible byte -> printable unicode table (the GPT-2 scheme)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def vocab_from_clip_bpe(path: "str | Path") -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` into (vocab, merges) as CLIPTokenizer wants.

    Same construction as the reference ``SimpleTokenizer``: the first 49,152 - 256 - 2 merges,
    vocab = bytes, bytes + "</w>", merged pairs, then the two special tokens.
    """
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    n_merges = min(49152 - 256 - 2, len(lines) - 1)
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges] if line.strip()]
    base = list(bytes_to_unicode().values())
    tokens = base + [t + "</w>" for t in base] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for t in tokens:
        vocab.setdefault(t, len(vocab))
    return vocab, merges


def _open_clip_bpe() -> Path | None:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / CLIP_BPE_FILENAME
        if p.is_file():
            return p
    return None


def _tokenizer_kwargs(config_dir: Path, name: str, pad_token: str) -> dict[str, Any]:
    cfg_path = config_dir / name / "tokenizer_config.json"
    kwargs: dict[str, Any] = {"model_max_length": _MAX_LENGTH, "pad_token": pad_token}
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        kwargs["pad_token"] = cfg.get("pad_token", pad_token)
        kwargs["model_max_length"] = int(cfg.get("model_max_length", _MAX_LENGTH))
    return kwargs


def _from_folder(folder: Path, kwargs: dict[str, Any]):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), **kwargs)


def _from_bpe(bpe: Path, kwargs: dict[str, Any]):
    from transformers import CLIPTokenizer

    vocab, merges = vocab_from_clip_bpe(bpe)
    return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)


def _is_tokenizer_folder(folder: Path) -> bool:
    """transformers 5 saves tokenizer.json only; older folders have vocab.json + merges.txt."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _candidates(root: Path, name: str) -> list[tuple[str, Path]]:
    """Places under ``root`` that could hold the tokenizer called ``name`` ("tokenizer"/"tokenizer_2")."""
    found = []
    for folder in (root / name, root / "tokenizer", root):
        if _is_tokenizer_folder(folder):
            found.append(("folder", folder))
    if root.is_file() and root.name.endswith(".txt.gz"):
        found.append(("bpe", root))
    elif (root / CLIP_BPE_FILENAME).is_file():
        found.append(("bpe", root / CLIP_BPE_FILENAME))
    return found


def find_tokenizers(
    family: ModelFamily,
    config_dir: Path,
    *,
    checkpoint: Path,
    user_path: "str | Path | None" = None,
    extra_roots: "list[Path] | tuple[Path, ...]" = (),
) -> tuple[list, list[str]]:
    """Load one tokenizer per text encoder of ``family``; returns (tokenizers, where each came from)."""
    roots: list[Path] = []
    if user_path is not None:
        up = Path(user_path).expanduser()
        if not up.exists():
            raise ModelLoadError(f"Tokenizer path {up} does not exist.")
        roots.append(up)
    roots.extend(Path(r) for r in extra_roots)
    roots.append(checkpoint.parent)
    bundled = _open_clip_bpe()

    tokenizers, origins = [], []
    for te in family.text_encoders:
        kwargs = _tokenizer_kwargs(config_dir, te.tokenizer, te.pad_token)
        chosen = None
        for root in roots:
            cands = _candidates(root, te.tokenizer)
            if cands:
                chosen = cands[0]
                break
        if chosen is None and bundled is not None:
            chosen = ("bpe", bundled)
        if chosen is None:
            places = " or ".join(str(r) for r in roots)
            raise ModelLoadError(
                f"{checkpoint.name}: a single-file checkpoint carries no tokenizer and none can be downloaded here. "
                f"Looked in {places} for '{te.tokenizer}/' or tokenizer.json or vocab.json + merges.txt or {CLIP_BPE_FILENAME}. "
                "Provide one of: (a) tokenizer=<a diffusers folder of the same family, or its tokenizer/ folder>; "
                f"(b) a tokenizer/ folder (vocab.json, merges.txt) beside the checkpoint; (c) install the "
                f"open_clip_torch package, whose {CLIP_BPE_FILENAME} is the CLIP vocabulary all SD models use."
            )
        kind, path = chosen
        tokenizers.append(_from_folder(path, kwargs) if kind == "folder" else _from_bpe(path, kwargs))
        origins.append(str(path))
    return tokenizers, origins
