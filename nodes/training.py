"""Training nodes: the optimizer recipe and the training loop."""

from app.ml.train.names import LOSSES, OPTIMIZERS, SCHEDULES, TIMESTEP_DISTRIBUTIONS, WEIGHTINGS
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
      ],
      outputs=[Output("optimizer", "OPTIMIZER")])
def optimizer(ctx, **params):
    """The settings themselves flow on: the torch optimizer is built by TrainLoop once it knows
    which parameters train."""
    if params["optimizer"] in ("prodigy", "dadapt_adam") and params["lr"] < 0.1:
        ctx.warn(f"{params['optimizer']} adapts its step size; it expects lr around 1.0, not {params['lr']}")
    return dict(params)


SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc"]


@node(type="TrainLoop", category="training",
      description="Trains the model's adapter (from LoRAInject) or, without one, the model itself (full "
                  "fine-tune), with periodic samples, saves and resumable backups. Stopping leaves a backup.",
      inputs=[
          Socket("model", "MODEL", tooltip="a model with an adapter to train, or a base model to fine-tune"),
          Socket("buckets", "BUCKETS"),
          Socket("optimizer", "OPTIMIZER"),
          Int("epochs", 10, min=1, max=100_000),
          Int("max_steps", 0, min=0, max=100_000_000, tooltip="train exactly this many steps; 0 = run the epochs"),
          Int("grad_accumulation", 1, min=1, max=1024, tooltip="effective batch = batch size x this"),
          Float("clip_grad_norm", 1.0, min=0.0, max=1000.0, tooltip="0 = no clipping"),
          Int("seed", 42, min=0, max=2**31 - 1, tooltip="drives data order, augmentation, noise and timesteps"),
          Enum("train_dtype", ["bf16", "fp16", "fp32"], tooltip="autocast precision (bf16 on RTX 30xx and newer)"),
          Bool("gradient_checkpointing", True, tooltip="saves memory at some speed cost"),
          Bool("train_unet", True, tooltip="full fine-tune (no adapter): train the UNet"),
          Bool("train_text_encoder", False, tooltip="full fine-tune (no adapter): train the text encoder(s)"),
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
          Int("save_every", 0, min=0, max=1_000_000, tooltip="0 = only at the end"),
          Int("backup_every", 0, min=0, max=1_000_000, tooltip="0 = only when stopped"),
          Enum("every_unit", ["epochs", "steps", "minutes"], tooltip="unit of the periods above"),
          Int("backups_kept", 3, min=1, max=1000),
          Int("validate_every", 0, min=0, max=1_000_000, tooltip="validation loss on validation concepts; 0 = at the end"),
          Path("resume_from", "", kind="folder", optional=True, tooltip="a backup folder to continue from exactly"),
      ],
      outputs=[Output("model", "MODEL", "the trained model"), Output("run", "TRAINED", "losses, backups, outputs")])
def train_loop(ctx, **params):
    raise NotImplementedError(f"TrainLoop {PENDING}")
