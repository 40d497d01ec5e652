"""Flux.1 (dev, schnell) building blocks: tiny test components, latent packing, the flow-matching
objective, BFL <-> diffusers key maps and LoRA layouts.

Each module is self-contained and backs one part of the Flux family module
(``app/ml/models/families/flux.py``; see each module's docstring for which); ``loading.py`` loads
diffusers folders and split files. ``detect.py`` is torch-free (recipe validation uses it).
"""
