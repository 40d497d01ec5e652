"""Textual-inversion embeddings: one more adapter on the MODEL wire, kept apart from the base model.

Public API:

* ``EmbeddingSet`` - vectors for one placeholder token, per text encoder (``vectors["text_encoder"]``,
  ``["text_encoder_2"]``: float32 ``num_vectors x width`` Parameters); ``parameter_groups()`` gives one
  ``"embedding"`` group; ``trainable`` / ``requires_grad_``; deep-copyable like an ``AdapterSet``
* ``create_embedding(bundle, token, num_vectors, init_text="", encoders=None)`` - seeded from the
  token vectors of ``init_text``, cut or padded with "*" (OneTrainer's convention)
* ``load_embedding_file(path, bundle, token=None)`` / ``save_embedding(emb, path, ...)`` - A1111/Forge,
  ComfyUI, OneTrainer and diffusers layouts (``files.py`` says which tool reads which)
* ``load_bundled_embeddings(path, bundle)`` / ``bundled_tensors(embs)`` - ``bundle_emb.<token>.…`` in
  a LoRA file (``app.ml.save.save_adapter(..., embeddings=[...])`` writes them)
* ``app.ml.adapters.attached(bundle, [..., emb])`` - prompts with the placeholder encode with the
  vectors for the block (``patch.py``); the strength of an embedding pair is ignored, as in A1111
* ``known_token_warning(bundle, token)``, ``expand_caption(caption, embeddings, prepend_missing)``,
  ``embeddings_identity(pairs)`` - for nodes, captions and the text cache

Flux: CLIP-L and T5 are both covered (file keys ``clip_l`` and ``t5``, as OneTrainer writes them).
The T5 vectors are 4096 wide on the real model, so a 75-vector Flux embedding trains 75 x (768 + 4096)
values; ``encoders=["clip_l"]`` makes a CLIP-only one.

Text caching: encoded prompts depend on the attached embeddings; a cache keyed on
``bundle.text_identity`` must add ``embeddings_identity(pairs)`` to its key, and text must not be
cached at all while an embedding trains (its vectors change every step).
"""

from .embedding_set import (
    CAPTION_PLACEHOLDER,
    MAX_VECTORS,
    EmbeddingError,
    EmbeddingSet,
    create_embedding,
    embeddings_identity,
    expand_caption,
    is_embedding,
    known_token_warning,
)
from .files import (
    bundled_tensors,
    embedding_tensors,
    load_bundled_embeddings,
    load_embedding_file,
    save_embedding,
)
from .patch import check_compatible, embeddings_attached

__all__ = [
    "CAPTION_PLACEHOLDER", "MAX_VECTORS", "EmbeddingError", "EmbeddingSet",
    "bundled_tensors", "check_compatible", "create_embedding", "embedding_tensors", "embeddings_attached",
    "embeddings_identity", "expand_caption", "is_embedding", "known_token_warning", "load_bundled_embeddings",
    "load_embedding_file", "save_embedding",
]
