"""Modal questions and file choosers. Each takes a continuation instead of blocking: the render
loop must keep running (and training keep drawing) while a dialog is open."""

from __future__ import annotations

import os
from typing import Callable

import dearpygui.dearpygui as dpg

from app.gui.theme import MUTED_TEXT


def _centre(w: int, h: int) -> list[int]:
    try:
        vw, vh = dpg.get_viewport_client_width(), dpg.get_viewport_client_height()
    except Exception:
        vw, vh = 1400, 900
    return [max(0, (vw - w) // 2), max(0, (vh - h) // 3)]


def choose(title: str, message: str, buttons: list[tuple[str, Callable[[], None] | None]], width: int = 420) -> int:
    """A modal with one button per choice; a choice's callback runs after the modal closes."""
    win = dpg.add_window(label=title, modal=True, no_collapse=True, width=width, autosize=True,
                         pos=_centre(width, 140), on_close=lambda s: dpg.delete_item(s))
    dpg.add_text(message, wrap=width - 20, parent=win)
    with dpg.group(horizontal=True, parent=win):
        for label, action in buttons:
            def run(sender, app_data, user_data):
                dpg.delete_item(win)
                if user_data:
                    user_data()
            dpg.add_button(label=label, width=100, callback=run, user_data=action)
    return win


def message(title: str, text: str) -> int:
    return choose(title, text, [("OK", None)])


def ask_text(title: str, prompt: str, default: str, on_ok: Callable[[str], None]) -> int:
    win = dpg.add_window(label=title, modal=True, no_collapse=True, width=360, autosize=True, pos=_centre(360, 120),
                         on_close=lambda s: dpg.delete_item(s))
    dpg.add_text(prompt, parent=win)
    field = dpg.add_input_text(default_value=default, width=-1, parent=win, on_enter=True,
                               callback=lambda: (_finish(win, on_ok, dpg.get_value(field))))
    with dpg.group(horizontal=True, parent=win):
        dpg.add_button(label="OK", width=100, callback=lambda: _finish(win, on_ok, dpg.get_value(field)))
        dpg.add_button(label="Cancel", width=100, callback=lambda: dpg.delete_item(win))
    dpg.focus_item(field)
    return win


def _finish(win, on_ok, value) -> None:
    dpg.delete_item(win)
    on_ok(value)


def file_dialog(title: str, on_pick: Callable[[str], None], *, extensions: tuple[str, ...] = (".json",),
                folder: bool = False, save: bool = False, default_path: str = "", default_name: str = "") -> int:
    """Dear PyGui's file dialog, deleted after use. For save, the typed name gets the first
    extension if it has none."""

    def picked(sender, app_data):
        dpg.delete_item(sender)
        path = app_data.get("file_path_name") or ""
        if folder:
            path = app_data.get("current_path") or path
        if not path:
            return
        if save and extensions and not os.path.splitext(path)[1]:
            path += extensions[0]
        on_pick(path)

    dlg = dpg.add_file_dialog(label=title, directory_selector=folder, show=True, modal=True, width=700, height=420,
                              callback=picked, cancel_callback=lambda s, a: dpg.delete_item(s),
                              default_path=default_path or os.getcwd(),
                              default_filename=default_name if save else "")
    if not folder:
        for ext in extensions:
            dpg.add_file_extension(ext, parent=dlg, color=(120, 220, 120, 255))
        dpg.add_file_extension(".*", parent=dlg)
    return dlg


def enlarge_image(textures, png: bytes, caption: str) -> int:
    """A click on a preview: the image at up to 512 px, with its caption."""
    tex = textures.get(png)
    win = dpg.add_window(label="Preview", width=560, autosize=True, pos=_centre(560, 560),
                         on_close=lambda s: dpg.delete_item(s))
    if tex is None:
        dpg.add_text("(unreadable image)", parent=win)
        return win
    scale = min(512 / max(tex[1], tex[2]), 8.0)
    dpg.add_image(tex[0], width=int(tex[1] * scale), height=int(tex[2] * scale), parent=win)
    if caption:
        dpg.add_text(caption, wrap=512, parent=win, color=MUTED_TEXT)
    return win
