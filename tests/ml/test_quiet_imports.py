"""Importing the training library and its dependencies prints nothing a user cannot act on."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_library_with_peft_and_bitsandbytes_prints_no_warnings():
    # peft imports bitsandbytes when it is installed; on some CPUs bitsandbytes then logs a warning
    # about an optional hub kernel on every start
    out = subprocess.run([sys.executable, "-c", "import app.ml.adapters, peft, bitsandbytes"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert out.returncode == 0, out.stderr
    assert "kernels-community" not in out.stderr and "Failed to load" not in out.stderr, out.stderr
