"""The rectified-flow (flow-matching) objective Flux is trained with, as pure torch functions (backs the
Flux family's objective: noising, target, timestep sampling, loss weighting and the guidance input;
the FlowObjective node on TrainLoop sets ``FlowSettings``).

Conventions are diffusers' (``FlowMatchEulerDiscreteScheduler``, ``FluxPipeline``): σ = 1 is pure
noise, x_t = (1 − σ)·x0 + σ·ε, the model predicts the velocity ε − x0, and the transformer gets σ
itself as ``timestep`` (it multiplies by 1000 inside). A sampler then steps x ← x + (σ_next − σ)·v.

Everything random takes an explicit ``torch.Generator``, so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DISTRIBUTIONS = ("uniform", "sigmoid", "logit_normal")
SHIFTS = ("none", "fixed", "resolution")
WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


class FlowSettingsError(ValueError):
    pass


@dataclass(frozen=True)
class FlowSettings:
    """What a user chooses for flow-matching training. Each default is what the peers' Flux LoRA recipes use
    (checked against their code; the FlowObjective node and TrainLoop's unlinked default carry the same values):

    * ``timesteps="sigmoid"``, ``logit_scale=1.0``, ``logit_mean=0.0``: σ = sigmoid(N(0, 1)). It is kohya
      sd-scripts' draw under ``--timestep_sampling sigmoid``, ``shift`` and ``flux_shift`` (``--sigmoid_scale``
      1.0), SimpleTuner's default (``--flow_use_uniform_schedule`` off, ``--flow_sigmoid_scale`` 1.0),
      ai-toolkit's (``timestep_type: sigmoid``) and OneTrainer's Flux preset (``LOGIT_NORMAL`` with
      ``noising_bias`` 0, ``noising_weight`` 0, i.e. std 1). kohya's own default, ``sigma``, indexes the
      scheduler's shifted table instead; its Flux documentation trains with ``flux_shift`` or ``shift``.
      OneTrainer's global default is uniform, which SimpleTuner warns biases towards dark images.
    * ``shift="resolution"``, ``base_shift=0.5``, ``max_shift=1.15``, ``base_seq_len=256``,
      ``max_seq_len=4096``: Flux's dynamic shift, mu linear in the image token count, as FLUX.1-dev's
      ``scheduler_config.json`` sets it for sampling; kohya ``--timestep_sampling flux_shift`` (its README's
      Flux example), OneTrainer's Flux preset (``dynamic_timestep_shifting``), SimpleTuner's
      ``--flow_schedule_auto_shift``. It trains each bucket at the shift it is sampled with.
    * ``shift_value=3.1582`` (``shift="fixed"`` only): e^1.15, the resolution shift at 1024x1024, which kohya's
      Flux guides recommend with ``--timestep_sampling shift``. kohya's argparse default ``discrete_flow_shift``
      is 3.0 and SimpleTuner's ``--flow_schedule_shift`` 3 (SD3's value); both are a choice away.
    * ``weighting="none"``: kohya's ``--weighting_scheme`` and diffusers' ``train_dreambooth_lora_flux.py``
      default; the model output is the velocity itself (kohya's recommended ``--model_prediction_type raw``
      and diffusers' script; kohya's default ``sigma_scaled`` is not offered).
    * ``guidance=1.0``: dev's guidance input while training in SimpleTuner (``--flux_guidance_value`` 1.0,
      "preserves the CFG distillation"), OneTrainer and diffusion-pipe; kohya's argparse default is 3.5 but
      its Flux README and guides train with ``--guidance_scale 1.0``. Schnell has no guidance input.
    """

    timesteps: str = "sigmoid"  # uniform | sigmoid (σ = sigmoid(scale·z), kohya) | logit_normal (σ = sigmoid(mean + scale·z))
    logit_mean: float = 0.0
    logit_scale: float = 1.0
    shift: str = "resolution"  # none | fixed | resolution (Flux's dynamic shift from the image token count)
    shift_value: float = 3.1582  # fixed shift s (kohya's discrete_flow_shift; 3.1582 recommended for Flux)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_seq_len: int = 256
    max_seq_len: int = 4096
    weighting: str = "none"  # none | sigma_sqrt | cosmap (diffusers' compute_loss_weighting_for_sd3)
    guidance: float = 1.0  # fed to dev's guidance embedder while training (OneTrainer, SimpleTuner, diffusion-pipe)

    def check(self, where: str = "flow-matching objective") -> "FlowSettings":
        for field, value, allowed in (("timesteps", self.timesteps, DISTRIBUTIONS), ("shift", self.shift, SHIFTS),
                                      ("weighting", self.weighting, WEIGHTINGS)):
            if value not in allowed:
                raise FlowSettingsError(f"{where}: {field} {value!r} is unknown; choose one of {', '.join(allowed)}.")
        if self.logit_scale <= 0:
            raise FlowSettingsError(f"{where}: logit_scale must be > 0 (got {self.logit_scale}).")
        if self.shift == "fixed" and self.shift_value <= 0:
            raise FlowSettingsError(f"{where}: shift_value must be > 0 (got {self.shift_value}); 1.0 means no shift.")
        if self.max_seq_len <= self.base_seq_len:
            raise FlowSettingsError(f"{where}: max_seq_len ({self.max_seq_len}) must exceed base_seq_len ({self.base_seq_len}).")
        return self


def sample_base_sigmas(n: int, s: FlowSettings, generator: torch.Generator) -> torch.Tensor:
    """σ in (0, 1) from the chosen distribution, before any shift."""
    if s.timesteps == "uniform":
        return torch.rand(n, generator=generator)
    z = torch.randn(n, generator=generator)
    if s.timesteps == "sigmoid":
        return torch.sigmoid(s.logit_scale * z)
    if s.timesteps == "logit_normal":
        return torch.sigmoid(s.logit_mean + s.logit_scale * z)
    raise FlowSettingsError(f"flow-matching objective: timesteps {s.timesteps!r} is unknown; choose one of {', '.join(DISTRIBUTIONS)}.")


def shift_fixed(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s·σ / (1 + (s − 1)·σ): more time at high noise for s > 1 (SD3 / kohya ``discrete_flow_shift``)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_mu(image_seq_len: int | float, base_shift: float = 0.5, max_shift: float = 1.15,
                  base_seq_len: int = 256, max_seq_len: int = 4096) -> float:
    """Flux's mu: linear in the image token count, base_shift at base_seq_len, max_shift at max_seq_len."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def shift_resolution(sigma: torch.Tensor, mu: float) -> torch.Tensor:
    """σ' = e^mu / (e^mu + (1/σ − 1)) (diffusers' exponential ``time_shift`` with exponent 1)."""
    e = math.exp(mu)
    return e / (e + (1 / sigma - 1))


