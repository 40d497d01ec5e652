"""The training library: models, data, losses, samplers. Knows nothing of nodes or the GUI."""
