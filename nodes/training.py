"""Training nodes: the optimizer recipe and the training loop."""

import time

from app.engine.errors import Cancelled

from app.ml.train.names import (FLOW_SHIFTS, FLOW_TIMESTEPS, FLOW_WEIGHTINGS, LOSSES, NOISE_OBJECTIVE_PARAMS, OPTIMIZERS,
                                 SCHEDULES, TIMESTEP_DISTRIBUTIONS, WEIGHTINGS)
from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PENDING = "is declared but not implemented yet: it arrives with the training issue"



@node(type="Optimizer", category="training",
      description="An optimizer and learning-rate schedule, with separate rates for the UNet and text encoders. "
                  "Adaptive optimizers (Prodigy, DAdaptation) want lr 1.0 and a constant schedule.",
      inputs=[
          Enum("optimizer", list(OPTIMIZERS)),
          Float("lr", 1e-4, min=0.0, max=10.0, tooltip="UNet learning rate (1.0 for adaptive optimizers)"),
          Float("text_encoder_lr", 5e-5, min=0.0, max=10.0, tooltip="text encoder learning rate (UNet / 2-3)"),
          Float("weight_decay", 0.01, min=0.0, max=10.0),
          Float("beta1", 0.9, min=0.0, max=1.0, tooltip="also the momentum of SGD"),
          Float("beta2", 0.999, min=0.0, max=1.0),
          Float("eps", 1e-8, min=0.0, max=1.0),
          Float("d_coef", 1.0, min=0.0, max=100.0, advanced=True, tooltip="Prodigy step-size coefficient"),
          Bool("safeguard_warmup", True, advanced=True, tooltip="Prodigy: safer estimate during warmup"),
          Bool("bias_correction", True, advanced=True, tooltip="Prodigy: Adam-style bias correction"),
          Bool("relative_step", False, advanced=True, tooltip="Adafactor: its own relative step size instead of lr"),
          Enum("schedule", list(SCHEDULES)),
          Float("warmup", 0.0, min=0.0, max=1_000_000.0, tooltip="below 1: a fraction of the steps; else a step count"),
          Float("min_factor", 0.0, min=0.0, max=1.0, tooltip="the schedule never goes below lr x this"),
          Int("cycles", 1, min=1, max=1000, tooltip="restarts for cosine_restarts"),
          Float("power", 1.0, min=0.0, max=10.0, tooltip="power for polynomial"),
          Int("stop_text_encoder_after", 0, min=0, max=10_000_000,
              tooltip="stop training the text encoder(s) after this many steps or epochs; 0 = never"),
          Enum("stop_text_encoder_unit", ["epochs", "steps"]),
          Float("embedding_lr", 5e-3, min=0.0, max=10.0,
                tooltip="learning rate of trained embeddings (Embedding node); 5e-3 with AdamW as OneTrainer"),
          Int("stop_embedding_after", 0, min=0, max=10_000_000,
              tooltip="stop training the embedding(s) after this many steps or epochs (pivotal tuning: the LoRA "
                      "goes on); 0 = never"),
          Enum("stop_embedding_unit", ["epochs", "steps"]),
      ],
      outputs=[Output("optimizer", "OPTIMIZER")])
def optimizer(ctx, **params):
    """The settings themselves flow on: the torch optimizer is built by TrainLoop once it knows
    which parameters train."""
    if params["optimizer"] in ("prodigy", "dadapt_adam") and params["lr"] < 0.1:
        ctx.warn(f"{params['optimizer']} adapts its step size; it expects lr around 1.0, not {params['lr']}")
    return dict(params)


UNITS = ["epochs", "steps", "minutes"]
SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc"]


def _objective_choice(ctx, kind: str, params: dict) -> dict:
    """What flows on an OBJECTIVE socket: the kind, the params and the node's name for error messages."""
    return {"kind": kind, "node": f"{ctx.title or ctx.node_type} (node {ctx.node_id})", "params": dict(params)}


