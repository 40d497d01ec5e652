"""Embeddings patched into a shared model only while a consumer runs (what ``attached`` calls).

Two things must know the placeholder, and neither may be changed for good:

* **the tokenizer** reads ``<ohwx>`` as ``num_vectors`` token slots (A1111's expansion). While
  attached, the tokenizer object gets an instance-level ``_encode_plus`` (and ``tokenize`` /
  ``_decode``) that splits prompts at the placeholders, tokenizes the rest with the tokenizer's own
  code and puts slot ids past the vocabulary (``base``, ``base + 1``, ... as diffusers numbers the
  tokens it adds) where the placeholders were. Every path that tokenizes (``bundle.tokenize``, the
  diffusers pipelines, Flux's T5) goes through ``_encode_plus``. Leaving the block deletes the
  instance attributes: vocabulary, ids and added tokens are exactly as before.
* **the text encoder** maps slot ids to the new vectors. A pre-hook on the encoder swaps slot ids
  for id 0 before the model sees them (so its table lookup stays in range and the end-of-text
  position CLIP pools at is found as without embeddings: the A1111/ComfyUI behaviour; diffusers'
  ``load_textual_inversion`` differs on checkpoints whose config still says ``eos_token_id: 2``,
  where CLIP pools at the highest id, the placeholder) and a forward hook on the encoder's input
  embedding puts the vectors at those positions. The base table is only read, so gradients reach
  the new vectors and nothing else.

The patch is per tokenizer object (a "site"); several embeddings (different tokens) share it, each
with its own slot range for as long as it is attached (a range freed by one block is reused by the
next), so nested or sequential ``attached`` blocks with other vector counts never stack, and a block
that ends on one thread never shifts the slots of an embedding another thread is using. Like LoRA
hooks, the patch is seen by every thread using that model while it is attached; an embedding
attached twice at once is refused, as is a second embedding with a token already attached.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

from .embedding_set import EmbeddingError, EmbeddingSet, input_embeddings, tokens_pattern

_LOCK = threading.RLock()
_SITES: dict[int, "_Site"] = {}  # id(tokenizer) -> its patch
_ACTIVE: set[int] = set()  # ids of embedding sets attached somewhere
_LOCAL = threading.local()  # per thread: the slot positions of the encoder call in progress
FILL_ID = 0  # what slot ids become before the encoder's own lookup (A1111 uses the same)
_PATCHED = ("_encode_plus", "tokenize", "_decode")  # the tokenizer methods shadowed while attached


def unpatched_ids(tok, text: "str | list[str]"):
    """Token ids of ``text`` without BOS/EOS, by the tokenizer's own code even while it is patched."""
    return type(tok)._encode_plus(tok, text=text, add_special_tokens=False, verbose=False).input_ids


