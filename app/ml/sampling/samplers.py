"""A1111/ComfyUI sampler names -> diffusers schedulers with the flags that make them that sampler.

The mapping follows diffusers' own A1111 table: "DPM++ 2M" is the multistep solver in
``dpmsolver++`` mode, "Karras" turns on Karras sigmas, "Euler a" is the ancestral Euler scheduler.
"DPM++ SDE Karras" is diffusers' ``DPMSolverSDEScheduler``, which needs the optional ``torchsde``
package; without it we use the closest deterministic relative, DPM++ 2M SDE Karras, and say so in
the recorded parameters (``sampler_impl``) rather than failing a training run at its first preview.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Mapping

SAMPLERS = ("DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE Karras", "UniPC")

_TABLE: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    "DPM++ SDE Karras": ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
_SDE_FALLBACK = ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True})


def canonical_sampler(name: str) -> str:
    key = str(name).strip().lower().replace("_", " ")
    aliases = {"euler_a": "euler a", "euler ancestral": "euler a", "dpmpp 2m": "dpm++ 2m", "dpmpp 2m karras": "dpm++ 2m karras",
               "dpmpp sde karras": "dpm++ sde karras", "unipc": "unipc", "ddim": "ddim"}
    key = aliases.get(key, key)
    for s in SAMPLERS:
        if s.lower() == key:
            return s
    raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


def make_scheduler(name: str, scheduler_config: Mapping[str, Any], *, seed: int | None = None):
    """A fresh scheduler for ``name`` built from the model's training scheduler config.

    Returns ``(scheduler, impl)`` where ``impl`` names the diffusers class and flags used.
    """
    import diffusers

    sampler = canonical_sampler(name)
    cls_name, flags = _TABLE[sampler]
    flags = dict(flags)
    if cls_name == "DPMSolverSDEScheduler":
        if importlib.util.find_spec("torchsde") is None:
            cls_name, flags = _SDE_FALLBACK[0], dict(_SDE_FALLBACK[1])
        elif seed is not None:
            flags["noise_sampler_seed"] = int(seed)
    config = {k: v for k, v in dict(scheduler_config).items() if not k.startswith("_")}
    scheduler = getattr(diffusers, cls_name).from_config(config, **flags)
    impl = cls_name + "(" + ", ".join(f"{k}={v}" for k, v in sorted(flags.items()) if k != "noise_sampler_seed") + ")"
    return scheduler, impl
