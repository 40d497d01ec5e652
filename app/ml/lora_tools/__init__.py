"""LoRA tools: resize by SVD, merge several LoRAs into one, extract a LoRA from a fine-tune, read file facts.

Every tool works on ``AdapterSet``s read for a model (``app.ml.adapters.load_adapter_file``), so the
family check, the layouts and saving are the adapters' own; the tools only do the linear algebra and
hand back a new plain LoRA/LoCon ``AdapterSet`` that saves in any layout.

Public API:

* ``effective_deltas(bundle, aset, strength)`` - the weight change each adapted layer gets (any algorithm)
* ``resize_lora(bundle, aset, rank, method, target)`` -> (``AdapterSet``, per-layer report)
* ``merge_loras(bundle, [(aset, weight), ...], mode, rank)`` -> (``AdapterSet``, report)
* ``extract_lora(tuned, base, rank, ...)`` -> (``AdapterSet``, report)
* ``lora_file_info(path)`` - rank, alpha, algorithm, base model, trigger words, our recipe
"""

from .info import lora_file_info
from .lora import LoRA, carried_metadata, check_family, model_name, split_components, user_metadata
from .svd import (DYNAMIC_METHODS, LayerReport, effective_deltas, extract_lora, lora_from_deltas, merge_loras,
                  rank_for, resize_lora)

__all__ = ["DYNAMIC_METHODS", "LayerReport", "LoRA", "carried_metadata", "check_family", "model_name", "split_components", "user_metadata", "effective_deltas", "extract_lora", "lora_file_info", "lora_from_deltas",
           "merge_loras", "rank_for", "resize_lora"]
