"""Param widgets generated from a node spec's Input: the spec's type, range, choices and tooltip
decide the widget, so adding a node type never needs editor code.

Dear PyGui's integer widget is 32-bit; wider ranges (seeds up to 2**63) use a text field that
only accepts whole numbers, so no value a recipe may hold is ever clipped by the widget.

A text field in a node is narrow and shows the start of its value (`demo_data/sha`), so text and
path fields carry their whole value in their tooltip, and a path field shows the end of a value
that does not fit (`.../shapes`) beside it: the part that tells paths apart.
"""

from __future__ import annotations

from typing import Any, Callable

import dearpygui.dearpygui as dpg

from app.graph.spec import Input

WIDTH = 110
INT32 = (-(2**31), 2**31 - 1)
TAIL_CHARS = 14  # what a path field shows in full; longer values show their tail beside it
_value_tips: dict[int, tuple[int, int, str]] = {}  # field -> (tooltip text, tail text or 0, param type)


def _fits_int32(inp: Input) -> bool:
    lo = inp.min if inp.min is not None else INT32[0]
    hi = inp.max if inp.max is not None else INT32[1]
    return INT32[0] <= lo and hi <= INT32[1]


def add_param_widget(inp: Input, value: Any, on_change: Callable[[str, Any], None],
                     on_browse: Callable[[str, str], None] | None = None, parent: int | str = 0) -> int:
    """Adds the widget for one param under `parent` and returns the item holding its value.
    on_change(name, value) receives values already converted to the param's type."""
    label = inp.name
    kw = {"label": label, "width": WIDTH, "parent": parent}
    t = inp.type

    def changed(sender, app_data, _user=None):
        _show_value(sender, app_data)
        on_change(inp.name, convert(inp, app_data))

    if t == "BOOL":
        item = dpg.add_checkbox(default_value=bool(value), callback=changed, label=label, parent=parent)
    elif t == "ENUM":
        choices = list(inp.choices or ())
        item = dpg.add_combo(choices, default_value=value if value in choices else (choices[0] if choices else ""),
                             callback=changed, **kw)
    elif t == "INT" and _fits_int32(inp):
        item = dpg.add_input_int(default_value=int(value) if isinstance(value, int) else 0, callback=changed,
                                 step=int(inp.step or 1), step_fast=int((inp.step or 1) * 10),
                                 min_value=int(inp.min) if inp.min is not None else 0,
                                 max_value=int(inp.max) if inp.max is not None else 0,
                                 min_clamped=inp.min is not None, max_clamped=inp.max is not None,
                                 on_enter=False, **kw)
    elif t == "INT":
        item = dpg.add_input_text(default_value=str(value), callback=changed, decimal=True, **kw)
    elif t == "FLOAT":
        item = dpg.add_input_double(default_value=float(value) if isinstance(value, (int, float)) else 0.0,
                                    callback=changed, format="%.6g", step=float(inp.step or 0),
                                    step_fast=0.0,
                                    min_value=float(inp.min) if inp.min is not None else 0.0,
                                    max_value=float(inp.max) if inp.max is not None else 0.0,
                                    min_clamped=inp.min is not None, max_clamped=inp.max is not None, **kw)
    elif t == "PATH":
        with dpg.group(horizontal=True, parent=parent):
            item = dpg.add_input_text(default_value=str(value or ""), callback=changed, label="", width=WIDTH - 26,
                                      hint=inp.path_kind)
            browse = dpg.add_button(label="...", width=20,
                                    callback=lambda: on_browse(inp.name, inp.path_kind) if on_browse else None)
            dpg.add_text(label)
            _tooltip(browse, f"choose a {inp.path_kind.replace('_', ' ')}")
        tail = dpg.add_text("", parent=parent, color=(160, 160, 170), show=False)
    else:  # STRING
        if inp.multiline:
            item = dpg.add_input_text(default_value=str(value or ""), callback=changed, multiline=True, height=44,
                                      tab_input=False, **kw)
        else:
            item = dpg.add_input_text(default_value=str(value or ""), callback=changed, **kw)
    tip = f"{inp.name} ({inp.type}{_range(inp)})" + (f": {inp.tooltip}" if inp.tooltip else "")
    with dpg.tooltip(item):
        dpg.add_text(tip, wrap=320)
        if t in ("PATH", "STRING"):
            shown = dpg.add_text("", wrap=320, color=(230, 230, 160))
            if len(_value_tips) > 20000:  # fields of deleted nodes
                for gone in [i for i in _value_tips if not dpg.does_item_exist(i)]:
                    del _value_tips[gone]
            _value_tips[item] = (shown, tail if t == "PATH" else 0, t)
            _show_value(item, value)
    return item


SWEEP_COLOUR = (120, 200, 255)
SWEEP_TINT = (40, 70, 110)  # the field's background while its param is marked for a sweep
_mark_tips: dict[int, int] = {}  # mark label -> the text of its tooltip
_tint: list[int] = []


def add_sweep_mark(parent: int | str) -> int:
    """The label under a param's field that says it is marked for a sweep ("<> sweep: 3 values"), with
    the values in its tooltip; hidden until show_sweep_mark gives it values."""
    mark = dpg.add_text("", parent=parent, color=SWEEP_COLOUR, show=False)
    if len(_mark_tips) > 20000:  # marks of deleted nodes
        for gone in [i for i in _mark_tips if not dpg.does_item_exist(i)]:
            del _mark_tips[gone]
    with dpg.tooltip(mark):
        _mark_tips[mark] = dpg.add_text("", wrap=320)
    return mark