class _Site:
    """One tokenizer and the text encoder(s) it feeds, with the embeddings attached to them."""

    def __init__(self, tok):
        self.tok = tok
        self.encoders: dict[int, tuple] = {}  # id(text encoder) -> (component, text encoder, hook handles)
        # ((embedding, first slot), ...) by slot: replaced, never changed in place, so the hooks read
        # a consistent snapshot without taking the lock
        self.layout: tuple = ()
        self.base = len(tok)
        # CLIP lowercases prompts, so A1111 users type <OHWX> for <ohwx>; T5 keeps case and so do we there
        self.lowercase = unpatched_ids(tok, "A") == unpatched_ids(tok, "a")
        probe_with = type(tok)._encode_plus(tok, text="a", add_special_tokens=True).input_ids
        body = unpatched_ids(tok, "a")
        i = next(k for k in range(len(probe_with)) if probe_with[k:k + len(body)] == body)
        self.prefix, self.suffix = list(probe_with[:i]), list(probe_with[i + len(body):])
        self.saved = {n: tok.__dict__[n] for n in _PATCHED if n in tok.__dict__}  # put back exactly as found
        tok._encode_plus = self._encode_plus
        tok.tokenize = self._tokenize
        tok._decode = self._decode

    # ------------------------------------------------------------------ set-up

    def add_encoder(self, component: str, te) -> None:
        if id(te) in self.encoders:
            return
        rows = int(input_embeddings(te).weight.shape[0])
        if rows > self.base and self.layout:
            raise EmbeddingError(f"the {component} token table has {rows} rows, more than the tokenizer it shares with "
                                 "an encoder that has embeddings attached; attach the embeddings in one block")
        self.base = max(self.base, rows)
        handles = [
            te.register_forward_pre_hook(self._pre_hook(te), with_kwargs=True),
            te.register_forward_hook(self._post_hook(te), always_call=True),
        ]
        handles += [m.register_forward_hook(self._embedding_hook(te, component)) for m in _token_tables(te)]
        self.encoders[id(te)] = (component, te, handles)

    @property
    def components(self) -> set[str]:
        return {component for component, _, _ in self.encoders.values()}

    def key(self, token: str) -> str:
        return token.lower() if self.lowercase else token

    def pattern(self, layout):
        return tokens_pattern(tuple(emb.token for emb, _ in layout), self.lowercase)

    def remove(self) -> None:
        for _, _, handles in self.encoders.values():
            for h in handles:
                h.remove()
        for name in _PATCHED:
            self.tok.__dict__.pop(name, None)
        self.tok.__dict__.update(self.saved)

    # ------------------------------------------------------------------ the layout of slot ids

    @property
    def entries(self) -> list[EmbeddingSet]:
        return [emb for emb, _ in self.layout]

    def add(self, emb: EmbeddingSet) -> None:
        """Give ``emb`` the first free run of ``num_vectors`` slots; the others keep theirs."""
        start = 0
        for other, first in self.layout:
            if start + emb.num_vectors <= first:
                break
            start = max(start, first + other.num_vectors)
        self.layout = tuple(sorted(self.layout + ((emb, start),), key=lambda item: item[1]))

    def discard(self, emb: EmbeddingSet) -> None:
        self.layout = tuple(item for item in self.layout if item[0] is not emb)

    def slots(self, layout=None) -> dict[str, list[int]]:
        layout = self.layout if layout is None else layout
        return {self.key(emb.token): list(range(self.base + first, self.base + first + emb.num_vectors))
                for emb, first in layout}

    @staticmethod
    def covered(layout, end: int) -> torch.Tensor:
        """Which slots up to ``end`` belong to an attached embedding."""
        out = torch.zeros(end, dtype=torch.bool)
        for emb, first in layout:
            out[first:first + emb.num_vectors] = True
        return out

    @staticmethod
    def rows(layout, component: str) -> torch.Tensor:
        """The vectors by slot (zeros where a freed range lies between two embeddings)."""
        pieces, pos = [], 0
        for emb, first in layout:
            vec = emb.vectors[component]
            if first > pos:
                pieces.append(vec.new_zeros(first - pos, vec.shape[1]).detach())
            pieces.append(vec)
            pos = first + emb.num_vectors
        return torch.cat(pieces, dim=0)

    # ------------------------------------------------------------------ tokenizer side

    def _ids(self, text: str, pattern, slots) -> list[int]:
        pieces, pos = [], 0
        for m in pattern.finditer(text):
            pieces.append(text[pos:m.start()])
            pieces.append(slots[self.key(m.group(0))])
            pos = m.end()
        pieces.append(text[pos:])
        plain = [p for p in pieces if isinstance(p, str) and p.strip()]
        encoded = dict(zip(plain, unpatched_ids(self.tok, plain))) if plain else {}
        ids: list[int] = []
        for p in pieces:
            ids.extend(p if isinstance(p, list) else encoded.get(p, []))
        return ids

    def _encode_plus(self, *args, **kw):
        tok = self.tok
        original = type(tok)._encode_plus.__get__(tok)
        text = kw.get("text", args[0] if args else None)
        layout = self.layout
        pattern = self.pattern(layout)
        single = isinstance(text, str)
        texts = [text] if single else text
        if (pattern is None or kw.get("text_pair") is not None or kw.get("is_split_into_words")
                or not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts)
                or not any(pattern.search(t) for t in texts)):
            return original(*args, **kw)
        for unsupported in ("return_overflowing_tokens", "return_offsets_mapping", "return_special_tokens_mask"):
            if kw.get(unsupported):
                raise EmbeddingError(f"{unsupported} is not available for prompts with embedding placeholders")
        from transformers import BatchEncoding

        slots = self.slots(layout)
        special = kw.get("add_special_tokens", True)
        trunc = getattr(kw.get("truncation_strategy"), "value", kw.get("truncation_strategy")) or "do_not_truncate"
        padding = getattr(kw.get("padding_strategy"), "value", kw.get("padding_strategy")) or "do_not_pad"
        max_length = kw.get("max_length")
        extra = len(self.prefix) + len(self.suffix) if special else 0
        rows = []
        for t in texts:
            body = self._ids(t, pattern, slots)
            if trunc not in ("do_not_truncate", False) and max_length is not None:
                keep = max(0, max_length - extra)
                body = body[len(body) - keep:] if tok.truncation_side == "left" else body[:keep]
            rows.append((self.prefix + body + self.suffix) if special else body)
        if padding == "longest":
            target = max(len(r) for r in rows)
        else:
            target = max_length if padding == "max_length" and max_length else 0
        multiple = kw.get("pad_to_multiple_of")
        if target and multiple:
            target = -(-target // multiple) * multiple
        side = kw.get("padding_side") or tok.padding_side
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        masks = []
        for i, r in enumerate(rows):
            n = max(0, (target or 0) - len(r))
            mask = [1] * len(r)
            rows[i] = (r + [pad_id] * n) if side == "right" else ([pad_id] * n + r)
            masks.append((mask + [0] * n) if side == "right" else ([0] * n + mask))
        data = {"input_ids": rows}
        want_mask = kw.get("return_attention_mask")
        if want_mask or (want_mask is None and "attention_mask" in tok.model_input_names):
            data["attention_mask"] = masks
        want_types = kw.get("return_token_type_ids")
        if want_types or (want_types is None and "token_type_ids" in tok.model_input_names):
            data["token_type_ids"] = [[0] * len(r) for r in rows]
        tensors = kw.get("return_tensors")
        if single:
            data = {k: v[0] for k, v in data.items()}
        if kw.get("return_length"):  # padded lengths, a list even for one text (as the tokenizer's own)
            data["length"] = [len(r) for r in rows]
        return BatchEncoding(data, tensor_type=tensors, prepend_batch_axis=single and tensors is not None)

    def _tokenize(self, text, pair=None, add_special_tokens=False, **kwargs):
        tok = self.tok
        layout = self.layout
        pattern = self.pattern(layout)
        if pattern is None or pair is not None or not isinstance(text, str):
            return type(tok).tokenize(tok, text, pair, add_special_tokens=add_special_tokens, **kwargs)
        slots = self.slots(layout)
        out, pos = [], 0
        for m in list(pattern.finditer(text)) + [None]:
            end = m.start() if m else len(text)
            if text[pos:end].strip():
                out.extend(type(tok)._encode_plus(tok, text=text[pos:end], add_special_tokens=False).tokens())
            if m:
                out.extend([m.group(0)] * len(slots[self.key(m.group(0))]))
                pos = m.end()
        return out

    def _decode(self, token_ids=None, *args, **kwargs):
        tok = self.tok
        original = type(tok)._decode.__get__(tok)
        ids = list(token_ids) if isinstance(token_ids, (list, tuple)) else token_ids
        if not isinstance(ids, list) or not any(isinstance(i, int) and i >= self.base for i in ids):
            return original(token_ids, *args, **kwargs)
        names = {i: t for t, r in self.slots().items() for i in r}
        parts, run = [], []
        for i in ids + [None]:
            if i is not None and i < self.base:
                run.append(i)
                continue
            if run:
                parts.append(original(run, *args, **kwargs))
                run = []
            if i is not None and (not parts or parts[-1] != names.get(i, "<?>")):
                parts.append(names.get(i, "<?>"))
        return " ".join(p for p in parts if p)

    # ------------------------------------------------------------------ encoder side

    def _pre_hook(self, te):
        key = id(te)

        def pre(module, args, kwargs):
            stack = _stack(key)
            in_kwargs = "input_ids" in kwargs and kwargs["input_ids"] is not None
            ids = kwargs["input_ids"] if in_kwargs else (args[0] if args else None)
            if not torch.is_tensor(ids) or ids.numel() == 0 or int(ids.max()) < self.base:
                stack.append(None)
                return None
            layout = self.layout
            mask = ids >= self.base
            index = (ids - self.base).clamp(min=0)
            used = index[mask].cpu()
            if not layout or not bool(self.covered(layout, int(used.max()) + 1)[used].all()):
                stack.append(None)
                raise EmbeddingError(f"token id {int(ids.max())} belongs to no embedding attached now; "
                                     "tokenize and encode inside the same `attached` block")
            stack.append((mask, index, layout))
            swapped = ids.masked_fill(mask, FILL_ID)
            if in_kwargs:
                return args, {**kwargs, "input_ids": swapped}
            return (swapped, *args[1:]), kwargs

        return pre

    def _post_hook(self, te):
        key = id(te)

        def post(module, args, output):
            stack = _stack(key)
            if stack:
                stack.pop()
            return None

        return post

    def _embedding_hook(self, te, component: str):
        key = id(te)

        def hook(module, args, output):
            stack = _stack(key)
            top = stack[-1] if stack else None
            if top is None:
                return None
            mask, index, layout = top
            rows = self.rows(layout, component).to(device=output.device, dtype=output.dtype)
            picked = rows[index.to(rows.device)]
            return torch.where(mask.to(output.device).unsqueeze(-1), picked, output)

        return hook


def _token_tables(te) -> list:
    """The embedding modules that look token ids up in the encoder's table: T5 keeps ``shared`` and a
    tied ``encoder.embed_tokens`` (the one its forward calls), CLIP one ``token_embedding``."""
    table = input_embeddings(te)
    return [m for m in te.modules()
            if isinstance(m, torch.nn.Embedding) and (m is table or m.weight is table.weight
                                                      or m.weight.data_ptr() == table.weight.data_ptr())]


def _stack(key: int) -> list:
    stacks = getattr(_LOCAL, "stacks", None)
    if stacks is None:
        stacks = _LOCAL.stacks = {}
    return stacks.setdefault(key, [])


def _layout(family) -> tuple[str, ...]:
    return tuple(s.embedding_key for s in family.text_encoders)


def check_placeholder(bundle, token: str, where: str = "") -> None:
    """Refuse a placeholder that is one of the tokenizers' special tokens (BOS, EOS, padding)."""
    for spec, tok in zip(bundle.family.text_encoders, bundle.tokenizers):
        if token in (getattr(tok, "all_special_tokens", None) or ()):
            raise EmbeddingError(f"{where or 'the embedding'}: {token} is a special token of the {spec.architecture} "
                                 "tokenizer (it marks the start, end or padding of every prompt); choose another "
                                 "placeholder")


def check_compatible(bundle, emb: EmbeddingSet) -> None:
    """Refuse, by name, an embedding for another family or encoder width."""
    fam = emb.family
    if fam is not None and _layout(fam) != _layout(bundle.family):
        raise EmbeddingError(f"{emb.where()} was made for {fam.display_name} but the model is "
                             f"{bundle.family.display_name}; load it with a {fam.display_name} model")
    check_placeholder(bundle, emb.token, emb.where())
    specs = {s.name: (s, te) for s, te in zip(bundle.family.text_encoders, bundle.text_encoders)}
    for name, vec in emb.vectors.items():
        if name not in specs:
            raise EmbeddingError(f"{emb.where()} has vectors for {name}, which {bundle.family.display_name} "
                                 "does not have")
        spec, te = specs[name]
        want, got = int(input_embeddings(te).weight.shape[1]), int(vec.shape[1])
        if want != got:
            raise EmbeddingError(f"{emb.where()}: the {spec.architecture} text encoder ({spec.embedding_key}) takes "
                                 f"vectors {want} wide but the embedding's are {got} wide; it was made for another "
                                 "model")


@contextmanager
def embeddings_attached(bundle, embeddings: Sequence[EmbeddingSet]) -> Iterator[None]:
    """The tokenizers and text encoders of ``bundle`` see ``embeddings`` for the duration of the block."""
    embeddings = list(embeddings or ())
    if not embeddings:
        yield
        return
    added: list[tuple[_Site, EmbeddingSet]] = []
    owned: list[int] = []
    with _LOCK:
        try:
            tokens = [e.token for e in embeddings]
            for emb in embeddings:
                if id(emb) in _ACTIVE:
                    raise EmbeddingError(f"{emb.where()} is already attached; leave the other `attached` block first")
                if tokens.count(emb.token) > 1:
                    raise EmbeddingError(f"two embeddings use the placeholder {emb.token}; give each its own token")
                check_compatible(bundle, emb)
            encoders = list(zip(bundle.family.text_encoders, bundle.tokenizers, bundle.text_encoders))
            patched = {id(tok) for spec, tok, _ in encoders if any(spec.name in e.vectors for e in embeddings)}
            for spec, tok, te in encoders:  # every encoder a patched tokenizer feeds gets the hooks
                if id(tok) in patched:
                    if id(tok) not in _SITES:
                        _SITES[id(tok)] = _Site(tok)
                    _SITES[id(tok)].add_encoder(spec.name, te)
            for spec, tok, te in encoders:
                covered = [e for e in embeddings if spec.name in e.vectors]
                site = _SITES.get(id(tok))
                for emb in covered:
                    if any(emb is e for _, e in added if _ is site):
                        continue
                    clash = [e for e in site.entries if site.key(e.token) == site.key(emb.token)]
                    if clash:
                        raise EmbeddingError(f"another embedding with the placeholder {clash[0].token} is attached to "
                                             f"this model already; give {emb.where()} its own token")
                    site.add(emb)
                    added.append((site, emb))
            for site in {id(s): s for s, _ in added}.values():
                for emb in site.entries:
                    missing = sorted(site.components - set(emb.vectors))
                    if missing:
                        raise EmbeddingError(f"{emb.where()} has no vectors for {', '.join(missing)}, which shares its "
                                             "tokenizer with an encoder it covers")
            for emb in embeddings:
                _ACTIVE.add(id(emb))
                owned.append(id(emb))
        except BaseException:
            _detach(added, owned)
            for site in list(_SITES.values()):  # a site made for this block that got no embedding
                if not site.layout:
                    site.remove()
                    del _SITES[id(site.tok)]
            raise
    try:
        yield
    finally:
        with _LOCK:
            _detach(added, owned)


def _detach(added, owned) -> None:
    for site, emb in added:
        site.discard(emb)
        if not site.layout:
            site.remove()
            if _SITES.get(id(site.tok)) is site:
                del _SITES[id(site.tok)]
    for i in owned:
        _ACTIVE.discard(i)
