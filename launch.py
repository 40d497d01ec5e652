#!/usr/bin/env python3
"""NodeTrainer entry point: the editor by default; `run`, `validate`, `nodes` subcommands.

    python launch.py --help
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # its torchvision notices are not ours to show

from app.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