# The noise objective's params are those TrainLoop version 1 had, with the same names and defaults, so an
# unlinked TrainLoop on an SD model trains exactly as before.
_NOISE_INPUTS = [
    Enum("prediction", ["auto", "epsilon", "v_prediction"], tooltip="auto: from the model"),
    Bool("zero_terminal_snr", False, advanced=True, tooltip="rescale the schedule (use with v-prediction)"),
    Float("offset_noise", 0.0, min=0.0, max=1.0, tooltip="0.05-0.1 helps very dark/bright images"),
    Float("perturbation_noise", 0.0, min=0.0, max=1.0, advanced=True),
    Enum("timesteps", list(TIMESTEP_DISTRIBUTIONS)),
    Float("timestep_bias", 0.0, min=-5.0, max=5.0, advanced=True),
    Float("timestep_scale", 1.0, min=0.0, max=10.0, advanced=True),
    Float("min_noising", 0.0, min=0.0, max=1.0, tooltip="lowest timestep, as a fraction of the schedule"),
    Float("max_noising", 1.0, min=0.0, max=1.0, tooltip="highest timestep, as a fraction of the schedule"),
    Enum("loss", list(LOSSES)),
    Float("huber_delta", 0.1, min=0.0, max=10.0, advanced=True),
    Enum("weighting", list(WEIGHTINGS), tooltip="min_snr: min-SNR-gamma; debiased: debiased estimation"),
    Float("min_snr_gamma", 5.0, min=0.0, max=100.0),
]
NOISE_DEFAULTS = {i.name: i.default for i in _NOISE_INPUTS}
assert tuple(NOISE_DEFAULTS) == NOISE_OBJECTIVE_PARAMS


@node(type="NoiseObjective", category="training",
      description="The DDPM training objective of Stable Diffusion models (SD 1.5, 2.x, SDXL): epsilon or "
                  "v-prediction, offset and perturbation noise, the timestep distribution, the loss and its "
                  "min-SNR / debiased weighting. Link it to TrainLoop's objective; unlinked, TrainLoop uses these "
                  "defaults for SD models.",
      inputs=_NOISE_INPUTS,
      outputs=[Output("objective", "OBJECTIVE")])
def noise_objective(ctx, **params):
    return _objective_choice(ctx, "noise", params)


@node(type="FlowObjective", category="training",
      description="The rectified-flow (flow-matching) objective of Flux: sigma drawn uniform, sigmoid or "
                  "logit-normal, shifted by a fixed value or by Flux's resolution-dependent schedule; target "
                  "noise - image; the guidance value dev's guidance embedder sees while training (1.0 as SimpleTuner "
                  "and OneTrainer train it and kohya's Flux guide recommends); MSE / Huber loss with optional SD3 "
                  "weighting. Link it to TrainLoop's objective; unlinked, TrainLoop uses these defaults for Flux "
                  "models. Where each default comes from: FlowSettings in app/ml/flux/flow.py.",
      inputs=[
          Enum("timesteps", list(FLOW_TIMESTEPS),
               tooltip="sigmoid: sigmoid(scale x normal) (kohya); logit_normal: sigmoid(mean + scale x normal) (SD3)"),
          Float("logit_mean", 0.0, min=-5.0, max=5.0, advanced=True, tooltip="logit_normal only"),
          Float("logit_scale", 1.0, min=0.01, max=10.0, tooltip="spread of the sigmoid / logit-normal draw"),
          Enum("shift", list(FLOW_SHIFTS),
               tooltip="resolution: Flux's dynamic shift from the image token count; fixed: shift_value"),
          Float("shift_value", 3.1582, min=0.01, max=100.0, tooltip="fixed shift s (kohya discrete_flow_shift)"),
          Enum("weighting", list(FLOW_WEIGHTINGS), tooltip="SD3-style loss weighting over sigma"),
          Float("guidance", 1.0, min=0.0, max=100.0, tooltip="the guidance value fed to Flux dev while training"),
          Enum("loss", list(LOSSES)),
          Float("huber_delta", 0.1, min=0.0, max=10.0, advanced=True),
      ],
      outputs=[Output("objective", "OBJECTIVE")])
def flow_objective(ctx, **params):
    return _objective_choice(ctx, "flow", params)


