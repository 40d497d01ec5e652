"""Finding the tokenizers of a model, the way A1111, ComfyUI and kohya users expect.

Every SD-family model uses the same OpenAI CLIP BPE vocabulary (49,408 tokens); only the padding
token differs (SD2 and SDXL's second encoder pad with "!"). Single-file checkpoints carry no
tokenizer, so for each text encoder we take the first of:

1. the LoadModel ``tokenizer`` param (``tokenizer=``), then a ``config=`` folder: a diffusers model
   folder or a folder holding ``tokenizer/`` (and ``tokenizer_2/``), one tokenizer folder
   (``tokenizer.json`` or ``vocab.json`` + ``merges.txt``; for SDXL it serves both encoders), or
   OpenAI/OpenCLIP's ``bpe_simple_vocab_16e6.txt.gz``. An explicit choice wins over what lies beside
   the model, and a ``tokenizer`` folder that holds no tokenizer is an error, never skipped;
2. beside the model: ``tokenizer/`` / ``tokenizer_2/`` next to a checkpoint, or inside a diffusers
   folder;
3. the Hugging Face hub (``HUB_TOKENIZERS`` in families.py), fetched once into the user's HF cache
   with only the tokenizer files (a few MB), as kohya does. ``HF_HUB_OFFLINE=1`` is honoured: a
   cached copy is used without touching the network; without one the error says what to download
   and where to put it.

Padding always comes from the family (or the model's own tokenizer config), never from the folder
found: the same CLIP-L files serve SDXL's second encoder with "!" padding, which changes its
conditioning, so it must be right.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Any, Callable

from .families import HUB_TOKENIZERS, HubTokenizer, ModelFamily, ModelLoadError, TextEncoderSpec

CLIP_BPE_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_MAX_LENGTH = 77
_TRUE = ("1", "true", "yes", "on")

Log = Callable[[str], None]


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


def _tokenizer_kwargs(config_dir: Path, name: str, pad_token: str) -> dict[str, Any]:
    cfg_path = config_dir / name / "tokenizer_config.json"
    kwargs: dict[str, Any] = {"model_max_length": _MAX_LENGTH, "pad_token": pad_token}
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
        kwargs["pad_token"] = cfg.get("pad_token", pad_token)
        # CLIP reads 77 positions; some saved configs carry transformers' "unlimited" placeholder
        kwargs["model_max_length"] = min(int(cfg.get("model_max_length", _MAX_LENGTH)), _MAX_LENGTH)
    return kwargs


def _from_folder(folder: Path, kwargs: dict[str, Any]):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), **kwargs)


def _from_bpe(bpe: Path, kwargs: dict[str, Any]):
    from transformers import CLIPTokenizer

    vocab, merges = vocab_from_clip_bpe(bpe)
    return CLIPTokenizer(vocab=vocab, merges=merges, **kwargs)


def is_tokenizer_folder(folder: Path) -> bool:
    """transformers 5 saves tokenizer.json only; older folders have vocab.json + merges.txt."""
    return (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())


def _candidates(root: Path, name: str) -> list[tuple[str, Path]]:
    """Places under ``root`` that could hold the tokenizer called ``name`` ("tokenizer"/"tokenizer_2")."""
    found = []
    for folder in (root / name, root / "tokenizer", root):
        if is_tokenizer_folder(folder):
            found.append(("folder", folder))
    if root.is_file() and root.name.endswith(".txt.gz"):
        found.append(("bpe", root))
    elif (root / CLIP_BPE_FILENAME).is_file():
        found.append(("bpe", root / CLIP_BPE_FILENAME))
    return found


# --------------------------------------------------------------------------------------------------
# the Hugging Face hub
# --------------------------------------------------------------------------------------------------

def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def hub_cache_dir() -> Path:
    """The user's Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ~/.cache/huggingface/hub)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot_download(repo_id: str, *, allow_patterns: list[str], cache_dir: Path, local_files_only: bool) -> str:
    """The one call into huggingface_hub (imported lazily: validation and the GUI never need it)."""
    from huggingface_hub import snapshot_download as hub_snapshot_download

    return hub_snapshot_download(
        repo_id, allow_patterns=allow_patterns, cache_dir=str(cache_dir), local_files_only=local_files_only
    )


class _NotAvailable(Exception):
    """The hub tokenizer is neither cached nor downloadable; the message says why."""


def _holds(folder: Path, hub: HubTokenizer) -> bool:
    """A snapshot holds ``hub``'s tokenizer: a CLIP BPE folder, or every essential file (T5: ``spiece.model``)."""
    return is_tokenizer_folder(folder) or all((folder / f).is_file() for f in hub.essential)


