"""Colours and pin shapes: one look per socket type and per run state, created once per context
and shared by every item (a theme per item would cost memory and frame time on big graphs)."""

from __future__ import annotations

import dearpygui.dearpygui as dpg

from app.graph.types import SOCKET_COLOURS

PIN_SHAPES = {
    "MODEL": dpg.mvNode_PinShape_CircleFilled,
    "DATASET": dpg.mvNode_PinShape_QuadFilled,
    "BUCKETS": dpg.mvNode_PinShape_TriangleFilled,
    "OPTIMIZER": dpg.mvNode_PinShape_Circle,
    "TRAINED": dpg.mvNode_PinShape_Quad,
    "IMAGES": dpg.mvNode_PinShape_Triangle,
}

# Title bar colours per node state (the node's badge says the same in words).
STATE_COLOURS = {
    "": (62, 72, 96),
    "queued": (96, 96, 70),
    "running": (40, 110, 200),
    "cached": (40, 120, 120),
    "done": (50, 130, 70),
    "cancelled": (110, 100, 60),
    "error": (190, 40, 40),
    "invalid": (190, 40, 40),
}
ERROR_TEXT = (255, 110, 100)
MUTED_TEXT = (160, 160, 170)
FOCUS_OUTLINE = (255, 200, 60)


class Themes:
    def __init__(self) -> None:
        self.pins: dict[str, int] = {}
        self.links: dict[str, int] = {}
        self.states: dict[tuple[str, bool], int] = {}
        for name, rgb in SOCKET_COLOURS.items():
            with dpg.theme() as t:
                with dpg.theme_component(dpg.mvAll):
                    dpg.add_theme_color(dpg.mvNodeCol_Pin, rgb, category=dpg.mvThemeCat_Nodes)
                    dpg.add_theme_color(dpg.mvNodeCol_PinHovered, _lighter(rgb), category=dpg.mvThemeCat_Nodes)
            self.pins[name] = t
            with dpg.theme() as t:
                with dpg.theme_component(dpg.mvAll):
                    dpg.add_theme_color(dpg.mvNodeCol_Link, rgb, category=dpg.mvThemeCat_Nodes)
                    dpg.add_theme_color(dpg.mvNodeCol_LinkHovered, _lighter(rgb), category=dpg.mvThemeCat_Nodes)
                    dpg.add_theme_color(dpg.mvNodeCol_LinkSelected, (255, 255, 255), category=dpg.mvThemeCat_Nodes)
            self.links[name] = t
        for state, rgb in STATE_COLOURS.items():
            for focused in (False, True):
                with dpg.theme() as t:
                    with dpg.theme_component(dpg.mvAll):
                        dpg.add_theme_color(dpg.mvNodeCol_TitleBar, rgb, category=dpg.mvThemeCat_Nodes)
                        dpg.add_theme_color(dpg.mvNodeCol_TitleBarHovered, _lighter(rgb), category=dpg.mvThemeCat_Nodes)
                        dpg.add_theme_color(dpg.mvNodeCol_TitleBarSelected, _lighter(rgb, 50),
                                            category=dpg.mvThemeCat_Nodes)
                        if focused:
                            dpg.add_theme_color(dpg.mvNodeCol_NodeOutline, FOCUS_OUTLINE, category=dpg.mvThemeCat_Nodes)
                            dpg.add_theme_style(dpg.mvNodeStyleVar_NodeBorderThickness, 3,
                                                category=dpg.mvThemeCat_Nodes)
                self.states[(state, focused)] = t
        with dpg.theme() as self.app:
            with dpg.theme_component(dpg.mvAll):
                dpg.add_theme_style(dpg.mvStyleVar_FrameRounding, 3)
                dpg.add_theme_style(dpg.mvStyleVar_ItemSpacing, 6, 4)
                dpg.add_theme_style(dpg.mvNodeStyleVar_PinCircleRadius, 5, category=dpg.mvThemeCat_Nodes)
                dpg.add_theme_style(dpg.mvNodeStyleVar_PinTriangleSideLength, 11, category=dpg.mvThemeCat_Nodes)
                dpg.add_theme_style(dpg.mvNodeStyleVar_PinQuadSideLength, 9, category=dpg.mvThemeCat_Nodes)
                dpg.add_theme_style(dpg.mvNodeStyleVar_LinkThickness, 3, category=dpg.mvThemeCat_Nodes)
                dpg.add_theme_style(dpg.mvNodeStyleVar_NodeCornerRounding, 5, category=dpg.mvThemeCat_Nodes)
        with dpg.theme() as self.progress_bar:
            with dpg.theme_component(dpg.mvAll):
                dpg.add_theme_color(dpg.mvThemeCol_PlotHistogram, STATE_COLOURS["running"])

    def node(self, state: str, focused: bool = False) -> int:
        return self.states.get((state, focused)) or self.states[("", focused)]


def _lighter(rgb, amount: int = 30):
    return tuple(min(255, c + amount) for c in rgb)