def show_sweep_mark(mark: int, field: int, values: list | None) -> None:
    """Shows (values) or hides (None) a sweep mark, and tints its field so the mark reads at a glance."""
    from app.engine.sweep import format_value

    shown = bool(values)
    text = f"<> sweep: {len(values)} value{'s' if len(values) != 1 else ''}" if shown else ""
    dpg.set_value(mark, text)
    dpg.configure_item(mark, show=shown)
    tip = _mark_tips.get(mark)
    if tip is not None and dpg.does_item_exist(tip):
        dpg.set_value(tip, ("swept over: " + ", ".join(format_value(v) for v in values) +
                            "\nRun -> Add to queue queues one run per combination; right-click the node to "
                            "edit or remove the mark.") if shown else "")
    if dpg.does_item_exist(field):
        dpg.bind_item_theme(field, _tint_theme() if shown else 0)


def sweep_mark_text(mark: int) -> tuple[str, str]:
    """(label, tooltip) of a sweep mark as the user reads them; ("", "") when hidden."""
    if not dpg.does_item_exist(mark) or not dpg.get_item_configuration(mark)["show"]:
        return "", ""
    tip = _mark_tips.get(mark)
    return dpg.get_value(mark), (dpg.get_value(tip) if tip is not None and dpg.does_item_exist(tip) else "")


def _tint_theme() -> int:
    if _tint and dpg.does_item_exist(_tint[0]) and dpg.get_item_type(_tint[0]).endswith("mvTheme"):
        return _tint[0]
    with dpg.theme() as theme:
        with dpg.theme_component(dpg.mvAll):
            dpg.add_theme_color(dpg.mvThemeCol_FrameBg, SWEEP_TINT)
    _tint[:] = [theme]
    return theme


_TEXT_FIELDS = ("mvInputText", "mvInputInt", "mvInputDouble", "mvInputFloat")


def any_text_field_active() -> bool:
    """Whether the user is typing in any field (a node's, or a dialog's such as the sweep values): the
    editor's keys (Space opens the node search, Del deletes) must then leave the keystrokes to the field."""
    for item in dpg.get_all_items():
        if dpg.get_item_type(item).rsplit("::", 1)[-1] in _TEXT_FIELDS and dpg.is_item_active(item):
            return True
    return False


def set_widget_value(item: int, value: Any) -> None:
    """Sets a field made by add_param_widget from code (undo, paste), keeping its tooltip and tail."""
    dpg.set_value(item, value)
    _show_value(item, value)


def value_shown(item: int) -> tuple[str, str]:
    """(tooltip value line, tail line) of a text or path field: what a user reads of a long value."""
    tip = _value_tips.get(item)
    if tip is None:
        return "", ""
    return dpg.get_value(tip[0]), (dpg.get_value(tip[1]) if tip[1] else "")


def path_tail(value: str, chars: int = TAIL_CHARS) -> str:
    """The end of a path that does not fit a node's field, cut at a folder boundary where one is
    near: 'presets/demo_data/shapes' -> '.../shapes'."""
    value = value.rstrip("/\\") or value
    if len(value) <= chars:
        return ""
    last = value.replace("\\", "/").rsplit("/", 1)[-1]
    if last == value:  # no folders (builtin:tiny-sd): the whole value, or its end
        return value if len(value) <= 2 * chars else "..." + value[-2 * chars:]
    sep = value[len(value) - len(last) - 1]
    return "..." + sep + (last if len(last) <= 2 * chars else "..." + last[-2 * chars:])


def _show_value(item: int, value: Any) -> None:
    tip = _value_tips.get(item)
    if tip is None or not dpg.does_item_exist(tip[0]):
        _value_tips.pop(item, None)
        return
    text = "" if value is None else str(value)
    dpg.set_value(tip[0], f"value: {text}" if text else "")
    if tip[1] and dpg.does_item_exist(tip[1]):
        tail = path_tail(text)
        dpg.set_value(tip[1], tail)
        dpg.configure_item(tip[1], show=bool(tail))


def convert(inp: Input, raw: Any) -> Any:
    """A widget's raw value as the param's type (text fields for big ints give strings)."""
    if inp.type == "INT":
        try:
            return int(raw)
        except (TypeError, ValueError):
            return inp.default
    if inp.type == "FLOAT":
        return float(raw)
    if inp.type == "BOOL":
        return bool(raw)
    return "" if raw is None else str(raw)


def widget_value(inp: Input, value: Any) -> Any:
    """A param value as its widget shows it (the inverse of convert)."""
    if inp.type == "INT" and not _fits_int32(inp):
        return str(value)
    if inp.type == "FLOAT":
        return float(value) if isinstance(value, (int, float)) else 0.0
    if inp.type in ("STRING", "PATH"):
        return "" if value is None else str(value)
    return value


def _range(inp: Input) -> str:
    if inp.min is None and inp.max is None:
        return ""
    lo = "" if inp.min is None else f"{inp.min:g}"
    hi = "" if inp.max is None else f"{inp.max:g}"
    return f", {lo}..{hi}"


def _tooltip(item: int, text: str) -> None:
    with dpg.tooltip(item):
        dpg.add_text(text, wrap=320)
