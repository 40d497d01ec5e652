"""Training: optimizers and schedules, the diffusion objective, and the training loop."""