def sample_sigmas(n: int, s: FlowSettings, generator: torch.Generator, image_seq_len: int | None = None) -> torch.Tensor:
    """Training σ per sample: the distribution, then the shift. ``image_seq_len`` is needed for the resolution shift."""
    sigma = sample_base_sigmas(n, s, generator)
    if s.shift == "fixed":
        return shift_fixed(sigma, s.shift_value)
    if s.shift == "resolution":
        if image_seq_len is None:
            raise FlowSettingsError("flow-matching objective: the resolution shift needs the image token count (image_seq_len).")
        return shift_resolution(sigma, resolution_mu(image_seq_len, s.base_shift, s.max_shift, s.base_seq_len, s.max_seq_len))
    if s.shift != "none":
        raise FlowSettingsError(f"flow-matching objective: shift {s.shift!r} is unknown; choose one of {', '.join(SHIFTS)}.")
    return sigma


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like).reshape(-1, *([1] * (like.ndim - 1)))


def make_noise(x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """ε drawn in fp32 on the CPU generator (same draws on every device and dtype), then cast."""
    return torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)


def noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1 − σ)·x0 + σ·ε, with one σ per sample."""
    sig = _per_sample(sigma, x0)
    return (1 - sig) * x0 + sig * noise


def target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model learns: ε − x0 (d x_t / dσ)."""
    return noise - x0


def loss_weighting(sigma: torch.Tensor, scheme: str = "none") -> torch.Tensor:
    """Per-sample loss weights, as diffusers' ``compute_loss_weighting_for_sd3``."""
    if scheme == "sigma_sqrt":
        return (sigma ** -2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))
    if scheme == "none":
        return torch.ones_like(sigma)
    raise FlowSettingsError(f"flow-matching objective: weighting {scheme!r} is unknown; choose one of {', '.join(WEIGHTINGS)}.")


def flow_loss(pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Weighted MSE against ε − x0: the mean over elements of each sample, weighted, then over the batch."""
    err = (pred.float() - target(x0, noise).float()) ** 2
    per_sample = err.reshape(err.shape[0], -1).mean(dim=1)
    return (loss_weighting(sigma.float(), weighting) * per_sample).mean()


def guidance_input(batch: int, value: float = 1.0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The raw guidance value for dev's guidance embedder, one per sample (the model multiplies by 1000)."""
    return torch.full((batch,), float(value), device=device, dtype=dtype)