def _move_objective_to_its_node(params: dict, graph=None, node=None) -> dict:
    """TrainLoop 1 -> 2: the noise objective's params leave TrainLoop. If any differs from its default,
    a NoiseObjective node holding them is added and linked to TrainLoop's objective (the same training)."""
    moved = {k: params.pop(k) for k in NOISE_OBJECTIVE_PARAMS if k in params}
    changed = {k: v for k, v in moved.items() if v != NOISE_DEFAULTS[k]}
    if changed and graph is not None:
        nid = graph.new_node_id()
        graph.add_node("NoiseObjective", 1, changed, node_id=nid)
        graph.add_link(nid, "objective", node.id, "objective")
        pos = ((graph.ui.get("nodes") or {}).get(node.id) or {}).get("pos")
        if pos is not None:
            graph.ui["nodes"][nid] = {"pos": [pos[0], pos[1] + 520]}
    return params


_move_objective_to_its_node.graph_step = True  # app/graph/recipe.py: this step may add nodes and links


@node(type="TrainLoop", version=2, category="training", migrations={1: _move_objective_to_its_node},
      description="Trains the model's adapter (from LoRAInject) or, without one, the model itself (full "
                  "fine-tune), with periodic samples, saves and resumable backups. Stopping leaves a backup. "
                  "The objective comes from a NoiseObjective or FlowObjective node, or the model family's default.",
      inputs=[
          Socket("model", "MODEL", tooltip="a model with an adapter to train, or a base model to fine-tune"),
          Socket("buckets", "BUCKETS"),
          Socket("optimizer", "OPTIMIZER"),
          Socket("objective", "OBJECTIVE", optional=True,
                 tooltip="NoiseObjective (SD) or FlowObjective (Flux); unlinked: the model family's default"),
          Int("epochs", 10, min=1, max=100_000),
          Int("max_steps", 0, min=0, max=100_000_000, tooltip="train exactly this many steps; 0 = run the epochs"),
          Int("grad_accumulation", 1, min=1, max=1024, tooltip="effective batch = batch size x this"),
          Float("clip_grad_norm", 1.0, min=0.0, max=1000.0, tooltip="0 = no clipping"),
          Int("seed", 42, min=0, max=2**31 - 1, tooltip="drives data order, augmentation, noise and timesteps"),
          Enum("train_dtype", ["bf16", "fp16", "fp32"], tooltip="autocast precision (bf16 on RTX 30xx and newer)"),
          Bool("gradient_checkpointing", True, tooltip="saves memory at some speed cost"),
          Int("blocks_to_swap", 0, min=0, max=1000, advanced=True,
              tooltip="memory: denoiser blocks kept in RAM and streamed to the GPU as forward and backward reach "
                      "them (kohya's blocks_to_swap; Flux has 19 + 38, an SD UNet 4 + 4, SDXL 3 + 3); adapters only, "
                      "slower per step; 0 = off"),
          Bool("offload_activations", False, advanced=True,
               tooltip="memory: the activations backward needs wait in RAM instead of on the GPU; with "
                       "gradient_checkpointing only each block's input travels (without it, every activation: slow)"),
          Bool("fused_backward", False, advanced=True,
               tooltip="memory, full fine-tunes: the optimizer steps each weight inside backward and frees its "
                       "gradient at once, so all gradients never exist together (kohya's fused_backward_pass); "
                       "AdamW or Adafactor, grad_accumulation 1, clip_grad_norm clips each weight's gradient alone"),
          Bool("train_unet", True, tooltip="full fine-tune (no adapter): train the UNet"),
          Bool("train_text_encoder", False, tooltip="full fine-tune (no adapter): train the text encoder(s)"),
          Enum("max_tokens", ["75", "150", "225"],
               tooltip="caption tokens read: longer ones are encoded in 75-token pieces, as A1111 and ComfyUI "
                       "do with long prompts (kohya's max_token_length)"),
          Bool("masked_training", False, tooltip="weight the loss by <stem>-masklabel.png masks"),
          Float("unmasked_probability", 0.1, min=0.0, max=1.0, tooltip="fraction of steps that ignore the mask"),
          Float("unmasked_weight", 0.1, min=0.0, max=1.0, tooltip="loss weight of the black (masked-out) area"),
          Bool("normalize_masked_area", False),
          Bool("ema", False),
          Float("ema_decay", 0.999, min=0.0, max=1.0),
          Int("ema_every", 1, min=1, max=10_000, advanced=True, tooltip="update the EMA every N steps"),
          Bool("ema_on_cpu", True, advanced=True),
          String("sample_prompts", "", multiline=True, tooltip="one prompt per line, sampled periodically"),
          Int("sample_steps", 20, min=1, max=200),
          Float("sample_cfg", 7.0, min=0.0, max=50.0),
          Enum("sample_sampler", SAMPLERS, "dpmpp_2m"),
          Int("sample_seed", 42, min=0, max=2**31 - 1),
          Int("sample_every", 0, min=0, max=1_000_000, tooltip="0 = only before and after training"),
          Enum("sample_unit", UNITS),
          Int("save_every", 0, min=0, max=1_000_000, tooltip="0 = only at the end (the Save node)"),
          Enum("save_unit", UNITS),
          Int("backup_every", 0, min=0, max=1_000_000, tooltip="resumable backups; 0 = only when stopped"),
          Enum("backup_unit", UNITS),
          Int("backups_kept", 3, min=1, max=1000),
          Int("validate_every", 0, min=0, max=1_000_000, tooltip="validation loss on validation concepts; 0 = at the end"),
          Enum("validate_unit", UNITS),
          Path("resume_from", "", kind="folder", optional=True, tooltip="a backup folder to continue from exactly"),
      ],
      outputs=[Output("model", "MODEL", "the trained model"), Output("run", "TRAINED", "losses, backups, outputs")])
