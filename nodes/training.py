"""Training nodes: the optimizer recipe and the training loop."""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PENDING = "is declared but not implemented yet: it arrives with the training issue"


@node(type="Optimizer", category="training",
      description="An optimizer and learning-rate schedule, with separate rates for the UNet and text encoders.",
      inputs=[
          Enum("optimizer", ["adamw", "adamw8bit", "adafactor", "prodigy", "lion", "lion8bit", "sgd_nesterov",
                             "dadapt_adam", "schedulefree_adamw"]),
          Float("lr", 1e-4, min=0.0, max=10.0, tooltip="UNet learning rate (1.0 for adaptive optimizers)"),
          Float("text_encoder_lr", 5e-5, min=0.0, max=10.0, tooltip="text encoder learning rate (UNet / 2-3)"),
          Float("weight_decay", 0.01, min=0.0, max=10.0),
          Float("beta1", 0.9, min=0.0, max=1.0),
          Float("beta2", 0.999, min=0.0, max=1.0),
          Float("eps", 1e-8, min=0.0, max=1.0),
          Float("d_coef", 1.0, min=0.0, max=100.0, advanced=True, tooltip="Prodigy / DAdaptation step-size coefficient"),
          Enum("schedule", ["constant", "linear", "cosine", "cosine_restarts", "polynomial"]),
          Float("warmup", 0.0, min=0.0, max=1_000_000.0, tooltip="below 1: a fraction of the steps; else a step count"),
          Float("min_factor", 0.0, min=0.0, max=1.0, tooltip="the schedule never goes below lr x this"),
          Int("cycles", 1, min=1, max=1000, tooltip="restarts for cosine_restarts"),
          Float("power", 1.0, min=0.0, max=10.0, tooltip="power for polynomial"),
          Int("stop_text_encoder_after", 0, min=0, max=10_000_000, tooltip="steps after which the text encoder "
                                                                             "stops training; 0 = never"),
      ],
      outputs=[Output("optimizer", "OPTIMIZER")])
def optimizer(ctx, **params):
    raise NotImplementedError(f"Optimizer {PENDING}")


@node(type="TrainLoop", category="training",
      description="Trains the model's adapter (or the model itself) on the buckets, with periodic samples, "
                  "saves and resumable backups.",
      inputs=[
          Socket("model", "MODEL"),
          Socket("buckets", "BUCKETS"),
          Socket("optimizer", "OPTIMIZER"),
          Int("epochs", 10, min=1, max=100_000),
          Int("max_steps", 0, min=0, max=100_000_000, tooltip="stop after this many steps; 0 = run all epochs"),
          Int("grad_accumulation", 1, min=1, max=1024),
          Float("clip_grad_norm", 1.0, min=0.0, max=1000.0, tooltip="0 = no clipping"),
          Int("seed", 42, min=0, max=2**31 - 1),
          Enum("train_dtype", ["bf16", "fp16", "fp32"]),
          Bool("gradient_checkpointing", True),
          Enum("prediction", ["auto", "epsilon", "v_prediction"], tooltip="auto: from the model family"),
          Float("offset_noise", 0.0, min=0.0, max=1.0),
          Enum("timesteps", ["uniform", "logit_normal", "sigmoid"]),
          Enum("loss", ["mse", "mae", "huber"]),
          Enum("weighting", ["constant", "min_snr", "debiased"]),
          Float("min_snr_gamma", 5.0, min=0.0, max=100.0),
          Bool("ema", False),
          Float("ema_decay", 0.999, min=0.0, max=1.0),
          String("sample_prompts", "", multiline=True, tooltip="one prompt per line, sampled periodically"),
          Int("sample_every", 0, min=0, max=1_000_000, tooltip="0 = only at the end"),
          Int("save_every", 0, min=0, max=1_000_000, tooltip="0 = only at the end"),
          Int("backup_every", 0, min=0, max=1_000_000, tooltip="0 = only when stopped"),
          Enum("every_unit", ["epochs", "steps", "minutes"], tooltip="unit of the three periods above"),
          Int("backups_kept", 3, min=1, max=1000),
          Path("resume_from", "", kind="folder", optional=True, tooltip="a backup folder to continue from exactly"),
      ],
      outputs=[Output("model", "MODEL"), Output("run", "TRAINED")])
def train_loop(ctx, **params):
    raise NotImplementedError(f"TrainLoop {PENDING}")
