"""Adapters (LoRA, LoCon, LoHa, LoKr, DoRA) kept apart from the shared base model.

Public API:

* ``AdapterConfig`` - algorithm, rank, alpha, dropouts, layer presets per component
* ``create_adapter_set(bundle, config)`` -> ``AdapterSet`` (trainable parameters + target names)
* ``attached(bundle, adapters, strength=1.0)`` - context manager: hooks on while a consumer runs
* ``merged_state_dicts(bundle, adapters, strength)`` - merged copies of adapted weights (for saving)
* ``load_adapter_file(path, bundle)`` - continue from a kohya / LyCORIS / PEFT / ComfyUI file
* ``adapter_tensors(aset, layout)`` - the tensors a file in that layout holds
"""

from .adapter_set import COMPONENTS, AdapterSet, component_modules, create_adapter_set
from .attach import attached, merged_state_dicts
from .config import ALGORITHMS, PRESETS, AdapterConfig, AdapterError
from .io import adapter_tensors, load_adapter_file, peft_metadata, read_tensor_file
from .naming import LAYOUTS, module_key
from .targets import select_targets

__all__ = [
    "ALGORITHMS", "COMPONENTS", "LAYOUTS", "PRESETS",
    "AdapterConfig", "AdapterError", "AdapterSet",
    "adapter_tensors", "attached", "component_modules", "create_adapter_set", "load_adapter_file",
    "merged_state_dicts", "module_key", "peft_metadata", "read_tensor_file", "select_targets",
]
