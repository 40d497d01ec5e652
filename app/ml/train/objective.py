"""The diffusion training objective: noise, timesteps, targets, losses and their weighting.

Everything random takes an explicit torch.Generator so a resumed run draws exactly what an
uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ObjectiveSettings:
    prediction: str = "epsilon"  # epsilon | v_prediction
    offset_noise: float = 0.0
    perturbation_noise: float = 0.0
    timesteps: str = "uniform"  # uniform | logit_normal | sigmoid
    timestep_bias: float = 0.0
    timestep_scale: float = 1.0
    min_noising: float = 0.0  # fraction of the schedule: 0 = the first timestep
    max_noising: float = 1.0
    loss: str = "mse"  # mse | mae | huber
    huber_delta: float = 0.1
    weighting: str = "constant"  # constant | min_snr | debiased
    min_snr_gamma: float = 5.0
    unmasked_probability: float = 0.1
    unmasked_weight: float = 0.1
    normalize_masked_area: bool = False


def sample_timesteps(n: int, s: ObjectiveSettings, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
    lo = int(round(s.min_noising * (num_train_timesteps - 1)))
    hi = max(lo + 1, int(round(s.max_noising * num_train_timesteps)))
    if s.timesteps == "uniform":
        u = torch.rand(n, generator=generator)
    elif s.timesteps == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator) * s.timestep_scale + s.timestep_bias)
    elif s.timesteps == "sigmoid":
        # OneTrainer's "sigmoid": a logit-normal draw stretched by the scale (more mass mid-schedule)
        u = torch.sigmoid((torch.randn(n, generator=generator) + s.timestep_bias) * (1.0 + s.timestep_scale))
    else:
        raise ValueError(f"unknown timestep distribution {s.timesteps!r}")
    return (lo + u * (hi - lo)).long().clamp(lo, hi - 1)


def make_noise(latents: torch.Tensor, s: ObjectiveSettings, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
    if s.offset_noise:
        offset = torch.randn(latents.shape[:2] + (1, 1), generator=generator, dtype=torch.float32).to(latents)
        noise = noise + s.offset_noise * offset
    return noise


def noisy_input(scheduler, latents, noise, timesteps, s: ObjectiveSettings, generator: torch.Generator):
    """Noised latents for the model input. Perturbation noise changes only the input, not the target."""
    input_noise = noise
    if s.perturbation_noise:
        extra = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
        input_noise = noise + s.perturbation_noise * extra
    return scheduler.add_noise(latents, input_noise, timesteps)


def target_for(scheduler, latents, noise, timesteps, prediction: str) -> torch.Tensor:
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unknown prediction type {prediction!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    ac = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return ac / (1.0 - ac).clamp_min(1e-12)


def per_sample_loss(pred: torch.Tensor, target: torch.Tensor, s: ObjectiveSettings,
                    mask: torch.Tensor | None = None, use_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Loss per sample (B,), with masked training: white = learn, black = `unmasked_weight`."""
    pred, target = pred.float(), target.float()
    if s.loss == "mse":
        elem = F.mse_loss(pred, target, reduction="none")
    elif s.loss == "mae":
        elem = F.l1_loss(pred, target, reduction="none")
    elif s.loss == "huber":
        elem = F.huber_loss(pred, target, reduction="none", delta=s.huber_delta)
    else:
        raise ValueError(f"unknown loss {s.loss!r}")
    if mask is None:
        return elem.mean(dim=tuple(range(1, elem.ndim)))
    m = mask.float()
    if m.ndim == 3:
        m = m.unsqueeze(1)
    m = F.interpolate(m, size=elem.shape[-2:], mode="area") if m.shape[-2:] != elem.shape[-2:] else m
    weight = s.unmasked_weight + (1.0 - s.unmasked_weight) * m
    if use_mask is not None:  # samples drawn to ignore the mask this step
        weight = torch.where(use_mask.view(-1, 1, 1, 1), weight, torch.ones_like(weight))
    loss = (elem * weight).mean(dim=tuple(range(1, elem.ndim)))
    if s.normalize_masked_area:
        loss = loss / weight.mean(dim=tuple(range(1, weight.ndim))).clamp_min(1e-6)
    return loss


