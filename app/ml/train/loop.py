"""The training loop.

Exact resume is a design property, not a feature bolted on: every random draw of step s comes from
generators seeded by (seed, s), and the data plan of epoch e is a pure function of (seed, e). A
backup therefore needs only the trainable weights, optimizer, scheduler, EMA and the position
(step, epoch, batch); a resumed run then draws exactly what an uninterrupted run would.

Data-parallel training (``accelerate launch``): every rank draws the same global batch plan and
the same noise, takes its own slice, and gradients are averaged across ranks, so W processes with
batch B equal one process with batch W x B.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from app.ml.dist import rank_world
from app.ml.memory.placement import DEVICE, HOST, Placement, module_bytes
from app.ml.flux.flow import FlowSettings
from app.ml.train.objective import ObjectiveSettings, per_sample_loss
from app.ml.train.optim import FUSED_OPTIMIZERS, FusedBackward, build_optimizer, build_scheduler, load_optimizer_state


class TrainingError(RuntimeError):
    pass


class StopTraining(Exception):
    """Raised by the cancel check; the loop writes a backup and re-raises the caller's exception."""


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 10
    max_steps: int = 0
    grad_accumulation: int = 1
    clip_grad_norm: float = 1.0
    seed: int = 42
    train_dtype: str = "fp32"  # autocast dtype: fp32 | fp16 | bf16
    gradient_checkpointing: bool = False
    # memory (see app/ml/memory): denoiser blocks streamed from RAM (kohya's blocks_to_swap; 0 = off),
    # checkpointed activations kept in RAM, and the optimizer stepped per parameter inside backward
    blocks_to_swap: int = 0
    offload_activations: bool = False
    fused_backward: bool = False
    zero_terminal_snr: bool = False
    objective: ObjectiveSettings = field(default_factory=ObjectiveSettings)
    flow: FlowSettings = field(default_factory=FlowSettings)  # flow-matching families (Flux)
    ema: bool = False
    ema_decay: float = 0.999
    ema_every: int = 1
    ema_on_cpu: bool = True
    # periodic work: every N of its unit (epochs | steps | minutes); 0 = never (validation: at the end)
    sample_every: int = 0
    sample_unit: str = "epochs"
    save_every: int = 0
    save_unit: str = "epochs"
    backup_every: int = 0
    backup_unit: str = "epochs"
    validate_every: int = 0
    validate_unit: str = "epochs"
    backups_kept: int = 3
    stop_text_encoder_after: int = 0  # optimizer steps; 0 = never
    stop_embedding_after: int = 0  # optimizer steps after which trained embeddings freeze; 0 = never
    prompt_chunks: int = 1  # captions read in 75-token pieces: 1, 2 or 3 (75, 150, 225 tokens)


@dataclass
class Batch:
    captions: list[str]
    loss_weights: torch.Tensor  # (B,)
    pixels: torch.Tensor | None = None  # B x 3 x H x W in [-1, 1]
    latents: torch.Tensor | None = None  # cached latents
    text: dict[str, torch.Tensor] | None = None  # cached text-encoder outputs
    masks: torch.Tensor | None = None  # B x H x W in [0, 1]
    original_sizes: list[tuple[int, int]] | None = None  # (h, w) before resize (SDXL conditioning)
    crops_top_left: list[tuple[int, int]] | None = None


class BatchSource(Protocol):
    """The data side of training: a pure function of (epoch, index), so resume is exact."""

    def iterations(self, epoch: int) -> int: ...

    def batch(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> Batch: ...


class Trainable(Protocol):
    """What trains: an adapter patched into the shared base model, or a model's own copy."""

    def param_groups(self, optimizer_settings: dict) -> list[dict]: ...

    def components(self): ...  # (unet, text_encoders) to run forward through

    def attached(self): ...  # context manager: patches in while training runs, removed after

    def trains_text_encoder(self) -> bool: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Hooks:
    """What the node layer does at the loop's periodic points (all optional)."""

    progress: Callable[[int, int], None] = lambda step, total: None
    metric: Callable[..., None] = lambda **values: None
    log: Callable[[str], None] = lambda message: None
    check_cancel: Callable[[], None] = lambda: None
    sample: Callable[[int, int], None] | None = None  # (step, epoch)
    save: Callable[[int, int], None] | None = None
    validation: BatchSource | None = None


@dataclass
class TrainResult:
    steps: int
    epochs_done: int
    losses: list[float]
    validation: list[tuple[int, float]]
    backups: list[str]
    last_backup: str | None
    elapsed_s: float
    # the run's peak memory: on CUDA torch.cuda.max_memory_allocated over the run (weights included);
    # on a CPU the resident-size growth over the loaded process (the kernel's high-water mark), so
    # weights loaded before the run are not in it. None where neither can be read.
    peak_bytes: int | None = None
    peak_kind: str = ""


def _seeded(*parts: int) -> torch.Generator:
    h = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))


