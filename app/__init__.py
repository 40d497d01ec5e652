"""NodeTrainer: a node-graph editor and engine for training diffusion models."""

__version__ = "0.1.0"
