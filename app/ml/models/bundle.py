"""``ModelBundle``: the loaded base model that will flow on MODEL sockets.

A bundle is a shared, immutable handle. The executor caches it and hands the *same* object to every
consumer, so nothing may change its weights in place: its own methods run under ``torch.no_grad``
(unless asked for gradients) and never touch parameters, and code that trains or patches the model
(LoRA injection, full fine-tune) must work on adapters or its own copy and return a new handle.
Components are frozen (``requires_grad=False``) and in eval mode when the bundle is made.

``identities`` hold cheap content hashes per component (see ``identity.py``); the latent and text
caches key on them, so a different VAE file, or the same VAE in another dtype, re-encodes.

``quant`` names the components whose Linear weights LoadModel stored quantized (QLoRA, see
``app/ml/memory/quant.py``) and their format: ``{"transformer": "nf4"}``; components not in it are
plain ``dtypes``. ``precisions`` merges the two ({"transformer": "nf4", "vae": "bf16", ...}): what
saved LoRAs record as the base they were trained against and what the memory planner reads.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch

from .families import ModelFamily

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def parse_dtype(value: "str | torch.dtype") -> torch.dtype:
    if isinstance(value, torch.dtype):
        if value not in DTYPE_NAMES:
            raise ValueError(f"unsupported dtype {value}; use fp32, fp16 or bf16")
        return value
    try:
        return DTYPES[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {value!r}; use fp32, fp16 or bf16") from None


@dataclass(frozen=True, eq=False)
class ModelBundle:
    """A loaded model: components, tokenizers, scheduler config, dtypes and identities.

    ``denoiser`` is the family's denoising model (the SD UNet, the Flux transformer; ``unet`` is kept
    as its other name). ``text_encoders[i]`` / ``tokenizers[i]`` follow ``family.text_encoders[i]``.
    ``dtypes`` and ``identities`` are keyed by component name (``family.denoiser``: "unet" or
    "transformer"; "vae", "text_encoder", "text_encoder_2").
    """

    family: ModelFamily
    denoiser: Any
    vae: Any
    text_encoders: tuple
    tokenizers: tuple
    scheduler_config: Mapping[str, Any]
    dtypes: Mapping[str, torch.dtype]
    identities: Mapping[str, str]
    source: str = ""
    quant: Mapping[str, str] = field(default_factory=dict)  # component -> fp8 / int8 / nf4 (see the module docstring)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text_encoders", tuple(self.text_encoders))
        object.__setattr__(self, "tokenizers", tuple(self.tokenizers))
        object.__setattr__(self, "scheduler_config", MappingProxyType(dict(self.scheduler_config)))
        object.__setattr__(self, "dtypes", MappingProxyType(dict(self.dtypes)))
        object.__setattr__(self, "identities", MappingProxyType(dict(self.identities)))
        object.__setattr__(self, "quant", MappingProxyType(dict(self.quant)))
        if len(self.text_encoders) != len(self.family.text_encoders) or len(self.tokenizers) != len(self.text_encoders):
            raise ValueError(
                f"{self.family.id} needs {len(self.family.text_encoders)} text encoder(s) and tokenizer(s), got "
                f"{len(self.text_encoders)} and {len(self.tokenizers)}"
            )

    def __contents__(self):
        """The components (see NodeContext.exclusive)."""
        return (self.denoiser, self.vae, *self.text_encoders)

    @property
    def unet(self):
        """The denoiser under its SD name (code written for UNets keeps working)."""
        return self.denoiser

    # ------------------------------------------------------------------ identity / facts

    @property
    def identity(self) -> str:
        """One hash over all component identities: 'the same base model'."""
        h = hashlib.sha256()
        for name in sorted(self.identities):
            h.update(f"{name}={self.identities[name]};".encode())
        return h.hexdigest()[:32]

    @property
    def precisions(self) -> dict[str, str]:
        """Weight storage per component: the quantized format where there is one, else the dtype name."""
        return {name: self.quant.get(name) or DTYPE_NAMES.get(dt, str(dt)) for name, dt in self.dtypes.items()}

    @property
    def vae_identity(self) -> str:
        return self.identities["vae"]

    @property
    def text_identity(self) -> str:
        """Identity of everything that turns a prompt into embeddings (encoders and tokenizers)."""
        names = [te.name for te in self.family.text_encoders] + [te.tokenizer for te in self.family.text_encoders]
        key = "|".join(self.identities.get(n, "") for n in names)
        extra = self.family.text_key(self)  # e.g. Flux's T5 length; "" keeps SD identities as they were
        h = hashlib.sha256((key + ("|" + extra if extra else "")).encode())
        return h.hexdigest()[:32]

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler_config.get("prediction_type", self.family.prediction_type))

    @property
    def vae_scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", None) or self.family.vae_scaling_factor)

    @property
    def vae_shift_factor(self) -> float | None:
        return getattr(self.vae.config, "shift_factor", None) or self.family.vae_shift_factor

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel, from the loaded VAE's depth."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def make_noise_scheduler(self):
        """A fresh DDPM training scheduler from this model's scheduler config (not shared)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(dict(self.scheduler_config))

    # ------------------------------------------------------------------ encoding

    def encode_images(self, images: torch.Tensor, *, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE-encode ``B x 3 x H x W`` images in [-1, 1] to scaled latents (float32).

        The distribution's mode is used by default so cached latents are deterministic; pass
        ``sample=True`` (and a generator) to draw like kohya does.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"encode_images expects B x 3 x H x W, got {tuple(images.shape)}")
        f = self.vae_scale_factor
        if images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not a multiple of the VAE factor {f}")
        lo, hi = (float(v) for v in torch.aminmax(images))
        if lo < -1.001 or hi > 1.001:
            raise ValueError(f"encode_images expects pixel values in [-1, 1], got [{lo:.3g}, {hi:.3g}]")
        vae = self.vae
        weight = next(vae.parameters())  # diffusers' vae.device / .dtype walk every module on each call
        with torch.no_grad():
            x = images.to(device=weight.device, dtype=weight.dtype)
            dist = vae.encode(x).latent_dist
            z = dist.sample(generator) if sample else dist.mode()
            z = z.float()
            if self.vae_shift_factor is not None:
                z = z - self.vae_shift_factor
            return z * self.vae_scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of ``encode_images``: scaled latents -> images in [-1, 1] (float32, clamped)."""
        vae = self.vae
        with torch.no_grad():
            z = latents.float() / self.vae_scaling_factor
            if self.vae_shift_factor is not None:
                z = z + self.vae_shift_factor
            x = vae.decode(z.to(device=vae.device, dtype=vae.dtype)).sample
            return x.float().clamp(-1, 1)

    def tokenize(self, prompts: Sequence[str], chunks: int = 1) -> list[torch.Tensor]:
        """Token ids per tokenizer: ``B x 77``, cut at 75 prompt tokens; with ``chunks`` > 1,
        ``B x chunks x 77``: the prompt in 75-token pieces, each with its own BOS/EOS and padding
        (A1111's and kohya's long prompts), empty pieces where a prompt is shorter."""
        if isinstance(prompts, str):
            raise TypeError("encode_prompts/tokenize take a list of prompts, not a single string")
        if chunks < 1:
            raise ValueError("chunks must be at least 1")
        ids = []
        for tok in self.tokenizers:
            if chunks == 1:
                out = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt")
                ids.append(out.input_ids)
                continue
            body = tok.model_max_length - 2
            pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
            rows = torch.full((len(prompts), chunks, body + 2), pad, dtype=torch.long)
            for i, tokens in enumerate(_prompt_tokens(tok, prompts)):
                for c in range(chunks):
                    piece = tokens[c * body:(c + 1) * body]
                    rows[i, c, :len(piece) + 2] = torch.tensor([tok.bos_token_id, *piece, tok.eos_token_id])
            ids.append(rows)
        return ids

    def token_limit(self) -> int:
        """Prompt tokens the text encoder(s) read; longer prompts are cut (77 minus BOS and EOS)."""
        return min(tok.model_max_length for tok in self.tokenizers) - 2

    def token_counts(self, prompts: Sequence[str]) -> list[int]:
        """Tokens per prompt (without BOS/EOS) as the first tokenizer splits it, uncut."""
        return [len(ids) for ids in _prompt_tokens(self.tokenizers[0], prompts)]

    def encode_prompts(self, prompts: Sequence[str], *, clip_skip: int = 1, with_grad: bool = False,
                       chunks: int = 1) -> dict[str, torch.Tensor]:
        """Prompt embeddings as the family's denoiser consumes them (float32); see the family's
        ``encode_prompts`` (``app/ml/models/families/``) for what each family returns."""
        return self.family.encode_prompts(self, prompts, clip_skip=clip_skip, with_grad=with_grad, chunks=chunks)

    def add_time_ids(
        self,
        original_size: "tuple[int, int] | Sequence[tuple[int, int]]",
        crop_top_left: "tuple[int, int] | Sequence[tuple[int, int]]" = (0, 0),
        target_size: "tuple[int, int] | Sequence[tuple[int, int]] | None" = None,
        batch_size: int | None = None,
    ) -> torch.Tensor:
        """SDXL micro-conditioning: ``B x 6`` float32 rows of (orig h, orig w, crop top, crop left, target h, target w).

        Each argument is one ``(height, width)`` / ``(top, left)`` pair for the whole batch or a
        list with one pair per sample; ``target_size`` defaults to the original size.
        """
        if not self.family.uses_time_ids:
            raise ValueError(f"{self.family.display_name} does not use SDXL time ids")
        rows = [_pairs(original_size), _pairs(crop_top_left), _pairs(original_size if target_size is None else target_size)]
        n = max(len(r) for r in rows)
        if batch_size is not None:
            if n not in (1, batch_size):
                raise ValueError(f"got {n} sizes for a batch of {batch_size}")
            n = batch_size
        for r in rows:
            if len(r) not in (1, n):
                raise ValueError(f"time-id lists must have one entry or one per sample ({n}), got {len(r)}")
        ids = [[*rows[0][i % len(rows[0])], *rows[1][i % len(rows[1])], *rows[2][i % len(rows[2])]] for i in range(n)]
        return torch.tensor(ids, dtype=torch.float32)

    def __repr__(self) -> str:
        dt = ", ".join(f"{k}={v}" for k, v in self.precisions.items())
        return f"ModelBundle({self.family.id}, source={self.source!r}, {dt})"


def _pairs(value) -> list[tuple[int, int]]:
    if len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return [(int(value[0]), int(value[1]))]
    return [(int(a), int(b)) for a, b in value]


def _prompt_tokens(tok, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt, uncut and without BOS/EOS."""
    return tok(list(prompts), add_special_tokens=False, truncation=False, verbose=False).input_ids


def freeze(module) -> None:
    module.requires_grad_(False)
    module.eval()


def warn_fp16_sdxl_vae(family: ModelFamily, dtype: torch.dtype) -> None:
    if family.id == "sdxl" and dtype == torch.float16:
        warnings.warn(
            "The SDXL VAE overflows in fp16 (NaN/black latents) unless it is the fp16-fixed VAE; "
            "use fp32 or bf16 for the VAE.",
            stacklevel=3,
        )