class EMA:
    """Exponential moving average of the trainable weights, kept on CPU or the device."""

    def __init__(self, params: list[torch.Tensor], decay: float, on_cpu: bool) -> None:
        self.decay = decay
        self.device = torch.device("cpu") if on_cpu else None
        self.shadow = [p.detach().to(self.device or p.device, dtype=torch.float32, copy=True) for p in params]

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        for s, p in zip(self.shadow, params):
            s.mul_(self.decay).add_(p.detach().to(s.device, torch.float32), alpha=1 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i}": t for i, t in enumerate(self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for i, s in enumerate(self.shadow):
            s.copy_(state[f"ema.{i}"])


class Trainer:
    def __init__(self, bundle, trainable: Trainable, data: BatchSource, optimizer_settings: dict,
                 settings: TrainSettings, workdir: Path, hooks: Hooks | None = None,
                 device: torch.device | None = None, mover: Callable | None = None) -> None:
        self.bundle = getattr(trainable, "model", bundle)  # the handle to train through
        self.trainable = trainable
        self.data = data
        self.opt_settings = dict(optimizer_settings)
        self.s = settings
        self.workdir = Path(workdir)
        self.hooks = hooks or Hooks()
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # where components live: VAE and idle text encoders in RAM, visiting the device to encode;
        # ``mover`` (tests) replaces the real moves, see app/ml/memory/placement.py
        self.placement = Placement(self.device, mover)
        self.offloaded: dict[str, int] = {}
        self.rank, self.world = rank_world()
        self.is_main = self.rank == 0

    # ---- planning --------------------------------------------------------------------------
    def total_steps(self) -> int:
        """Optimizer steps: max_steps if set, else each epoch's batches in groups of grad_accumulation."""
        if self.s.max_steps:
            return self.s.max_steps
        acc = self.s.grad_accumulation
        return sum(-(-self.data.iterations(e) // acc) for e in range(self.s.epochs))

    # ---- the loop --------------------------------------------------------------------------
    def run(self, resume_from: str | Path | None = None) -> TrainResult:
        """Train; every component is back in RAM afterwards (and after an error or a stop)."""
        self._check_memory_settings()
        peak = _PeakMemory(self.device)
        swap = self._place()
        try:
            with self.placement.active():
                result = self._run(resume_from)
        finally:
            self._unplace(swap)
            if self.s.offload_activations and self.offloaded.get("offloaded"):
                self.hooks.log(f"activations offloaded to RAM: {self.offloaded['offloaded']} tensors, "
                               f"{self.offloaded['bytes'] / 2**20:.1f} MiB over the run")
        # the TrainLoop node logs it once, next to the memory plan's prediction
        result.peak_bytes, result.peak_kind = peak.read()
        return result

    def _run(self, resume_from) -> TrainResult:
        t_start = time.monotonic()
        s = self.s
        total = self.total_steps()
        if total <= 0:
            raise TrainingError("nothing to train: the dataset gives no batches (check the Bucketer's "
                                "batch size and the leftovers it reported)")
        objective = self.bundle.family.make_objective(self.bundle, s)  # the family's: DDPM noise or flow
        groups = self.trainable.param_groups(self.opt_settings)
        params = [p for g in groups for p in g["params"]]
        for p in params:
            p.requires_grad_(True)
        optimizer = build_optimizer(self.opt_settings, groups)
        fused = FusedBackward(optimizer, clip_grad_norm=s.clip_grad_norm,
                              before_step=self._sync_gradients) if s.fused_backward else None
        lr_sched = build_scheduler(optimizer, self.opt_settings, total)
        ema = EMA(params, s.ema_decay, s.ema_on_cpu) if s.ema else None
        autocast = _autocast(self.device, s.train_dtype)
        if s.train_dtype == "fp16" and self.device.type == "cpu":
            self.hooks.log("fp16 mixed precision needs a GPU; training in fp32 on this CPU (bf16 works on CPUs)")
        scaler = torch.amp.GradScaler(self.device.type) if s.train_dtype == "fp16" and self.device.type == "cuda" else None

        step, epoch, batch_index = 0, 0, 0
        step_start = (0, 0)
        if resume_from:
            step, epoch, batch_index = self._load_backup(Path(resume_from), optimizer, lr_sched, ema)
            step_start = (epoch, batch_index)
            self.hooks.log(f"resumed from {resume_from} at step {step} (epoch {epoch + 1}, batch {batch_index})")
        losses: list[float] = []
        validation: list[tuple[int, float]] = []
        backups: list[str] = []
        last_backup = None
        smooth = None
        timer = _Periodic()
        # a resumed run past a stop starts stopped, as the uninterrupted run is at that step
        te_stopped = bool(s.stop_text_encoder_after) and step >= s.stop_text_encoder_after and \
            self._stop_text_encoder(optimizer)
        emb_stopped = bool(s.stop_embedding_after) and step >= s.stop_embedding_after and self._stop_embedding(optimizer)
        t_steps, steps_timed = time.monotonic(), 0
        unet, text_encoders = self.trainable.components()
        ckpt_ctx = _gradient_checkpointing(unet, s.gradient_checkpointing)
        with self.trainable.attached(), ckpt_ctx:
            _set_train(unet, text_encoders, self.trainable.trains_text_encoder())
            try:
                while step < total:
                    n_batches = self.data.iterations(epoch)
                    if n_batches == 0:
                        raise TrainingError(f"epoch {epoch + 1} has no batches")
                    while batch_index < n_batches and step < total:
                        step_start = (epoch, batch_index)  # a stop inside an accumulation redoes the group
                        accum_loss = 0.0
                        for micro in range(s.grad_accumulation):
                            if batch_index >= n_batches:
                                break
                            self.hooks.check_cancel()
                            loss = self._micro_step(objective, unet, text_encoders, epoch, batch_index, step, micro,
                                                    autocast, scaler, te_stopped, emb_stopped)
                            if not math.isfinite(loss):
                                optimizer.zero_grad(set_to_none=True)
                                path = self._backup(step, *step_start, optimizer, lr_sched, ema, backups)
                                raise TrainingError(
                                    f"the loss became {loss} at step {step + 1} (epoch {epoch + 1}); training "
                                    f"stopped. The last good state is backed up in {path}. Try a lower learning "
                                    "rate, bf16 or fp32 instead of fp16, or gradient clipping.")
                            accum_loss += loss / s.grad_accumulation
                            batch_index += 1
                        if fused is None:  # fused: each parameter was stepped inside backward
                            self._optimizer_step(optimizer, params, scaler)
                        lr_sched.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                        # from here a stop resumes after this step: at the next batch (or the next epoch)
                        step_start = (epoch + 1, 0) if batch_index >= n_batches else (epoch, batch_index)
                        if ema is not None and step % max(1, s.ema_every) == 0:
                            ema.update(params)
                        if s.stop_text_encoder_after and step >= s.stop_text_encoder_after and not te_stopped:
                            te_stopped = self._stop_text_encoder(optimizer)
                        if s.stop_embedding_after and step >= s.stop_embedding_after and not emb_stopped:
                            emb_stopped = self._stop_embedding(optimizer)
                        losses.append(accum_loss)
                        smooth = accum_loss if smooth is None else 0.95 * smooth + 0.05 * accum_loss
                        steps_timed += 1
                        elapsed = time.monotonic() - t_steps
                        rate = steps_timed / elapsed if elapsed > 0 else 0.0
                        lrs = {g.get("name", str(i)): g["lr"] or 0.0 for i, g in enumerate(optimizer.param_groups)}
                        self.hooks.metric(loss=accum_loss, smooth_loss=smooth, lr=next(iter(lrs.values())), lrs=lrs,
                                          step=step, epoch=epoch + 1, steps_per_s=rate,
                                          eta_s=(total - step) / rate if rate else None, memory_mb=_memory_mb(self.device))
                        self.hooks.progress(step, total)
                        end_of_epoch = batch_index >= n_batches
                        position = (epoch + 1, 0) if end_of_epoch else (epoch, batch_index)
                        if self.is_main:
                            last_backup = self._periodic(timer, step, epoch, end_of_epoch, total, position, optimizer,
                                                         lr_sched, ema, backups, validation, objective, unet,
                                                         text_encoders) or last_backup
                    if batch_index >= n_batches:
                        epoch += 1
                        batch_index = 0
            except BaseException as e:
                from app.engine.errors import Cancelled

                if isinstance(e, (Cancelled, StopTraining)) and self.is_main:
                    optimizer.zero_grad(set_to_none=True)
                    last_backup = self._backup(step, *step_start, optimizer, lr_sched, ema, backups)
                    self.hooks.log(f"stopped at step {step}; resumable backup in {last_backup}")
                raise
            finally:
                if fused is not None:
                    fused.remove()
                _set_eval(unet, text_encoders)
                if hasattr(optimizer, "eval"):
                    optimizer.eval()  # schedule-free: switch to the averaged weights
            if self.is_main and self.hooks.validation is not None:
                validation.append((step, self.validation_loss(objective, unet, text_encoders)))
        if ema is not None:
            with torch.no_grad():
                for p, shadow in zip(params, ema.shadow):
                    p.copy_(shadow.to(p.device, p.dtype))
        return TrainResult(step, epoch, losses, validation, backups, last_backup, time.monotonic() - t_start)

    def _optimizer_step(self, optimizer, params, scaler) -> None:
        self._sync_gradients(params)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if self.s.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, self.s.clip_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    # ---- where components live ------------------------------------------------------------------
    def _check_memory_settings(self) -> None:
        """Refuse memory settings that cannot work together, by TrainLoop param, before anything moves."""
        s = self.s
        if s.blocks_to_swap:
            family = self.bundle.family
            blocks = family.swappable_blocks(self.bundle.denoiser)
            counts = " + ".join(f"{len(getattr(self.bundle.denoiser, n, None) or ())} {n}" for n in family.swap_blocks)
            if s.blocks_to_swap < 0 or s.blocks_to_swap >= len(blocks):
                raise TrainingError(
                    f"TrainLoop's blocks_to_swap is {s.blocks_to_swap}, but this {family.display_name} denoiser has "
                    f"{len(blocks)} swappable blocks ({counts}): choose 1 to {len(blocks) - 1} (at least one block stays "
                    "on the device), or 0 for no block swap.")
            block_params = {id(p) for b in blocks for p in b.parameters()}
            if any(id(p) in block_params for g in self.trainable.param_groups(self.opt_settings) for p in g["params"]):
                raise TrainingError(
                    "TrainLoop's blocks_to_swap streams frozen blocks of the denoiser, but this full fine-tune trains "
                    "them: their weights, gradients and optimizer state would have to travel too. Set blocks_to_swap "
                    "to 0, or train a LoRA (LoRAInject) on the model.")
        if s.fused_backward:
            name = self.opt_settings.get("optimizer", "adamw")
            if name not in FUSED_OPTIMIZERS:
                raise TrainingError(
                    f"TrainLoop's fused_backward steps the optimizer one parameter at a time, which {name} does not "
                    f"allow (it looks at all parameters at once); use {' or '.join(FUSED_OPTIMIZERS)}, or turn "
                    "fused_backward off.")
            if s.grad_accumulation > 1:
                raise TrainingError(
                    f"TrainLoop's fused_backward steps each parameter as soon as its gradient exists and frees it, so "
                    f"nothing is left to accumulate: set grad_accumulation to 1 (it is {s.grad_accumulation}; a larger "
                    "batch gives the same effective batch) or turn fused_backward off.")
            if s.train_dtype == "fp16" and self.device.type == "cuda":
                raise TrainingError(
                    "TrainLoop's fused_backward cannot be combined with fp16 training, whose loss scaler checks every "
                    "gradient before any step: train in bf16 (or fp32), or turn fused_backward off.")
        if s.offload_activations and not s.gradient_checkpointing:
            self.hooks.log("offload_activations without gradient_checkpointing copies every activation backward "
                           "needs to RAM and back (slow); with checkpointing only each block's input travels")

    def _place(self):
        """Components where a step needs them: the denoiser (its swappable blocks streamed when
        blocks_to_swap is set) and the trained parts on the device; the VAE, and the text encoders
        unless they train, in RAM (they visit the device to encode: see ``_latents``, ``_conditioning``)."""
        b, s, place = self.bundle, self.s, self.placement
        te_on = self.trainable.trains_text_encoder() or getattr(self.trainable, "trains_embedding", lambda: False)()
        swap = None
        if s.blocks_to_swap:
            from app.ml.memory.swap import BlockSwap

            blocks = b.family.swappable_blocks(b.denoiser)
            place.move_parts(b.denoiser, DEVICE, blocks)
            mover = None
            if place._mover is not None:
                mover = lambda index, block, target: place._mover(block, target, ())  # noqa: E731
            swap = BlockSwap(torch.nn.ModuleList(blocks), len(blocks) - s.blocks_to_swap, self.device, mover=mover,
                             where="TrainLoop")
        else:
            place.move(b.denoiser, DEVICE)
        idle = []
        for name, module in [("VAE", b.vae)] + [(spec.name, te) for spec, te in zip(b.family.text_encoders, b.text_encoders)]:
            on = module is not b.vae and te_on
            place.move(module, DEVICE if on else HOST)
            if not on:
                idle.append(f"{name} {_size(module_bytes(module))}")
        if hasattr(self.trainable, "to"):
            self.trainable.to(self.device)
        if idle and (self.device.type != "cpu" or place.instrumented):  # on a CPU the device is the RAM
            self.hooks.log(f"kept in RAM, on the device only to encode or sample: {', '.join(idle)}")
        if swap is not None:
            self.hooks.log(f"block swap: {s.blocks_to_swap} of {len(swap.blocks)} denoiser blocks streamed from RAM")
        return swap

    def _unplace(self, swap) -> None:
        """Everything back in RAM: the next node (a Sample, another TrainLoop) brings what it needs."""
        b, place = self.bundle, self.placement
        if swap is not None:
            swap.remove(HOST)
        for module in (b.denoiser, b.vae, *b.text_encoders):
            place.move(module, HOST)
        if hasattr(self.trainable, "to"):
            self.trainable.to("cpu")

    # ---- one micro-batch ---------------------------------------------------------------------
    def _micro_step(self, objective, unet, text_encoders, epoch, index, step, micro, autocast,
                    scaler, te_stopped, emb_stopped=False) -> float:
        s = self.s
        # seeds depend on the global position only, so a resumed run draws exactly the same
        torch.manual_seed(int(_seeded(s.seed, step, micro, 1).initial_seed() % (2**63)))
        batch = self.data.batch(epoch, index, self.rank, self.world)
        latents = self._latents(batch)
        full_b = latents.shape[0] * self.world
        g = _seeded(s.seed, step, micro, 0)
        noise_all, t_all = objective.draw((full_b,) + tuple(latents.shape[1:]), g)
        mask_draw = torch.rand(full_b, generator=g) >= s.objective.unmasked_probability
        sl = slice(self.rank * latents.shape[0], (self.rank + 1) * latents.shape[0])
        noise, timesteps, use_mask = noise_all[sl].to(latents), t_all[sl].to(latents.device), mask_draw[sl]
        noisy = objective.noisy(latents, noise, timesteps, g)
        target = objective.target(latents, noise, timesteps)
        train_te = self.trainable.trains_text_encoder() and not te_stopped
        # a trained embedding is read by the text encoders: they run every step, with gradients to its rows
        trains_embedding = getattr(self.trainable, "trains_embedding", lambda: False)() and not emb_stopped
        family = self.bundle.family
        with autocast, self._offload():
            model_dtype = next(unet.parameters()).dtype
            cond = _cast(self._conditioning(batch, train_te or trains_embedding, latents, objective), model_dtype)
            pred = family.predict(unet, noisy.to(model_dtype), timesteps, cond)
            loss = per_sample_loss(pred, target, s.objective, batch.masks.to(pred.device) if batch.masks is not None else None,
                                   use_mask.to(pred.device))
            weights = objective.weights(timesteps) * batch.loss_weights.to(loss.device)
            loss = (loss * weights).mean()
        value = float(loss.detach())
        if math.isfinite(value):
            scaled = loss / s.grad_accumulation
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return value

    def _offload(self):
        from app.ml.memory.offload import activations_on_host

        # on a CPU the saved tensors are already in RAM: they are copied anyway, so the path (and its
        # counter) runs the same as on a GPU, at a cost only there
        return activations_on_host(self.s.offload_activations, counter=self.offloaded,
                                   copy_host_tensors=self.device.type == "cpu")

    def _latents(self, batch: Batch) -> torch.Tensor:
        if batch.latents is not None:
            return batch.latents.to(self.device, torch.float32)
        with self.placement.visit(self.bundle.vae):  # the VAE visits the device for the encode only
            return self.bundle.encode_images(batch.pixels).to(torch.float32)  # moved once, after the range check

    def _conditioning(self, batch: Batch, train_te: bool, latents: torch.Tensor, objective) -> dict[str, Any]:
        if batch.text is not None and not train_te and self.s.prompt_chunks == 1:
            text = {k: v.to(self.device) for k, v in batch.text.items()}
        else:  # encoders that do not train visit the device for the encode only (trained ones live there)
            with self.placement.visit(*self.bundle.text_encoders):
                text = self.bundle.encode_prompts(batch.captions, with_grad=train_te, chunks=self.s.prompt_chunks)
        if batch.pixels is not None:
            size = tuple(batch.pixels.shape[-2:])
        else:
            size = tuple(x * self.bundle.vae_scale_factor for x in latents.shape[-2:])
        return self.bundle.family.conditioning(
            self.bundle, text, pixel_size=size, batch=len(batch.captions), device=self.device,
            original_sizes=batch.original_sizes, crops_top_left=batch.crops_top_left, guidance=objective.guidance)

    # ---- periodic work -----------------------------------------------------------------------
    def _periodic(self, timer, step, epoch, end_of_epoch, total, position, optimizer, lr_sched, ema, backups,
                  validation, objective, unet, text_encoders):
        s = self.s
        last = step >= total
        backup = None
        # the last step's sample and save come from the caller ("after" samples, the Save node)
        if s.sample_every and self.hooks.sample and not last and timer.due("sample", s.sample_every, s.sample_unit, step, end_of_epoch):
            _set_eval(unet, text_encoders)
            self.hooks.sample(step, epoch + 1)
            _set_train(unet, text_encoders, self.trainable.trains_text_encoder())
        if s.save_every and self.hooks.save and not last and timer.due("save", s.save_every, s.save_unit, step, end_of_epoch):
            self.hooks.save(step, epoch + 1)
        if s.backup_every and not last and timer.due("backup", s.backup_every, s.backup_unit, step, end_of_epoch):
            backup = self._backup(step, *position, optimizer, lr_sched, ema, backups)
        if s.validate_every and self.hooks.validation is not None and not last and \
                timer.due("validate", s.validate_every, s.validate_unit, step, end_of_epoch):
            validation.append((step, self.validation_loss(objective, unet, text_encoders)))
            _set_train(unet, text_encoders, self.trainable.trains_text_encoder())
        return backup

    @torch.no_grad()
    def validation_loss(self, objective, unet, text_encoders) -> float:
        """Deterministic: fixed timesteps spread over the schedule and fixed noise per sample."""
        source = self.hooks.validation
        _set_eval(unet, text_encoders)
        n_t = 4
        total, count = 0.0, 0
        family = self.bundle.family
        for index in range(source.iterations(0)):
            batch = source.batch(0, index)
            latents = self._latents(batch)
            dtype = next(unet.parameters()).dtype
            cond = _cast(self._conditioning(batch, False, latents, objective), dtype)
            for k, timesteps in enumerate(objective.validation_timesteps(n_t, latents.shape[0], latents.device)):
                noise = torch.randn(latents.shape, generator=_seeded(self.s.seed, 99991, index, k)).to(latents)
                noisy = objective.validation_noisy(latents, noise, timesteps)
                pred = family.predict(unet, noisy.to(dtype), timesteps, cond)
                target = objective.target(latents, noise, timesteps)
                total += float(per_sample_loss(pred, target, self.s.objective).sum())
                count += latents.shape[0]
        value = total / max(1, count)
        self.hooks.metric(validation_loss=value)
        return value

    # ---- backups -----------------------------------------------------------------------------
    def _backup(self, step, epoch, batch_index, optimizer, lr_sched, ema, backups) -> str:
        """A resumable snapshot, built in a temp folder and renamed: a crash or a full disk never
        leaves half of one (the temp folder goes, and the error names the backup and the size)."""
        from safetensors.torch import save_file

        from app.atomic import atomic_folder

        root = self.workdir / "backups"
        final = root / f"step_{step:07d}"
        weights = {k: v.detach().cpu().contiguous() for k, v in self.trainable.state_dict().items()}
        state = {"optimizer": optimizer.state_dict(), "scheduler": lr_sched.state_dict(),
                 "ema": ema.state_dict() if ema is not None else None}
        meta = {"step": step, "epoch": epoch, "batch_index": batch_index, "seed": self.s.seed,
                "settings": _jsonable(asdict(self.s)), "optimizer": self.opt_settings, "time": time.time()}
        with atomic_folder(final, overwrite=True, size_hint=tensor_bytes(weights) + tensor_bytes(state)) as target:
            save_file(weights, str(target.tmp / "trainable.safetensors"))
            torch.save(state, target.tmp / "state.pt")
            (target.tmp / "backup.json").write_text(json.dumps(meta, indent=2))
        backups.append(str(final))
        prune_backups(root, self.s.backups_kept)
        return str(final)

    def _load_backup(self, path: Path, optimizer, lr_sched, ema) -> tuple[int, int, int]:
        from safetensors.torch import load_file

        import pickle

        path, meta = verify_backup(path)
        try:
            weights = load_file(str(path / "trainable.safetensors"))
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:  # torch's text suggests weights_only=False: never for a shared file
            raise TrainingError(f"resume_from {path}: state.pt holds objects other than tensors and plain "
                                f"values, so it is not a TrainLoop backup and is not unpickled. {BACKUP_HOLDS}") from None
        except Exception as e:  # noqa: BLE001 - any unreadable content is the same answer to the user
            raise TrainingError(f"resume_from {path}: cannot read this backup ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else 'no detail'}). {BACKUP_HOLDS}") from None
        if not isinstance(state, dict) or not {"optimizer", "scheduler"} <= state.keys():
            raise TrainingError(f"resume_from {path}: state.pt has no optimizer and scheduler state. {BACKUP_HOLDS}")
        self.trainable.load_state_dict(weights)
        load_optimizer_state(optimizer, state["optimizer"])
        lr_sched.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema"):
            ema.load_state_dict(state["ema"])
        return int(meta["step"]), int(meta["epoch"]), int(meta["batch_index"])

    def _stop_text_encoder(self, optimizer) -> bool:
        return self._stop_groups(optimizer, lambda name: name.startswith("text_encoder"), "text encoder")

    def _stop_embedding(self, optimizer) -> bool:
        """Pivotal tuning's "stop the embedding after N steps": its rows freeze, the adapter trains on."""
        return self._stop_groups(optimizer, lambda name: name == "embedding", "embedding")

    def _stop_groups(self, optimizer, chosen, what: str) -> bool:
        """Freeze the param groups ``chosen(name)`` picks: no rate, no decay, no gradients."""
        for g in optimizer.param_groups:
            if chosen(str(g.get("name", ""))):
                g["lr"] = 0.0
                g["weight_decay"] = 0.0
                for p in g["params"]:
                    p.requires_grad_(False)
        self.hooks.log(f"{what} training stopped")
        return True

    def _sync_gradients(self, params) -> None:
        if self.world <= 1:
            return
        import torch.distributed as dist

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(self.world)


class _Periodic:
    """Decides when "every N epochs / steps / minutes" work is due."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.last: dict[str, float] = {}

    def due(self, what: str, every: int, unit: str, step: int, end_of_epoch: bool) -> bool:
        if unit == "steps":
            return step % every == 0
        if unit == "epochs":
            if not end_of_epoch:
                return False
            self.last[what] = self.last.get(what, 0) + 1
            return self.last[what] % every == 0
        now = time.monotonic()
        if now - self.last.get(what, self.start) >= every * 60:
            self.last[what] = now
            return True
        return False


def _cast(cond: dict, dtype: torch.dtype) -> dict:
    """UNet inputs in the UNet's weight dtype (bf16 weights trained without autocast, say)."""
    out = {}
    for k, v in cond.items():
        if isinstance(v, dict):
            out[k] = _cast(v, dtype)
        else:
            out[k] = v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
    return out


def _autocast(device: torch.device, dtype: str):
    if dtype == "fp32":
        return nullcontext()
    dt = torch.bfloat16 if dtype == "bf16" else torch.float16
    if device.type == "cpu" and dt == torch.float16:
        return nullcontext()  # fp16 autocast is a GPU feature; CPUs train in fp32 or bf16
    return torch.autocast(device.type, dtype=dt)


def _gradient_checkpointing(unet, enabled: bool):
    from contextlib import contextmanager

    @contextmanager
    def ctx():
        was = getattr(unet, "is_gradient_checkpointing", False)
        if enabled and not was and hasattr(unet, "enable_gradient_checkpointing"):
            unet.enable_gradient_checkpointing()
        try:
            yield
        finally:
            if enabled and not was and hasattr(unet, "disable_gradient_checkpointing"):
                unet.disable_gradient_checkpointing()

    return ctx()


def _set_train(unet, text_encoders, train_te: bool) -> None:
    unet.train()
    for te in text_encoders:
        te.train(train_te)


def _set_eval(unet, text_encoders) -> None:
    unet.eval()
    for te in text_encoders:
        te.eval()


class _PeakMemory:
    """The run's peak: CUDA's allocator high-water mark, or on a CPU the kernel's resident-size
    high-water mark (VmHWM, reset for the run through /proc/self/clear_refs) over the resident size
    at the start. Read once at the end: nothing is sampled during steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the system, so the base is what is held
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status("VmRSS")
        except OSError:
            self.base = None

    def read(self) -> tuple[int | None, str]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device)), "CUDA max_memory_allocated"
        if self.base is None:
            return None, ""
        peak = _proc_status("VmHWM")
        return (None, "") if peak is None else (max(0, peak - self.base), "RSS growth over the loaded process")


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _memory_mb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    except Exception:
        return None


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


_BACKUP_NAME = re.compile(r"^step_\d{7}$")


def prune_backups(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups in ``root``. Only folders this loop names
    (``step_NNNNNNN``), real ones inside ``root``: never a symlink, nor anything a user put there."""
    try:
        entries = sorted(p for p in root.iterdir() if _BACKUP_NAME.match(p.name) and not p.is_symlink() and p.is_dir()
                         and (p / "backup.json").is_file())
    except OSError:
        return []
    gone = entries[: max(0, len(entries) - keep)]
    for old in gone:
        shutil.rmtree(old, ignore_errors=True)
    return gone


def tensor_bytes(value) -> int:
    """Bytes of the tensors in a (nested) state dict: what a backup of it takes on disk, about."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


# ---- resume: finding and checking a backup before anything is unpickled ----------------------

BACKUP_FILES = ("backup.json", "trainable.safetensors", "state.pt")
BACKUP_HOLDS = ("A backup is a folder written by TrainLoop's backups (…/TrainLoop_N/backups/step_NNNNNNN) "
                "holding backup.json, trainable.safetensors and state.pt; choose one, or the backups folder "
                "for the latest. To start from a LoRA file, use LoRAInject's init_from instead.")


def verify_backup(path: str | Path) -> tuple[Path, dict]:
    """The backup folder `path` names (itself, the latest step_* in it or in its backups/) and
    its backup.json, checked before any torch.load: a LoRA file, an empty folder or a foreign
    pickle gets a message naming the path and what a backup holds, never torch's own error."""
    import zipfile

    path = Path(path)

    def refuse(why: str):
        raise TrainingError(f"resume_from {path}: {why}. {BACKUP_HOLDS}") from None

    if not path.exists():
        refuse("no such file or folder")
    if path.is_file():
        if path.name in BACKUP_FILES and all((path.parent / f).is_file() for f in BACKUP_FILES):
            path = path.parent  # a file inside a backup: the backup is meant
        else:
            kind = " (a LoRA or model file?)" if path.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".pth", ".bin") else ""
            refuse(f"is a file{kind}, not a backup folder")
    if not (path / "backup.json").exists():
        try:
            base = path / "backups" if (path / "backups").is_dir() else path
            candidates = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                                and (p / "backup.json").is_file())
        except OSError as e:
            refuse(f"cannot list the folder ({e.strerror or e})")
        if not candidates:
            refuse("no backup found in this folder")
        path = candidates[-1]
    missing = [f for f in BACKUP_FILES if not (path / f).is_file()]
    if missing:
        refuse(f"incomplete backup, {', '.join(missing)} missing")
    try:
        meta = json.loads((path / "backup.json").read_text(encoding="utf-8"))
        step, epoch, batch = (int(meta[k]) for k in ("step", "epoch", "batch_index"))
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        refuse(f"backup.json is not a TrainLoop backup record ({type(e).__name__}: {e})")
    if min(step, epoch, batch) < 0:
        refuse("backup.json holds a negative position")
    if not zipfile.is_zipfile(path / "state.pt"):  # torch.save writes a zip; anything else is foreign
        refuse("state.pt was not written by torch.save (a foreign or damaged file)")
    return path, meta
