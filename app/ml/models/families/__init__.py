"""Model families: one module per family (``sd.py``: SD 1.5 / 2.x / 2.x-v, ``sdxl.py``, ``flux.py``: Flux.1
dev / schnell), each a ``ModelFamily`` subclass that owns what differs (see ``base.py``), and the
registry and detection from checkpoint keys (``detection.py``).

Importable without torch, diffusers or transformers (the GUI and recipe validation use it; a test
enforces it): family behaviour imports them only when called.
"""

from __future__ import annotations

from .base import HUB_TOKENIZERS, PREDICTION_TYPES, HubTokenizer, ModelFamily, ModelLoadError, TextEncoderSpec
from .detection import (
    FAMILIES,
    SINGLE_FILE_MARKERS,
    detect_diffusers_family,
    detect_single_file_family,
    get_family,
)
from .flux import FLUX_DEV, FLUX_SCHNELL, FluxFamily
from .sd import SD2, SD2_V, SD15, SDFamily
from .sdxl import SDXL, SDXLFamily

__all__ = [
    "FAMILIES", "FLUX_DEV", "FLUX_SCHNELL", "FluxFamily", "HUB_TOKENIZERS", "HubTokenizer", "ModelFamily",
    "ModelLoadError", "PREDICTION_TYPES", "SD15", "SD2", "SD2_V", "SDFamily", "SDXL", "SDXLFamily",
    "SINGLE_FILE_MARKERS", "TextEncoderSpec", "detect_diffusers_family", "detect_single_file_family", "get_family",
]
