"""Saving: LoRA files (kohya / PEFT / ComfyUI layouts), full models (single file, diffusers folder).

Public API:

* ``save_adapter(adapters, path, layout="kohya", dtype="fp16", recipe=None, step=None, epoch=None, overwrite=False)``
* ``save_single_file(bundle, path, adapters=None, strength=1.0, dtype=None, recipe=None, overwrite=False)``
* ``save_diffusers(bundle, folder, adapters=None, strength=1.0, dtype=None, recipe=None, overwrite=False)``
* ``available_path(path, overwrite)``, ``atomic_file(path, overwrite)``
"""

from app.atomic import atomic_file, atomic_folder, available_path
from .lora import SAVE_DTYPES, save_adapter

__all__ = ["SAVE_DTYPES", "atomic_file", "atomic_folder", "available_path", "save_adapter", "save_diffusers", "save_single_file"]


def __getattr__(name):
    if name in ("save_single_file", "save_diffusers"):
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
