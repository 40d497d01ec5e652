"""Regenerates the README's editor screenshots under Xvfb (not a test):

    python tests/gui/make_screenshots.py [RECIPE]   # writes docs/editor-preset.png and docs/editor-run.png

RECIPE defaults to presets/tiny_demo.json. The editor runs from the recipe's grandparent folder
with a relative path, so the pictures show `presets/tiny_demo.json` and `demo_data/shapes`, never
the folder this machine keeps them in.
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
        recipe = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "presets" / "tiny_demo.json").resolve()
        cwd = recipe.parent.parent
        shown = str(recipe.relative_to(cwd))
        docs = ROOT / "docs"
        subprocess.run([*launch, "gui", shown, "--screenshot", str(docs / "editor-preset.png")],
                       env=env, cwd=cwd, check=True)
        # the tiny demo after a run, with the TrainLoop node's plots and samples in the inspector
        subprocess.run([*launch, "gui", shown, "--screenshot", str(docs / "editor-run.png")],
                       env={**env, "NODETRAINER_GUI_AUTORUN": "1", "NODETRAINER_GUI_FOCUS": "7",
                            "NODETRAINER_GUI_TIMEOUT": "600"}, cwd=cwd, check=True)
    finally:
        xvfb.terminate()
    print("wrote docs/editor-preset.png and docs/editor-run.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
