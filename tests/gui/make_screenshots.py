"""Regenerates the README's editor screenshots under Xvfb (not a test):

    python tests/gui/make_screenshots.py      # writes docs/editor-preset.png and docs/editor-run.png
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISPLAY = ":77"


def main() -> int:
    if shutil.which("Xvfb") is None:
        print("Xvfb is not installed (apt-get install xvfb xdotool)", file=sys.stderr)
        return 1
    xvfb = subprocess.Popen(["Xvfb", DISPLAY, "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1)
        tmp = Path(tempfile.mkdtemp())
        env = dict(os.environ, DISPLAY=DISPLAY, NODETRAINER_CONFIG=str(tmp / "config"),
                   NODETRAINER_WORKSPACE=str(tmp / "workspace"))
        if shutil.which("xdotool"):
            subprocess.run(["xdotool", "mousemove", "1595", "995"], env=env, check=False)
        (ROOT / "docs").mkdir(exist_ok=True)
        launch = [sys.executable, str(ROOT / "launch.py")]
        subprocess.run([*launch, "gui", "presets/tiny_demo.json", "--screenshot", "docs/editor-preset.png"],
                       env=env, cwd=ROOT, check=True)
        # the tiny demo after a run, with the TrainLoop node's plots and samples in the inspector
        subprocess.run([*launch, "gui", "presets/tiny_demo.json", "--screenshot", "docs/editor-run.png"],
                       env={**env, "NODETRAINER_GUI_AUTORUN": "1", "NODETRAINER_GUI_FOCUS": "7",
                            "NODETRAINER_GUI_TIMEOUT": "600"}, cwd=ROOT, check=True)
    finally:
        xvfb.terminate()
    print("wrote docs/editor-preset.png and docs/editor-run.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