def timestep_weights(scheduler, timesteps: torch.Tensor, s: ObjectiveSettings, prediction: str) -> torch.Tensor:
    if s.weighting == "constant":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    ratio = snr(scheduler, timesteps)
    if s.weighting == "min_snr":
        clipped = ratio.clamp(max=s.min_snr_gamma)
        return clipped / (ratio + 1.0) if prediction == "v_prediction" else clipped / ratio.clamp_min(1e-12)
    if s.weighting == "debiased":
        return 1.0 / ratio.clamp(max=1000.0).sqrt().clamp_min(1e-6)
    raise ValueError(f"unknown loss weighting {s.weighting!r}")


def rescale_zero_terminal_snr(scheduler) -> None:
    """Make the last timestep pure noise (Lin et al. 2023); use with v-prediction."""
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr as rescale

    scheduler.betas = rescale(scheduler.betas)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)


# ---- objectives as the trainer uses them: a family's ``make_objective`` returns one of these ----------

class NoiseObjective:
    """DDPM noise (SD families): integer timesteps, epsilon or v targets, min-SNR/debiased weighting.

    The draws happen in the order the trainer has always made them (noise, timesteps, then the
    perturbation noise in ``noisy``), so loss sequences are unchanged by this wrapper.
    """

    kind = "noise"
    guidance = None  # no guidance input

    def __init__(self, scheduler, settings: ObjectiveSettings, zero_terminal_snr: bool = False) -> None:
        if zero_terminal_snr:
            rescale_zero_terminal_snr(scheduler)
        self.scheduler = scheduler
        self.s = settings
        self.prediction = settings.prediction

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps for a whole (global) batch of latents of ``shape``."""
        noise = make_noise(torch.zeros(shape), self.s, generator)
        return noise, sample_timesteps(shape[0], self.s, self.scheduler.config.num_train_timesteps, generator)

    def noisy(self, latents, noise, timesteps, generator: torch.Generator):
        return noisy_input(self.scheduler, latents, noise, timesteps, self.s, generator)

    def target(self, latents, noise, timesteps):
        return target_for(self.scheduler, latents, noise, timesteps, self.prediction)

    def weights(self, timesteps) -> torch.Tensor:
        return timestep_weights(self.scheduler, timesteps, self.s, self.prediction)

    def validation_timesteps(self, n: int, batch: int, device) -> list[torch.Tensor]:
        """Fixed timesteps spread over the schedule (the same in every validation pass)."""
        total = self.scheduler.config.num_train_timesteps
        return [torch.full((batch,), int((k + 0.5) / n * total), dtype=torch.long, device=device) for k in range(n)]

    def validation_noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)


class FlowObjective:
    """Rectified flow (Flux): σ drawn from the chosen distribution and shifted, x_t = (1 − σ)·x0 + σ·ε,
    target ε − x0, σ itself as the model's timestep, optional SD3 weighting; the loss type, masks and
    offset/perturbation noise come from the shared ``ObjectiveSettings``."""

    kind = "flow"

    def __init__(self, flow, settings: ObjectiveSettings) -> None:
        from app.ml.flux.flow import FlowSettings

        self.flow = (flow or FlowSettings()).check()
        self.s = settings
        self.guidance = self.flow.guidance

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from app.ml.flux.flow import sample_sigmas

        noise = make_noise(torch.zeros(shape), self.s, generator)
        seq_len = (shape[-2] // 2) * (shape[-1] // 2)  # image tokens after 2x2 packing
        return noise, sample_sigmas(shape[0], self.flow, generator, image_seq_len=seq_len)

    def noisy(self, latents, noise, sigma, generator: torch.Generator):
        from app.ml.flux.flow import noisy

        if self.s.perturbation_noise:
            extra = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents)
            noise = noise + self.s.perturbation_noise * extra
        return noisy(latents, noise, sigma)

    def target(self, latents, noise, sigma):
        return noise - latents

    def weights(self, sigma) -> torch.Tensor:
        from app.ml.flux.flow import loss_weighting

        return loss_weighting(sigma.float(), self.flow.weighting)

    def validation_timesteps(self, n: int, batch: int, device) -> list[torch.Tensor]:
        return [torch.full((batch,), (k + 0.5) / n, dtype=torch.float32, device=device) for k in range(n)]

    def validation_noisy(self, latents, noise, sigma):
        from app.ml.flux.flow import noisy

        return noisy(latents, noise, sigma)
