"""Data-parallel runs under `accelerate launch`: one process per device, each running the whole
recipe; only the main process writes files and reports. Single-process runs see rank 0 of 1."""

from __future__ import annotations

import os


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Start the process group accelerate prepared (gloo on CPU, NCCL on GPUs)."""
    if launched_distributed():
        from accelerate import PartialState

        PartialState()


def rank_world() -> tuple[int, int]:
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
    except ImportError:
        pass
    return 0, 1


def is_main() -> bool:
    return rank_world()[0] == 0


def device():
    import torch

    if launched_distributed():
        from accelerate import PartialState

        return PartialState().device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
