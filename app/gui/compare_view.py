"""A comparison of runs in the editor: the sample grid, the loss plot and the table of settings that
differ, read from the folder `launch.py compare` wrote (its compare.json names the files)."""

from __future__ import annotations

import json
from pathlib import Path

import dearpygui.dearpygui as dpg

from app.gui.theme import MUTED_TEXT

SHOW_SIDE = 760  # the widest an image is shown


class CompareView:
    def __init__(self, textures, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.images: list[str] = []  # what is shown, in order (tests read it)
        self.window = dpg.add_window(label=f"Comparison - {self.folder.name}", width=820, height=700,
                                     on_close=lambda s: dpg.delete_item(s))
        try:
            summary = json.loads((self.folder / "compare.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            dpg.add_text(f"Cannot read {self.folder / 'compare.json'}: {e}. Make the comparison again with "
                         f"'launch.py compare'.", parent=self.window, wrap=760)
            return
        runs = summary.get("runs") or []
        dpg.add_text(f"{len(runs)} runs: " + ", ".join(r["name"] for r in runs), parent=self.window, wrap=760)
        if summary.get("prompts"):
            dpg.add_text(f"same prompts and seed {summary.get('seed')} for every run; one row per run",
                         parent=self.window, color=MUTED_TEXT)
        for key in ("grid", "loss_plot"):
            path = summary.get(key)
            if not path or not Path(path).is_file():
                continue
            tex = textures.get(Path(path).read_bytes())
            if tex is None:
                dpg.add_text(f"(cannot show {path})", parent=self.window)
                continue
            scale = min(1.0, SHOW_SIDE / max(tex[1], 1)) if key == "loss_plot" else min(2.0, SHOW_SIDE / max(tex[1], 1))
            dpg.add_image(tex[0], width=int(tex[1] * scale), height=int(tex[2] * scale), parent=self.window)
            self.images.append(path)
        table = self.folder / "compare.md"
        if table.is_file():
            rows = [line for line in table.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
            if rows:
                header = [c.strip() for c in rows[0].strip("|").split("|")]
                with dpg.table(parent=self.window, header_row=True, borders_innerH=True, resizable=True,
                               policy=dpg.mvTable_SizingFixedFit):
                    for c in header:
                        dpg.add_table_column(label=c)
                    for row in rows[2:]:
                        with dpg.table_row():
                            for c in row.strip("|").split("|"):
                                dpg.add_text(c.strip())
        dpg.add_text(f"Files: {self.folder}", parent=self.window, color=MUTED_TEXT, wrap=760)


def open_compare_dialog(editor) -> int:
    """Run -> Open a comparison...: a folder `launch.py compare` wrote."""
    from app.gui import dialogs

    def picked(path: str) -> None:
        folder = Path(path)
        if not (folder / "compare.json").is_file():
            editor.say(f"{folder} holds no comparison (compare.json); make one with 'launch.py compare WS1 WS2' "
                       f"or the queue's 'Compare selected'.", error=True)
            return
        editor.compare_view = CompareView(editor.textures, folder)

    return dialogs.file_dialog("Open a comparison folder", picked, folder=True,
                               default_path=str(Path("workspace").resolve()))
