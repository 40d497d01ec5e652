"""Flux.1 (dev, schnell) building blocks: tiny test components, latent packing, the flow-matching
objective, BFL <-> diffusers key maps and LoRA layouts.

Each module is self-contained and backs one part of the future Flux family module (see each
module's docstring for which); nothing here is wired into loading, TrainLoop, Sample or Save yet.
"""
