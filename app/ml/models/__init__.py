"""Model loading: families, tiny builtin models, diffusers folders and single-file checkpoints.

Public API (import from here):

* ``load_model(source, family=None, dtypes=None, vae=None, *, tokenizer=None, prediction_type=None)``
* ``ModelBundle`` - the shared, immutable handle a MODEL socket carries
* ``ModelFamily``, ``FAMILIES``, ``get_family``, ``detect_single_file_family``, ``detect_diffusers_family``
* ``ModelLoadError``

``families`` is importable without torch; everything else imports it lazily through this module.
"""

from __future__ import annotations

from .families import (
    FAMILIES,
    ModelFamily,
    ModelLoadError,
    TextEncoderSpec,
    detect_diffusers_family,
    detect_single_file_family,
    get_family,
)

__all__ = [
    "FAMILIES",
    "ModelBundle",
    "ModelFamily",
    "ModelLoadError",
    "TextEncoderSpec",
    "detect_diffusers_family",
    "detect_single_file_family",
    "get_family",
    "load_model",
]


def __getattr__(name: str):
    # torch-dependent parts load on first use, so `import app.ml.models` stays cheap for the GUI.
    if name == "load_model":
        from .load import load_model

        return load_model
    if name == "ModelBundle":
        from .bundle import ModelBundle

        return ModelBundle
    raise AttributeError(name)
