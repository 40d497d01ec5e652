"""Sampling: preview images from a bundle (with adapters at a strength), saved as PNGs with the recipe.

Public API:

* ``sample_images(bundle, prompts, negative_prompt="", width=None, height=None, steps=20, cfg=7.0,
  seed=None, sampler="Euler a", images_per_prompt=1, adapters=None, strength=1.0, clip_skip=1)``
  -> ``SampleResult(images, params, latents)``
* ``save_samples(result, folder, prefix="sample", recipe=None, overwrite=False)`` -> paths
* ``SAMPLERS``, ``make_scheduler(name, scheduler_config)``
"""

from .generate import SampleResult, build_pipeline, sample_images
from .png import a1111_parameters, read_png_text, save_png, save_samples
from .samplers import SAMPLERS, canonical_sampler, make_scheduler

__all__ = ["SAMPLERS", "SampleResult", "a1111_parameters", "build_pipeline", "canonical_sampler", "make_scheduler",
           "read_png_text", "sample_images", "save_png", "save_samples"]
