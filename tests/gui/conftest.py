"""GUI test fixtures. Headless tests create Dear PyGui items and call the editor's callbacks in a
context with no viewport (opening a viewport without a display aborts the process, so none of
these tests ever does); the Xvfb tests run the editor in a subprocess."""

import sys
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