def train_loop(ctx, model, buckets, optimizer, objective=None, **p):
    from app.engine.errors import NodeError
    from app.ml import dist
    from app.ml.handle import ModelHandle, as_handle
    from app.ml.train.data_source import BucketSource
    from app.ml.train.loop import Hooks, Trainer, TrainingError, verify_backup
    from app.ml.train.optim import OptimizerError
    from app.ml.save.metadata import run_facts, training_metadata
    from app.ml.train.trainables import AdapterTrainable, FullFinetune, is_embedding, trained_indices

    t_started = time.time()
    if p["resume_from"]:
        try:  # a wrong path is said now, not after the set-up and the "before" samples
            verify_backup(p["resume_from"])
        except TrainingError as e:
            raise NodeError(str(e)) from None
    handle = as_handle(model)
    bundle = handle.base
    rank, world = dist.rank_world()
    # in a one-shot run nothing reads the untrained weights again: train them in place, no copy
    picked = trained_indices(handle) if handle.adapters else []
    if handle.adapters and not picked:
        raise NodeError("the model carries only frozen embeddings or adapters (LoadEmbedding, ApplyLoRA) and nothing "
                        "to train: add a LoRAInject or an Embedding node before this TrainLoop")
    if picked:
        in_place = all(ctx.exclusive(handle.adapters[i]) for i in picked)
        trainable = AdapterTrainable(handle, in_place=in_place)
        if trainable.embeddings:
            from nodes.embedding import log_trained

            log_trained(ctx, trainable, optimizer)
    else:
        trained = ([bundle.unet] if p["train_unet"] else []) + (list(bundle.text_encoders) if p["train_text_encoder"] else [])
        in_place = bool(trained) and all(ctx.exclusive(m) for m in trained)
        trainable = FullFinetune(bundle, p["train_unet"], p["train_text_encoder"], in_place=in_place)
        ctx.log("no adapter on the model: full fine-tune of "
                + " and ".join(n for n, on in (("the UNet", p["train_unet"]), ("the text encoder(s)", p["train_text_encoder"])) if on))
    if in_place:
        ctx.log("training the incoming weights in place: no later node reads the untrained ones")
    # cached text embeddings are only valid while the text encoders do not train, and hold 75 tokens
    chunks = int(p["max_tokens"]) // 75
    embeddings = [a for a in handle.adapters if is_embedding(a)]
    if buckets.cache is not None and buckets.cache.text_identity and (trainable.trains_text_encoder() or chunks > 1
                                                                       or embeddings):
        import dataclasses

        if embeddings:
            ctx.log("captions are encoded on the fly: the Cache node's text embeddings were made without the "
                    "model's embeddings")
        elif chunks > 1 and not trainable.trains_text_encoder():
            ctx.log(f"captions are encoded on the fly: the Cache node's text embeddings hold 75 tokens, not {p['max_tokens']}")
        buckets = dataclasses.replace(buckets, cache=dataclasses.replace(buckets.cache, text_identity=None))
    # the epoch-1 leftovers are the Bucketer's to report; say them here only when this plan differs
    report = rank == 0 and not _bucketer_reported(ctx, p["seed"], world)
    from nodes.embedding import caption_expander, report_captions

    expand = caption_expander(embeddings)
    source = BucketSource(buckets, p["seed"], bundle=bundle, world=world, masks=p["masked_training"],
                          log=ctx.log if report else None, captions=expand)
    validation = None
    if buckets.dataset.validation_concepts:
        validation = BucketSource(buckets, p["seed"], bundle=bundle, validation=True, captions=expand)
    if expand is not None and rank == 0:
        report_captions(ctx, source, embeddings)
    if rank == 0:
        _warn_long_captions(ctx, bundle, source, chunks)
    _check_bucket_sizes(ctx, bundle, source)
    settings = _train_settings(p, bundle, optimizer, source, objective, ctx)
    workdir = ctx.node_dir()
    resolution = _trained_resolution(buckets, source)
    kohya = run_facts(buckets, source.plan(0), optimizer, p, started_at=t_started,
                      steps_per_epoch=-(-source.iterations(0) // p["grad_accumulation"]))
    writer = _tensorboard(workdir, ctx) if rank == 0 else None
    ctx.check_cancel()  # set-up (data plan, caption check, TensorBoard) can take seconds
    prompts = [line.strip() for line in p["sample_prompts"].splitlines() if line.strip()]
    if embeddings:
        from nodes.embedding import expand_prompts

        prompts = expand_prompts(prompts, embeddings)

    def metric(**values):
        if rank != 0:
            return
        ctx.metric(**values)
        if writer is not None and "loss" in values:
            step = values["step"]
            writer.add_scalar("loss/train", values["loss"], step)
            writer.add_scalar("loss/smoothed", values["smooth_loss"], step)
            for name, lr in values.get("lrs", {}).items():
                writer.add_scalar(f"lr/{name}", lr, step)
        if writer is not None and "validation_loss" in values:
            writer.add_scalar("loss/validation", values["validation_loss"], values.get("step", 0))

    def sample(step, epoch, inside=True):
        # inside the loop the adapters are already attached; before and after, attach them here
        adapters = None if inside else trainable.adapter_pairs()
        _sample_during_training(ctx, trainable.model, adapters, prompts, p, buckets, step, writer)

    def save(step, epoch):
        from app.ml.save import save_adapter

        if handle.adapters and trainable.adapter is not None:
            # ss_output_name is A1111's alias: the workspace and node keep saves of two runs apart.
            alias = f"{workdir.parent.name}_{workdir.name}_step_{step:07d}"
            bundled = {"embeddings": trainable.embeddings} if trainable.embeddings else {}
            path = save_adapter(trainable.adapter, workdir / "saves" / f"step_{step:07d}.safetensors",
                                recipe=ctx.recipe, step=step, epoch=epoch, overwrite=True,
                                extra_metadata={**training_metadata({"resolution": resolution, "kohya": kohya}),
                                                "ss_output_name": alias}, **bundled)
            ctx.log(f"saved {path}")
        if handle.adapters and trainable.embeddings:
            from nodes.embedding import save_embeddings

            # one folder per step: A1111 and ComfyUI call an embedding by its file name
            for path in save_embeddings(trainable.embeddings, workdir / "saves" / f"step_{step:07d}", ctx.recipe,
                                        overwrite=True):
                ctx.log(f"saved {path}")

    hooks = Hooks(progress=lambda s, t: ctx.progress(s, t), metric=metric, log=ctx.log if rank == 0 else (lambda m: None),
                  check_cancel=ctx.check_cancel, sample=sample if prompts else None, save=save, validation=validation)
    trainer = Trainer(bundle, trainable, source, dict(optimizer), settings, workdir, hooks, device=dist.device())
    if prompts and rank == 0:
        sample(0, 0, inside=False)  # "before", to compare with
    try:
        try:
            result = trainer.run(resume_from=p["resume_from"] or None)
        except (TrainingError, OptimizerError) as e:
            raise NodeError(str(e)) from None
        except Cancelled:
            if rank == 0:
                _announce_backup(ctx, workdir, t_started)
            raise
        finally:
            source.close()
            if validation is not None:
                validation.close()
        if prompts and rank == 0:
            try:
                sample(result.steps, result.epochs_done, inside=False)
            except Cancelled:
                # stopped during the "after" samples: the training itself is finished, keep it
                if picked:
                    save(result.steps, result.epochs_done)
                else:
                    ctx.warn("stopped during the final samples: the fine-tuned weights were not saved "
                             "(a Save node after TrainLoop writes them when the run is not stopped)")
                raise
    finally:
        if writer is not None:  # after the "after" samples: they are logged too
            writer.close()
    info = {"step": result.steps, "epoch": result.epochs_done, "resolution": resolution, "kohya": kohya}
    if picked:
        trained = trainable.trained_handle()
        trained = ModelHandle(trained.base, trained.adapters, trained.strengths, {**handle.info, **info})
    else:
        trained = ModelHandle(trainable.model, (), (), {**handle.info, **info})
    ctx.log(f"trained {result.steps} steps in {result.elapsed_s:.1f} s; final loss "
            f"{result.losses[-1]:.4f}" if result.losses else "no steps were trained")
    if rank == 0 and ctx.recipe:  # the run's measured peak next to the memory plan's prediction
        from app.ml.memory.recipe_plan import measured_vs_predicted

        ctx.log(measured_vs_predicted(ctx.recipe, ctx.recipe_dir, ctx.node_id, result.peak_bytes,
                                      getattr(result, "peak_kind", "")))
    run = {"steps": result.steps, "epochs": result.epochs_done, "losses": result.losses,
           "validation": result.validation, "backups": result.backups, "workdir": str(workdir),
           "elapsed_s": result.elapsed_s, "peak_bytes": result.peak_bytes}
    return trained, run


def _trained_resolution(buckets, source) -> tuple[int, int] | None:
    """(width, height) this run trains at, for the saved files' metadata: the Bucketer's fixed size or
    target resolution (the largest of several), else the largest bucket of the first epoch."""
    from app.ml.data.resolution import parse_resolution

    if buckets.settings.resolution:
        try:
            res = parse_resolution(buckets.settings.resolution)
        except ValueError:
            res = None
        if res is not None:
            return res.fixed or (res.max_target, res.max_target)
    sizes = [it.bucket for it in source.plan(0).items]
    return max(sizes, key=lambda wh: (wh[0] * wh[1], wh)) if sizes else None


def _bucketer_reported(ctx, seed: int, world: int) -> bool:
    """Whether the Bucketer that feeds this node (directly or through a Cache) has already reported the
    leftovers of the very epoch-1 plan this node trains: it plans with this TrainLoop's seed, so in a
    one-process run its list is this one and a second copy would only repeat it in the log."""
    if world != 1:
        return False  # data-parallel runs plan a global batch of batch_size x processes
    recipe = ctx.recipe or {}
    nodes, links = recipe.get("nodes") or {}, recipe.get("links") or []
    nid, seen = ctx.node_id, set()
    while nid not in seen:
        seen.add(nid)
        src = next((l.get("from_node") for l in links if l.get("to_node") == nid and l.get("to_input") == "buckets"), None)
        if src is None:
            return False
        if (nodes.get(src) or {}).get("type") == "Bucketer":
            from types import SimpleNamespace

            from nodes.dataset import _train_seed

            bucketer = SimpleNamespace(node_id=src, recipe=recipe, warn=lambda message: None)
            return _train_seed(bucketer, -1)[0] == seed
        nid = src
    return False


def _announce_backup(ctx, workdir, since: float) -> None:
    """After a stop, tell the front end which backup this run left, so that the command line can print
    the exact command that continues from it (a ``resumable`` event: param and path)."""
    import json

    newest = None
    for meta in (workdir / "backups").glob("*/backup.json"):
        try:
            info = json.loads(meta.read_text())
            t, step = float(info.get("time", 0)), int(info.get("step", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if t >= since and step > 0 and (newest is None or t > newest[0]):  # step 0: nothing to resume
            newest = (t, meta.parent)
    if newest is not None:
        ctx.emit("resumable", param="resume_from", path=str(newest[1]))


def _warn_long_captions(ctx, bundle, source, chunks: int) -> None:
    """Captions past the text encoder's token limit are cut there; say which, once, before training."""
    items = source.plan(0).items
    captions = sorted({it.caption for it in items})
    if not captions:
        return
    limit = bundle.token_limit() * chunks
    counts = dict(zip(captions, bundle.token_counts(captions)))
    long = [it for it in items if counts[it.caption] > limit]
    if long:
        names = sorted({it.path.name for it in long})
        worst = max(long, key=lambda it: counts[it.caption])
        ctx.warn(f"{len(names)} image(s) have captions longer than the {limit} tokens read (max_tokens); the rest is "
                 f"cut off in training (longest: {worst.path.name}, {counts[worst.caption]} tokens). Shorten them, "
                 f"raise max_tokens, or put the important words first: {', '.join(names[:10])}{' ...' if len(names) > 10 else ''}")


def _check_bucket_sizes(ctx, bundle, source) -> None:
    """Flux packs 2x2 latent patches: every bucket side must be a multiple of 16 px (8 for SD)."""
    from app.engine.errors import NodeError

    q = bundle.family.pixel_multiple
    bad = sorted({it.bucket for it in source.plan(0).items if it.bucket[0] % q or it.bucket[1] % q})
    if bad:
        shown = ", ".join(f"{w}x{h}" for w, h in bad[:5])
        raise NodeError(f"{bundle.family.display_name} needs image sides that are multiples of {q} px, but the "
                        f"Bucketer gives {shown}: set the Bucketer's quantization to {q} or 64 and a resolution that "
                        f"is a multiple of {q}")


def _objective_settings(p: dict, bundle, objective: dict | None, ctx):
    """(ObjectiveSettings, FlowSettings) from the linked objective node, else the family's default."""
    from app.engine.errors import NodeError
    from app.ml.flux.flow import FlowSettings, FlowSettingsError
    from app.ml.train.objective import ObjectiveSettings

    family = bundle.family
    kind = objective["kind"] if objective else family.objective
    if kind != family.objective:
        wants = {"noise": "DDPM noise (NoiseObjective)", "flow": "flow matching (FlowObjective)"}
        raise NodeError(f"{objective['node']} is a {wants[kind]} objective, but the model reaching "
                        f"{ctx.title or ctx.node_type} (node {ctx.node_id}) is {family.display_name}, which is trained "
                        f"with {wants[family.objective]}: link a "
                        f"{'FlowObjective' if family.objective == 'flow' else 'NoiseObjective'} instead, or unlink it "
                        "to use the model's default")
    o = dict(objective["params"]) if objective else {}
    masks = dict(unmasked_probability=p["unmasked_probability"] if p["masked_training"] else 1.0,
                 unmasked_weight=p["unmasked_weight"], normalize_masked_area=p["normalize_masked_area"])
    if kind == "flow":
        try:
            flow = FlowSettings(timesteps=o.get("timesteps", "sigmoid"), logit_mean=o.get("logit_mean", 0.0),
                                logit_scale=o.get("logit_scale", 1.0), shift=o.get("shift", "resolution"),
                                shift_value=o.get("shift_value", 3.1582), weighting=o.get("weighting", "none"),
                                guidance=o.get("guidance", 1.0)).check(objective["node"] if objective else "TrainLoop")
        except FlowSettingsError as e:
            raise NodeError(str(e)) from None
        return ObjectiveSettings(prediction="flow", loss=o.get("loss", "mse"), huber_delta=o.get("huber_delta", 0.1),
                                 **masks), flow, False
    o = {**NOISE_DEFAULTS, **o}
    prediction = bundle.prediction_type if o["prediction"] == "auto" else o["prediction"]
    settings = ObjectiveSettings(
        prediction=prediction, offset_noise=o["offset_noise"], perturbation_noise=o["perturbation_noise"],
        timesteps=o["timesteps"], timestep_bias=o["timestep_bias"], timestep_scale=o["timestep_scale"],
        min_noising=o["min_noising"], max_noising=o["max_noising"], loss=o["loss"], huber_delta=o["huber_delta"],
        weighting=o["weighting"], min_snr_gamma=o["min_snr_gamma"], **masks)
    return settings, FlowSettings(), o["zero_terminal_snr"]


def _train_settings(p: dict, bundle, optimizer: dict, source, objective_choice=None, ctx=None):
    from app.ml.train.loop import TrainSettings

    objective, flow, zero_terminal_snr = _objective_settings(p, bundle, objective_choice, ctx)
    stop_te = optimizer.get("stop_text_encoder_after", 0)
    if stop_te and optimizer.get("stop_text_encoder_unit") == "epochs":
        stop_te = sum(-(-source.iterations(e) // p["grad_accumulation"]) for e in range(stop_te))
    stop_emb = optimizer.get("stop_embedding_after", 0)
    if stop_emb and optimizer.get("stop_embedding_unit", "epochs") == "epochs":
        stop_emb = sum(-(-source.iterations(e) // p["grad_accumulation"]) for e in range(stop_emb))
    return TrainSettings(
        epochs=p["epochs"], max_steps=p["max_steps"], grad_accumulation=p["grad_accumulation"],
        clip_grad_norm=p["clip_grad_norm"], seed=p["seed"], train_dtype=p["train_dtype"],
        gradient_checkpointing=p["gradient_checkpointing"], zero_terminal_snr=zero_terminal_snr,
        blocks_to_swap=p.get("blocks_to_swap", 0), offload_activations=p.get("offload_activations", False),
        fused_backward=p.get("fused_backward", False),
        objective=objective, flow=flow, ema=p["ema"], ema_decay=p["ema_decay"], ema_every=p["ema_every"],
        ema_on_cpu=p["ema_on_cpu"], sample_every=p["sample_every"], sample_unit=p["sample_unit"],
        save_every=p["save_every"], save_unit=p["save_unit"], backup_every=p["backup_every"],
        backup_unit=p["backup_unit"], validate_every=p["validate_every"], validate_unit=p["validate_unit"],
        backups_kept=p["backups_kept"], stop_text_encoder_after=stop_te, prompt_chunks=int(p["max_tokens"]) // 75,
        stop_embedding_after=stop_emb)


def _tensorboard(workdir, ctx):
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        ctx.warn("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
        return None
    from app.ml.train.tensorboard import GuardedWriter

    return GuardedWriter(workdir / "tensorboard", ctx.warn)  # a full disk: one warning, training goes on


def _sample_during_training(ctx, bundle, adapters, prompts, p, buckets, step, writer) -> None:
    """Samples with the adapter as it is now; written under the node's folder and previewed."""
    import numpy as np

    from app.ml.data.bucketing import parse_resolution
    from app.ml.preview import images_payload
    from app.ml.sampling import sample_images, save_samples

    size = parse_resolution(buckets.settings.resolution).max_target if buckets.settings.resolution else None
    q = bundle.family.pixel_multiple  # 8 px for SD, 16 for Flux (8x VAE, then 2x2 packing)
    size = max(q, (size or bundle.family.default_resolution) // q * q)
    result = sample_images(bundle, prompts, width=size, height=size, steps=p["sample_steps"], cfg=p["sample_cfg"],
                           seed=p["sample_seed"], sampler=p["sample_sampler"], adapters=adapters,
                           check_cancel=ctx.check_cancel)
    folder = ctx.node_dir("samples")
    save_samples(result, folder, prefix=f"step_{step:07d}", recipe=ctx.recipe, overwrite=True)
    captions = [f"step {step}: {q['prompt']}" for q in result.params]
    ctx.preview("images", step=step, **images_payload(result.images, captions))
    if writer is not None:
        for i, img in enumerate(result.images):
            writer.add_image(f"samples/{i}", np.asarray(img).transpose(2, 0, 1), step)
