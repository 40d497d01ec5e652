"""GUI test fixtures. Headless tests create Dear PyGui items and call the editor's callbacks in a
context with no viewport (opening a viewport without a display aborts the process, so none of
these tests ever does); the Xvfb tests run the editor in a subprocess."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUI_TESTS = Path(__file__).resolve().parent
PREVIEW_NODES = GUI_TESTS / "preview_nodes"
RECIPES = GUI_TESTS / "recipes"


@pytest.fixture(autouse=True)
def _config_dir(tmp_path, monkeypatch):
    """Recent files and autosaves go to a temporary folder, never the user's."""
    monkeypatch.setenv("NODETRAINER_CONFIG", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def gui_registry():
    from app.graph.registry import Registry
    from tests.conftest import STUBS

    reg = Registry()
    reg.load_builtin()
    reg.load_plugins([STUBS, PREVIEW_NODES])
    assert not reg.problems, reg.problems
    return reg


class FakeRunner:
    """Stands in for the worker: records runs and hands back scripted events."""

    starting = False

    def __init__(self):
        self.events = []
        self.started = []
        self.cancelled = 0

    def start(self, recipe, **kw):
        self.started.append((recipe, kw))

    def poll(self):
        out, self.events = self.events, []
        return out

    def cancel(self):
        self.cancelled += 1

    def clear_cache(self):
        pass

    def shutdown(self):
        pass


@pytest.fixture
def editor(gui_registry):
    import dearpygui.dearpygui as dpg

    from app.gui.editor import Editor

    dpg.create_context()
    ed = Editor(gui_registry, runner=FakeRunner(), autosave=False)
    try:
        yield ed
    finally:
        dpg.destroy_context()


def png_bytes(colour=(255, 0, 0), size=16) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


sys.path.insert(0, str(ROOT))


# One Xvfb display per test module, for the tests that run the editor in a real window.
@pytest.fixture(scope="module")
def display():
    num = next(n for n in range(90 + os.getpid() % 50, 400) if not Path(f"/tmp/.X11-unix/X{n}").exists()
               and not Path(f"/tmp/.X{n}-lock").exists())
    proc = subprocess.Popen(["Xvfb", f":{num}", "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not Path(f"/tmp/.X11-unix/X{num}").exists():
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            pytest.skip("Xvfb did not start")
        time.sleep(0.05)
    disp = f":{num}"
    if shutil.which("xdotool"):  # keep the pointer off the canvas: no hover highlights in pictures
        subprocess.run(["xdotool", "mousemove", "1595", "995"], env={**os.environ, "DISPLAY": disp}, check=False)
    yield disp
    proc.terminate()
    proc.wait(timeout=10)
