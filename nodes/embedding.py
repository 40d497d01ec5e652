"""Embedding nodes: textual inversion on the MODEL wire.

An embedding is one more adapter on a model handle (``app/ml/embeddings``): its vectors live beside
the base model and are patched into the tokenizers and text encoders only while a consumer (Sample,
TrainLoop, Save) runs, so the cached base is never changed and a re-run with another vector count
cannot stack on the last one.

* **Embedding** adds a *trainable* embedding (new, or continued from a file): TrainLoop trains it
  alone or, with a LoRAInject on the same wire, together with the LoRA (pivotal tuning).
* **LoadEmbedding** adds an existing embedding file, frozen, so prompts (Sample, TrainLoop's sample
  prompts, captions) can use it: OneTrainer's "additional embeddings". A node of its own rather than
  a LoadModel param, because it stacks like ApplyLoRA (several files, after a LoRA or before) and
  works on any MODEL wire, and because a LoRA file with bundled embeddings loads the same way.

The helpers below the nodes are TrainLoop's and Save's: captions as they will be encoded, the
report of captions that lack the token, and standalone files named after the token.
"""

import re

from app.graph.spec import Bool, Enum, Int, Output, Path, Socket, String, node

ENCODERS = ["all", "clip_l", "clip_g", "t5"]


def _file(params: dict) -> str:
    from app.ml.fingerprint import path_fingerprint

    return path_fingerprint(params.get("init_from") or params.get("path") or "")


def _fail(message: str):
    from app.engine.errors import NodeError

    return NodeError(message)


@node(type="Embedding", category="model", fingerprint=_file,
      description="Adds a textual-inversion embedding to train: a placeholder token (e.g. <ohwx>) whose vectors "
                  "TrainLoop learns, alone (typical: AdamW, embedding_lr 5e-3) or with a LoRAInject on the same wire "
                  "(pivotal tuning). Captions call it with the token or <embedding>. The base model is never changed: "
                  "the vectors are patched in only while a consumer runs.",
      inputs=[
          Socket("model", "MODEL"),
          String("token", "<ohwx>", tooltip="the placeholder written in prompts and captions; a rare string, not a "
                                            "word the tokenizer knows"),
          Int("num_vectors", 1, min=1, max=75, tooltip="vectors per token (1-75): more can hold more detail, "
                                                       "each takes one of the prompt's 75 token places"),
          String("init_text", "", tooltip="the vectors start as this text's token vectors (e.g. 'woman'), cut at "
                                          "num_vectors or padded with '*' (OneTrainer's way); empty: all '*'"),
          Enum("encoders", ENCODERS, tooltip="which text encoders get vectors: all (SD 1.5: CLIP-L; SDXL: CLIP-L and "
                                             "CLIP-G, as A1111 and ComfyUI expect; Flux: CLIP-L and T5), or one of them"),
          Bool("prepend_missing", True, tooltip="captions without the token or <embedding> get the token in front "
                                                "(TrainLoop reports how many); off: they train without the embedding"),
          Path("init_from", "", kind="file", optional=True,
               tooltip="continue from an embedding file (.safetensors as A1111/Forge, ComfyUI, diffusers or Save "
                       "write it, or an A1111 .pt); its vector count wins over num_vectors"),
      ],
      outputs=[Output("model", "MODEL")])
