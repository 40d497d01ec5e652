"""The training library: models, data, losses, samplers. Knows nothing of nodes or the GUI."""

import logging

# bitsandbytes (imported by peft whenever it is installed) warns on every start on CPUs with
# AVX512-BF16 that an optional hub kernel package is missing; its own CPU kernels are used then,
# and a user can do nothing about it, so the line is noise in every run's log.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
