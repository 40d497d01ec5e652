"""``EmbeddingSet``: textual-inversion vectors for one placeholder token, kept apart from the model.

An embedding is one more adapter on the MODEL wire: its vectors live here, per text encoder, and
``app.ml.adapters.attached`` makes the tokenizers and the encoders' input-embedding lookup see them
only while a consumer runs (see ``patch.py``). The base model's token table is never resized or
written, so a cached ``ModelBundle`` stays bit-identical and re-running with another vector count
cannot stack on an earlier run.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from app.ml.adapters.config import AdapterError

MAX_VECTORS = 75  # one 77-token CLIP piece minus BOS and EOS: more could never be read
CAPTION_PLACEHOLDER = "<embedding>"  # OneTrainer's stand-in for the trained embedding's token in captions
INIT_PAD_TEXT = "*"  # what OneTrainer pads a short initial text with


class EmbeddingError(AdapterError):
    """A user-facing embedding problem: the message names the token or file and what to do."""


def input_embeddings(text_encoder) -> nn.Embedding:
    """The encoder's token table (CLIP's ``token_embedding``, T5's ``shared``)."""
    return text_encoder.get_input_embeddings()


def encoder_widths(bundle) -> dict[str, int]:
    """Per text-encoder component name, the width of its token vectors."""
    return {spec.name: int(input_embeddings(te).weight.shape[1])
            for spec, te in zip(bundle.family.text_encoders, bundle.text_encoders)}


def check_token(token: str) -> str:
    token = str(token or "").strip()
    if not token:
        raise EmbeddingError("the embedding needs a placeholder token, e.g. <ohwx>")
    if any(c.isspace() for c in token):
        raise EmbeddingError(f"the placeholder {token!r} contains a space; use one word, e.g. <ohwx>")
    if token == CAPTION_PLACEHOLDER:
        raise EmbeddingError(f"{CAPTION_PLACEHOLDER} is the caption stand-in for the token; choose another placeholder")
    return token


class EmbeddingSet(nn.Module):
    """Vectors for one placeholder ``token``: ``vectors[component]`` is a float32 ``num_vectors x width``
    Parameter per covered text encoder ("text_encoder", "text_encoder_2").

    An ``nn.Module`` so optimizers, ``.to()``, ``deepcopy`` and ``state_dict()`` work as for an
    ``AdapterSet`` (TrainLoop trains a copy). ``family`` is the ModelFamily it was made for.
    """

    is_embedding_set = True  # what app.ml.adapters.attached looks for

    def __init__(self, token: str, vectors: Mapping[str, torch.Tensor], family=None, *, trainable: bool = True,
                 base_identity: str = "", source: str = ""):
        super().__init__()
        self.token = check_token(token)
        if not vectors:
            raise EmbeddingError(f"the embedding {self.token} covers no text encoder")
        counts = {name: int(v.shape[0]) for name, v in vectors.items()}
        if len(set(counts.values())) != 1 or any(v.ndim != 2 for v in vectors.values()):
            raise EmbeddingError(f"the embedding {self.token} has differently shaped vectors per encoder: "
                                 f"{ {n: tuple(v.shape) for n, v in vectors.items()} }")
        n = next(iter(counts.values()))
        if not 1 <= n <= MAX_VECTORS:
            raise EmbeddingError(f"the embedding {self.token} has {n} vectors; use 1 to {MAX_VECTORS}")
        self.vectors = nn.ParameterDict({
            name: nn.Parameter(v.detach().to(torch.float32).clone(), requires_grad=trainable)
            for name, v in vectors.items()
        })
        self.family = family
        self.base_identity = base_identity
        self.source = source  # the file it came from, for messages ("" when created)

    # ------------------------------------------------------------------ facts

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])

    @property
    def family_id(self) -> str:
        return getattr(self.family, "id", "") or ""

    @property
    def components(self) -> list[str]:
        return list(self.vectors.keys())

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.vectors.values())

    @trainable.setter
    def trainable(self, value: bool) -> None:
        self.requires_grad_(bool(value))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """One group: the optimizer gives embeddings their own learning rate (typically 5e-3 with AdamW)."""
        params = [p for p in self.vectors.values() if p.requires_grad]
        return {"embedding": params} if params else {}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.vectors.values() if p.requires_grad)

    def where(self) -> str:
        return f"embedding {self.token}" + (f" ({self.source})" if self.source else "")

    def extra_repr(self) -> str:
        widths = ", ".join(f"{n}={int(v.shape[1])}" for n, v in self.vectors.items())
        return f"{self.token}, vectors={self.num_vectors}, {widths}"


def is_embedding(obj) -> bool:
    return bool(getattr(obj, "is_embedding_set", False))


def _encoders(bundle, encoders) -> list:
    """The family's TextEncoderSpecs an embedding covers (all by default)."""
    specs = list(bundle.family.text_encoders)
    if encoders is None or encoders == "all":
        return specs
    wanted = [encoders] if isinstance(encoders, str) else list(encoders)
    names = {s.name for s in specs}
    keys = {s.embedding_key: s.name for s in specs}
    out = []
    for w in wanted:
        name = keys.get(w, w)
        if name not in names:
            raise EmbeddingError(f"{bundle.family.display_name} has no text encoder {w!r}; choose from "
                                 + ", ".join(f"{s.name} ({s.embedding_key})" for s in specs))
        out.append(name)
    return [s for s in specs if s.name in out]