def embedding(ctx, model, token, num_vectors, init_text, encoders, prepend_missing, init_from=""):
    from app.ml.embeddings import EmbeddingError, create_embedding, known_token_warning, load_embedding_file
    from app.ml.handle import as_handle

    handle = as_handle(model)
    bundle = handle.base
    token = (token or "").strip()
    _refuse_same_token(handle, token)
    try:
        if init_from:
            emb = load_embedding_file(init_from, bundle, token=token or None)
            emb.trainable = True
            ctx.log(f"continuing {emb.token} from {init_from} ({emb.num_vectors} vectors"
                    + (f"; num_vectors {num_vectors} is the file's count instead" if emb.num_vectors != num_vectors
                       else "") + ")")
        else:
            emb = create_embedding(bundle, token, num_vectors, init_text,
                                   encoders=None if encoders == "all" else encoders)
        warning = known_token_warning(bundle, emb.token)
    except (EmbeddingError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    if warning:
        ctx.warn(warning)
    emb.prepend_missing = bool(prepend_missing)  # read by TrainLoop when it expands captions
    _show(ctx, emb, "trainable")
    return handle.with_adapter(emb)


@node(type="LoadEmbedding", category="model", fingerprint=_file,
      description="Loads an existing embedding file (A1111/Forge, ComfyUI or diffusers textual inversion, or the "
                  "embeddings bundled in a LoRA file) so prompts can use it: Sample, TrainLoop's sample prompts and "
                  "captions (OneTrainer's additional embeddings). It is not trained. Stack several for several files.",
      inputs=[
          Socket("model", "MODEL"),
          Path("path", "", kind="file", tooltip="an embedding .safetensors (or a LoRA with bundled embeddings)"),
          String("token", "", tooltip="the word prompts call it by; empty: the file's own (A1111: the file name)"),
      ],
      outputs=[Output("model", "MODEL")])
def load_embedding(ctx, model, path, token=""):
    from app.ml.embeddings import EmbeddingError, known_token_warning, load_bundled_embeddings, load_embedding_file
    from app.ml.embeddings.embedding_set import check_token
    from app.ml.handle import as_handle

    if not path:
        raise _fail("choose an embedding .safetensors file in path")
    handle = as_handle(model)
    bundle = handle.base
    try:
        bundled = load_bundled_embeddings(path, bundle)
        if bundled and token.strip() and len(bundled) > 1:
            raise _fail(f"{path} bundles {len(bundled)} embeddings ({', '.join(e.token for e in bundled)}); leave "
                        "token empty to load them all under their own names")
        if bundled:  # a LoRA file with bundled embeddings: its LoRA part is LoadLoRA's
            embs = list(bundled)
            if token.strip():
                embs[0].token = check_token(token)
        else:
            embs = [load_embedding_file(path, bundle, token=token.strip() or None)]
        warnings = [w for w in (known_token_warning(bundle, e.token) for e in embs) if w]
    except (EmbeddingError, FileNotFoundError) as e:
        raise _fail(str(e)) from None
    for w in warnings:
        ctx.warn(w)
    for emb in embs:
        _refuse_same_token(handle, emb.token)
        emb.trainable = False
        _show(ctx, emb, "frozen")
        handle = handle.with_adapter(emb)
    return handle


def _refuse_same_token(handle, token: str) -> None:
    from app.ml.train.trainables import is_embedding

    for a in handle.adapters:
        if is_embedding(a) and a.token == token:
            raise _fail(f"the model already carries an embedding for {token}"
                        + (f" (from {a.source})" if getattr(a, "source", "") else "")
                        + "; give this one another token")


def _show(ctx, emb, role: str) -> None:
    widths = ", ".join(f"{name} {int(v.shape[1])}" for name, v in emb.vectors.items())
    ctx.log(f"embedding {emb.token}: {emb.num_vectors} vector(s) per encoder ({widths}), {role}")
    ctx.preview("table", title=f"Embedding {emb.token}",
                rows=[["token", emb.token], ["vectors", str(emb.num_vectors)], ["encoders (width)", widths],
                      ["trained", "yes" if role == "trainable" else "no"]]
                + ([["file", emb.source]] if getattr(emb, "source", "") else []))


# ---- TrainLoop's and Save's helpers ------------------------------------------------------------

def _caption_embeddings(embeddings) -> list:
    """The embeddings captions are about: the trained ones, else all (``<embedding>`` names the first)."""
    trained = [e for e in embeddings if e.trainable]
    return trained or list(embeddings)


def caption_expander(embeddings):
    """caption -> the text the text encoder reads: ``<embedding>`` becomes the token and, when the
    Embedding node asks for it, the token goes in front of captions that lack it. None without embeddings."""
    target = _caption_embeddings(embeddings)
    if not target:
        return None
    from app.ml.embeddings import expand_caption

    prepend = bool(getattr(target[0], "prepend_missing", False))

    def expand(caption: str) -> str:
        return expand_caption(caption, target, prepend)[0]

    return expand


def expand_prompts(prompts: list[str], embeddings) -> list[str]:
    """Sample prompts with ``<embedding>`` written for the token (never prepended: a prompt is what it says)."""
    from app.ml.embeddings import expand_caption

    target = _caption_embeddings(embeddings)
    return [expand_caption(p, target, False)[0] for p in prompts] if target else list(prompts)


def report_captions(ctx, source, embeddings) -> dict:
    """Before training: how many captions lack the token (prepended or not), and a few captions as
    they will be encoded, token pieces included, so a caption that misses the embedding shows."""
    from app.ml.embeddings import expand_caption

    target = _caption_embeddings(embeddings)
    if not target:
        return {}
    emb = target[0]
    prepend = bool(getattr(emb, "prepend_missing", False))
    items = source.plan(0).items
    by_image = {}
    for it in items:
        by_image.setdefault(it.path, it.caption)
    missing = sorted(p.name for p, c in by_image.items() if expand_caption(c, target, False)[1])
    total = len(by_image)
    if missing:
        names = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        if prepend:
            ctx.log(f"{len(missing)} of {total} captions lack {emb.token} (or <embedding>): the token is put in front "
                    f"of them (the Embedding node's prepend_missing): {names}")
        else:
            ctx.warn(f"{len(missing)} of {total} captions lack {emb.token} (or <embedding>) and train without the "
                     f"embedding: write the token or <embedding> in them, or turn on the Embedding node's "
                     f"prepend_missing: {names}")
    rows = []
    for path, caption in list(by_image.items())[:5]:
        text = expand_caption(caption, target, prepend)[0]
        rows.append([path.name, caption, text, " ".join(_pieces(source.bundle, embeddings, text))])
    for name, caption, text, pieces in rows[:3]:
        ctx.log(f"caption as encoded: {name}: {caption!r} -> {text!r} (tokens: {pieces})")
    ctx.preview("table", title=f"captions as encoded ({emb.token})", columns=["image", "caption", "encoded", "tokens"],
                rows=rows)
    return {"missing": len(missing), "total": total, "prepended": prepend and bool(missing)}


def _pieces(bundle, embeddings, text: str) -> list[str]:
    """The first tokenizer's pieces of ``text`` with the embeddings patched in (a placeholder shows
    once per vector); [] when it cannot tell (no bundle)."""
    if bundle is None:
        return []
    from app.ml.embeddings import embeddings_attached

    try:
        with embeddings_attached(bundle, list(embeddings)):
            return list(bundle.tokenizers[0].tokenize(text))
    except Exception:  # noqa: BLE001 - a preview only; training reports real problems itself
        return []


def log_trained(ctx, trainable, optimizer: dict) -> None:
    parts = []
    if trainable.adapter is not None:
        parts.append(f"the adapter (lr {optimizer.get('lr')})")
    tokens = ", ".join(f"{e.token} ({e.num_vectors} vector(s))" for e in trainable.embeddings)
    parts.append(f"the embedding {tokens} (embedding_lr {optimizer.get('embedding_lr', 5e-3)})")
    ctx.log("training " + " and ".join(parts) + ("; pivotal tuning" if trainable.adapter is not None else ""))


def file_stem(token: str) -> str:
    """A file name for a token: A1111 and ComfyUI call an embedding by its file name, so ``<ohwx>``
    is saved as ``ohwx.safetensors``."""
    return re.sub(r"[^\w.-]+", "", token).strip(".") or "embedding"


def save_embeddings(embeddings, folder, recipe, *, overwrite: bool, dtype: str = "fp32") -> list:
    """Each embedding as a standalone file in ``folder``, named after its token."""
    from pathlib import Path as P

    from app.ml.embeddings import save_embedding

    return [save_embedding(e, P(folder) / f"{file_stem(e.token)}.safetensors", dtype=dtype, recipe=recipe,
                           overwrite=overwrite) for e in embeddings]


def lora_and_embeddings(handle) -> tuple:
    """(the newest LoRA-family adapter or None, the embeddings to save): the trained ones (Embedding
    node), not the ones LoadEmbedding added for use."""
    from app.ml.train.trainables import is_embedding

    sets = [a for a in handle.adapters if not is_embedding(a)]
    return (sets[-1] if sets else None), [a for a in handle.adapters if is_embedding(a) and a.trainable]


def save_embedding_node(ctx, handle, path, dtype: str, overwrite: bool, **user) -> str:
    """Save's what = embedding: each trained embedding (else each loaded one) as a standalone file; one at
    ``path``, several beside it as ``<stem>_<token>.safetensors``. Returns what was written."""
    from pathlib import Path as P

    from app.ml.embeddings import save_embedding
    from app.ml.lora_tools import user_metadata
    from app.ml.train.trainables import is_embedding

    _, embeddings = lora_and_embeddings(handle)
    embeddings = embeddings or [a for a in handle.adapters if is_embedding(a)]
    if not embeddings:
        raise _fail("the model carries no embedding to save: connect it after an Embedding node (and TrainLoop), "
                    "or choose what = adapter")
    path = P(path)
    info = handle.info
    extra = user_metadata(**user)
    written = []
    for emb in embeddings:
        target = path if len(embeddings) == 1 else path.with_name(f"{path.stem}_{file_stem(emb.token)}{path.suffix}")
        written.append(save_embedding(emb, target, dtype=dtype, recipe=ctx.recipe, overwrite=overwrite,
                                      extra_metadata=extra, step=info.get("step"), epoch=info.get("epoch")))
    for w in written:
        ctx.log(f"{w.name}: prompts in A1111/Forge call it '{w.stem}', ComfyUI 'embedding:{w.stem}'; diffusers: "
                f"load_textual_inversion")
    return ", ".join(str(w) for w in written)
