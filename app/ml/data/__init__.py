"""Training-data pipeline: scan concepts, bucket, plan epochs, load, augment and cache.

Pure numpy/pillow/safetensors so the GUI process can import it without torch.
Every random choice is a pure function of (seed, epoch or variation, sample, purpose),
which makes augmentation reproducible across processes and resume exact.
"""