def create_embedding(bundle, token: str, num_vectors: int, init_text: str = "", encoders=None, *,
                     trainable: bool = True) -> EmbeddingSet:
    """A new embedding for ``token`` with ``num_vectors`` vectors per covered encoder.

    The vectors start as the token vectors of ``init_text`` (e.g. "woman"), as OneTrainer seeds them:
    the text's tokens, cut at ``num_vectors`` and padded with the vector of "*" when shorter (an
    empty text gives all "*"). ``encoders``: component names or file keys ("clip_l", "clip_g", "t5");
    None covers every text encoder of the family (SDXL: both, as A1111 and ComfyUI expect).
    """
    token = check_token(token)
    from .patch import check_placeholder

    check_placeholder(bundle, token)
    n = int(num_vectors)
    if not 1 <= n <= MAX_VECTORS:
        raise EmbeddingError(f"vectors per token must be 1 to {MAX_VECTORS}, got {num_vectors}")
    vectors = {}
    by_name = dict(zip((s.name for s in bundle.family.text_encoders), zip(bundle.tokenizers, bundle.text_encoders)))
    for spec in _encoders(bundle, encoders):
        tok, te = by_name[spec.name]
        ids = _plain_ids(tok, init_text)[:n]
        pad = _plain_ids(tok, INIT_PAD_TEXT)[:1] or [tok.unk_token_id or 0]
        ids = ids + pad * (n - len(ids))
        table = input_embeddings(te).weight
        with torch.no_grad():
            vectors[spec.name] = table[torch.tensor(ids, device=table.device)].detach().float().cpu()
    return EmbeddingSet(token, vectors, bundle.family, trainable=trainable,
                        base_identity=getattr(bundle, "identity", ""))


def _plain_ids(tok, text: str) -> list[int]:
    """Token ids of ``text`` as the tokenizer splits it, without BOS/EOS (and without any patching)."""
    if not text.strip():
        return []
    from .patch import unpatched_ids

    return unpatched_ids(tok, text)


def known_token_warning(bundle, token: str) -> str | None:
    """A warning when a tokenizer already reads ``token`` as one known token (a word such as "cat"):
    training would then fight the word's meaning; A1111 users pick rare strings like ``<ohwx>``."""
    token = check_token(token)
    for spec, tok in zip(bundle.family.text_encoders, bundle.tokenizers):
        ids = _plain_ids(tok, token)
        if len(ids) == 1:
            piece = tok.convert_ids_to_tokens(ids)[0]
            return (f"the placeholder {token!r} is a token the {spec.architecture} tokenizer already knows "
                    f"({piece!r}, id {ids[0]}); the embedding replaces it wherever it appears in prompts and captions. "
                    "Choose a rarer placeholder such as <ohwx> unless that is what you want.")
    return None


def _token_pattern(token: str) -> str:
    """The token as a regex that does not match inside a longer word (``ohwx`` not in ``ohwxy``)."""
    pat = re.escape(token)
    if token[:1].isalnum() or token[:1] == "_":
        pat = r"(?<![\w])" + pat
    if token[-1:].isalnum() or token[-1:] == "_":
        pat = pat + r"(?![\w])"
    return pat


def tokens_pattern(tokens: Iterable[str], ignore_case: bool = False) -> "re.Pattern | None":
    return _compiled(tuple(sorted(set(tokens), key=lambda t: (-len(t), t))), bool(ignore_case))


@functools.lru_cache(maxsize=256)
def _compiled(tokens: tuple[str, ...], ignore_case: bool) -> "re.Pattern | None":
    # the longest first: <a> inside <ab> never wins
    flags = re.IGNORECASE if ignore_case else 0
    return re.compile("|".join(_token_pattern(t) for t in tokens), flags) if tokens else None


def expand_caption(caption: str, embeddings, prepend_missing: bool = False) -> tuple[str, bool]:
    """``(text, was_missing)``: ``<embedding>`` (OneTrainer's stand-in) replaced with the first
    embedding's token; ``was_missing`` when the caption has neither the stand-in nor the token, in
    which case ``prepend_missing`` puts the token in front ("<ohwx> a photo of ...")."""
    embs = [embeddings] if is_embedding(embeddings) or isinstance(embeddings, str) else list(embeddings or [])
    if not embs:
        return caption, False
    token = embs[0] if isinstance(embs[0], str) else embs[0].token
    text = str(caption or "")
    has_stand_in = CAPTION_PLACEHOLDER in text
    text = text.replace(CAPTION_PLACEHOLDER, token)
    if has_stand_in or tokens_pattern([token]).search(text):
        return text, False
    if prepend_missing:
        text = f"{token} {text}".strip() if text.strip() else token
    return text, True


def embeddings_identity(pairs) -> str:
    """A hash of the attached embeddings' tokens and vector values ("" without embeddings).

    Text embeddings cached under ``bundle.text_identity`` are only valid for prompts encoded
    without these embeddings; a cache must key on this as well (or not cache text while an
    embedding trains: its vectors change every step)."""
    items = []
    for item in pairs or ():
        emb = item if is_embedding(item) else (item[0] if isinstance(item, (tuple, list)) else item)
        if is_embedding(emb):
            items.append(emb)
    if not items:
        return ""
    h = hashlib.sha256()
    for emb in items:
        h.update(f"{emb.token};{emb.num_vectors};".encode())
        for name in sorted(emb.vectors):
            v = emb.vectors[name].detach().to("cpu", torch.float32).contiguous()
            h.update(f"{name}:{tuple(v.shape)};".encode())
            h.update(v.numpy().tobytes())
    return h.hexdigest()[:32]
