"""NODETRAINER_GUI_SCRIPT: menu actions played inside the render loop, for tests that must go
through the same code as a click on a menu item (and in the same place: between frames).

Steps are separated by ';'. A step is a menu path such as `File/New`, `Presets/tiny_demo`,
`View/Fit all`, or `File/Open...=PATH`: the menu item, then the file dialog it opened answered
with PATH as its OK button would. Each step runs the menu item's own callback, a few frames after
the one before, and what the canvas holds a few frames later is recorded for the state dump.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import dearpygui.dearpygui as dpg

SETTLE_FRAMES = 4  # frames between a step and its record (the fit on open takes two)


class ScriptError(RuntimeError):
    pass


def call_item(item: int, app_data=None) -> None:
    """Run an item's callback as Dear PyGui would: (sender, app_data, user_data), as many as it takes."""
    cb = dpg.get_item_callback(item)
    if cb is None:
        raise ScriptError(f"menu item {dpg.get_item_label(item)!r} has no callback")
    try:
        n = len([p for p in inspect.signature(cb).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)])
    except (TypeError, ValueError):
        n = 3
    cb(*[item, app_data, dpg.get_item_user_data(item)][:n])


def find_menu_item(window: int | str, path: str) -> int:
    level = [c for slot in dpg.get_item_children(window).values() for c in slot
             if dpg.get_item_type(c).endswith("mvMenuBar")]
    if not level:
        raise ScriptError("the editor has no menu bar")
    item = level[0]
    for part in path.split("/"):
        kids = [c for slot in dpg.get_item_children(item).values() for c in slot]
        match = [c for c in kids if (dpg.get_item_label(c) or "").strip() == part]
        if not match:
            labels = [(dpg.get_item_label(c) or "").strip() for c in kids]
            raise ScriptError(f"no menu item {part!r} in {path!r} (there are {labels})")
        item = match[0]
    return item


def answer_file_dialog(path: str) -> None:
    dialogs = [i for i in dpg.get_all_items() if dpg.get_item_type(i).endswith("mvFileDialog")
               and dpg.is_item_shown(i)]
    if not dialogs:
        raise ScriptError("the menu item opened no file dialog")
    p = Path(path).resolve()
    call_item(max(dialogs), {"file_path_name": str(p), "current_path": str(p.parent), "selections": {}})


class Script:
    def __init__(self, editor, text: str) -> None:
        self.editor = editor
        self.steps = [s.strip() for s in text.split(";") if s.strip()]
        self.log: list[dict] = []
        self._wait = SETTLE_FRAMES
        self._current: str | None = None

    @property
    def done(self) -> bool:
        return not self.steps and self._current is None

    def tick(self) -> None:
        """Once per frame, after the editor's frame work."""
        if self._wait > 0:
            self._wait -= 1
            return
        if self._current is not None:
            self.log.append({"step": self._current, **self.editor.canvas_report()})
            self._current = None
        if self.steps:
            self._current = self.steps.pop(0)
            menu, _, arg = self._current.partition("=")
            call_item(find_menu_item(self.editor.window, menu))
            if arg:
                answer_file_dialog(arg)
            self._wait = SETTLE_FRAMES