def _cached_or_fetched(hub: HubTokenizer, log: Log | None) -> Path:
    """The snapshot folder holding ``hub``'s tokenizer files: the cached copy, else downloaded once."""
    cache = hub_cache_dir()
    patterns = list(hub.files)
    try:  # a cached copy needs no network at all, online or not
        folder = Path(snapshot_download(hub.repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=True))
        if _holds(folder, hub):
            return folder
    except Exception:  # noqa: BLE001 - any failure to find a cached copy means "not cached"
        pass
    if hub_offline():
        raise _NotAvailable(f"HF_HUB_OFFLINE is set and the Hugging Face cache {cache} has no copy of {hub.repo_id}")
    if log:
        log(f"fetching the {hub.description} tokenizer from the Hugging Face hub ({hub.repo_id}: "
            f"{', '.join(hub.files)}) into {cache}; this happens once")
    try:
        folder = Path(snapshot_download(hub.repo_id, allow_patterns=patterns, cache_dir=cache, local_files_only=False))
    except Exception as e:  # noqa: BLE001 - no network, proxy, gated repo...: all end in the same advice
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _NotAvailable(f"downloading {hub.repo_id} from the Hugging Face hub failed ({reason})") from None
    if not _holds(folder, hub):
        wanted = "tokenizer.json or vocab.json + merges.txt" if hub.essential == ("vocab.json", "merges.txt") \
            else " + ".join(hub.essential)
        raise _NotAvailable(f"the download of {hub.repo_id} into {folder} holds no {wanted}")
    if log:
        log(f"{hub.description} tokenizer cached in {folder}")
    return folder


def _missing_message(source: Path, te: TextEncoderSpec, hub: HubTokenizer, looked: list[Path], place: Path,
                     reason: str) -> str:
    essential = " ".join(hub.essential)
    return (
        f"{source.name}: no tokenizer for its {te.architecture} text encoder ('{te.tokenizer}'). Looked in "
        f"{' and '.join(str(p) for p in looked)}; {reason}. Do one of: run once with network access (without "
        f"HF_HUB_OFFLINE) so it is fetched into the Hugging Face cache; or download {essential} from "
        f"https://huggingface.co/{hub.repo_id} into {place} (e.g. `hf download {hub.repo_id} {essential} "
        f"--local-dir {place}`); or set LoadModel's tokenizer param to a folder that holds them."
    )


def hub_tokenizer_folder(te: TextEncoderSpec, *, checkpoint: Path, looked: list[Path], place: Path,
                         log: Log | None = None) -> Path:
    """The last step of resolution for any text encoder (also Flux's T5, ``google/t5-v1_1-xxl``): the cached
    hub copy, else fetched once (tokenizer files only); offline without a copy, the error says what to do."""
    hub = HUB_TOKENIZERS[te.hub_tokenizer]
    try:
        return _cached_or_fetched(hub, log)
    except _NotAvailable as e:
        raise ModelLoadError(_missing_message(checkpoint, te, hub, looked, place, str(e))) from None


# --------------------------------------------------------------------------------------------------
# resolution
# --------------------------------------------------------------------------------------------------

def find_tokenizers(
    family: ModelFamily,
    config_dir: Path,
    *,
    checkpoint: Path,
    user_path: "str | Path | None" = None,
    extra_roots: "list[Path] | tuple[Path, ...]" = (),
    log: Log | None = None,
) -> tuple[list, list[str]]:
    """Load one tokenizer per text encoder of ``family``; returns (tokenizers, where each came from).

    ``checkpoint``: the model file (its folder is looked in) or a diffusers folder (looked in itself).
    ``config_dir``: where ``<tokenizer>/tokenizer_config.json`` gives padding and length.
    """
    explicit: list[Path] = []
    if user_path is not None:
        up = Path(user_path).expanduser()
        if not up.exists():
            raise ModelLoadError(f"Tokenizer path {up} does not exist (LoadModel tokenizer param).")
        explicit.append(up)
    explicit.extend(Path(r) for r in extra_roots)
    beside = checkpoint if checkpoint.is_dir() else checkpoint.parent

    tokenizers, origins = [], []
    for te in family.text_encoders:
        kwargs = _tokenizer_kwargs(config_dir, te.tokenizer, te.pad_token)
        chosen = None
        for root in explicit:
            cands = _candidates(root, te.tokenizer)
            if cands:
                chosen = cands[0]
                break
            if user_path is not None and root == explicit[0]:
                raise ModelLoadError(
                    f"Tokenizer folder {root} (LoadModel tokenizer param) holds no tokenizer for "
                    f"'{te.tokenizer}': expected tokenizer.json or vocab.json + merges.txt in it, in "
                    f"{root / te.tokenizer}, or in {root / 'tokenizer'}."
                )
        if chosen is None:
            cands = _candidates(beside, te.tokenizer)
            chosen = cands[0] if cands else None
        if chosen is None:
            hub = HUB_TOKENIZERS[te.hub_tokenizer]
            try:
                chosen = ("folder", _cached_or_fetched(hub, log))
            except _NotAvailable as e:
                raise ModelLoadError(
                    _missing_message(checkpoint, te, hub, [*explicit, beside], beside / te.tokenizer, str(e))
                ) from None
        kind, path = chosen
        tokenizers.append(_from_folder(path, kwargs) if kind == "folder" else _from_bpe(path, kwargs))
        origins.append(str(path))
    return tokenizers, origins
