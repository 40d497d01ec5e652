"""`launch.py gui [RECIPE] [--screenshot PNG] [--frames N]`: the viewport and the render loop.

Callbacks run on this thread (manual callback management), between frames, so no callback ever
races the per-frame work. The loop measures every frame; the times go to the status bar and to
the test dump.

Environment hooks for tests and docs (ignored otherwise):
  NODETRAINER_GUI_DUMP=FILE    write the editor's state (recipe, run, timings, pin positions) as
                               JSON whenever it changes and on exit
  NODETRAINER_GUI_AUTORUN=1    start a run after the first frames; with --screenshot, the picture
                               is taken once the run has finished
  NODETRAINER_GUI_TIMEOUT=S    with AUTORUN and --screenshot: give up waiting after S seconds
  NODETRAINER_GUI_FOCUS=ID     show this node in the inspector from the start (for screenshots)
  NODETRAINER_GUI_BROWSE=ID    open the dataset browser of this Concept node from the start
  NODETRAINER_GUI_SCRIPT=STEPS play menu actions ('File/New;Presets/tiny_demo;File/Open...=PATH',
                               see app/gui/script.py), record the canvas after each, then exit

An idle editor draws nothing until the next input (app/gui/pacing.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

def process_age() -> float:
    """Seconds since this process started (so 'time to first frame' includes Python's start-up)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def run_editor(args) -> int:
    t_entry = time.perf_counter()
    age_at_entry = process_age()
    import dearpygui.dearpygui as dpg

    from app.graph.recipe import atomic_write_text
    from app.graph.registry import load_registry
    from app.gui.editor import Editor

    screenshot = getattr(args, "screenshot", None)
    frames = max(2, int(getattr(args, "frames", 5) or 5))
    dump_path = os.environ.get("NODETRAINER_GUI_DUMP")
    autorun = os.environ.get("NODETRAINER_GUI_AUTORUN") == "1"
    timeout = float(os.environ.get("NODETRAINER_GUI_TIMEOUT", "120"))
    script_text = os.environ.get("NODETRAINER_GUI_SCRIPT")

    registry = load_registry(args.nodes_dir)
    for p in registry.problems:
        print(f"warning: {p}", file=sys.stderr)

    dpg.create_context()
    dpg.configure_app(manual_callback_management=True)
    _load_font(dpg)
    editor = Editor(registry, args.nodes_dir, autosave=not screenshot)
    if getattr(args, "recipe", None):
        if not editor.open_path(args.recipe) and screenshot:
            print(f"error: {editor.message.lstrip('! ')}", file=sys.stderr)
            dpg.destroy_context()
            return 2
    dpg.create_viewport(title="NodeTrainer", width=1600, height=1000, x_pos=0, y_pos=0, disable_close=True)
    dpg.set_exit_callback(lambda: editor.request_quit())
    dpg.setup_dearpygui()
    dpg.show_viewport()
    dpg.set_primary_window("main", True)
    editor.update_title()
    if not screenshot:
        editor.offer_recovery()
    focus = os.environ.get("NODETRAINER_GUI_FOCUS")
    if focus in editor.doc.graph.nodes:
        editor.focus_node(focus, quiet=True)
    browse = os.environ.get("NODETRAINER_GUI_BROWSE")
    if browse in editor.doc.graph.nodes:
        editor.open_dataset_browser(browse)

    from app.gui.pacing import MAX_FPS, Pacer
    from app.gui.script import Script

    script = Script(editor, script_text) if script_text else None
    editor.script = script
    pacer = Pacer()
    waiting = False
    stats = {"first_frame_s": None, "max_run_frame_ms": 0.0, "run_frames": 0, "frames": 0}
    times: list[float] = []  # whole frames: callbacks + editor work + rendering
    works: list[float] = []  # callbacks + editor work only (what this code costs, without the GPU/GL)
    last_dump = None
    shot_at: int | None = None
    started_run = False
    t_loop = time.monotonic()
    frame = 0
    while dpg.is_dearpygui_running():
        t0 = time.perf_counter()
        jobs = dpg.get_callback_queue()
        dpg.run_callbacks(jobs)
        editor.frame()
        if script is not None:
            script.tick()
        work = time.perf_counter() - t0
        inputs = (bool(jobs), tuple(dpg.get_mouse_pos(local=False)),
                  tuple(dpg.is_mouse_button_down(b) for b in (0, 1, 2)))
        wait = pacer.frame(inputs, busy=editor.busy() or bool(screenshot) or autorun or script is not None)
        if wait != waiting:
            waiting = wait
            dpg.configure_app(wait_for_input=wait)
            if wait and dump_path:  # the next frame may not come for a while: the state is final
                last_dump = _dump(editor, stats, times, works, dump_path, last_dump, atomic_write_text)
        dpg.render_dearpygui_frame()
        dt = time.perf_counter() - t0
        if not waiting and dt < 1 / MAX_FPS:
            time.sleep(1 / MAX_FPS - dt)  # no faster than the screen when there is no vsync (Xvfb)
        frame += 1
        if not waiting:  # a frame that waited for input measures the user, not the editor
            works.append(work)
            del works[:-2000]
            times.append(dt)
            del times[:-2000]
        editor.frame_times = times
        if stats["first_frame_s"] is None:
            stats["first_frame_s"] = age_at_entry + (time.perf_counter() - t_entry)
            stats["first_frame_since_run_editor_s"] = time.perf_counter() - t_entry
        if editor.run.running:
            stats["run_frames"] += 1
            stats["max_run_frame_ms"] = max(stats["max_run_frame_ms"], dt * 1000)
            stats["max_run_work_ms"] = max(stats.get("max_run_work_ms", 0.0), work * 1000)
        stats["frames"] = frame

        if autorun and not started_run and frame >= 3:
            started_run = editor.run_graph()
            if not started_run:
                print(f"error: {editor.message}", file=sys.stderr)
        run_finished = not autorun or (started_run and not editor.run.running and not editor.runner.starting)
        if screenshot and shot_at is None and frame >= frames and (
                run_finished or time.monotonic() - t_loop > timeout):
            dpg.output_frame_buffer(file=str(screenshot))
            shot_at = frame
        if shot_at is not None and frame >= shot_at + 3:
            break
        if script is not None and script.done and not screenshot:
            break
        if dump_path and (frame % 10 == 0 or frame == 4):
            last_dump = _dump(editor, stats, times, works, dump_path, last_dump, atomic_write_text)

    if dump_path:
        _dump(editor, stats, times, works, dump_path, None, atomic_write_text)
    editor.shutdown()
    dpg.destroy_context()
    if screenshot and not Path(screenshot).is_file():
        print(f"error: no screenshot was written to {screenshot}", file=sys.stderr)
        return 1
    return 0


def _dump(editor, stats, times, works, path, last, write) -> str:
    """The test-mode state file; rewritten only when its content changed."""
    state = editor.state()
    state["pins"] = {} if editor.fitting else editor.canvas.pin_screen_positions()  # once the view settled
    state["canvas"] = editor.canvas_report()
    if getattr(editor, "script", None) is not None:
        state["script"] = editor.script.log
    if getattr(editor, "browser", None) is not None:
        state["browser"] = editor.browser.report()
    timing = dict(stats)
    for name, values in (("frame", times), ("work", works)):
        ordered = sorted(values)
        if ordered:
            timing[f"median_{name}_ms"] = ordered[len(ordered) // 2] * 1000
            timing[f"max_{name}_ms"] = ordered[-1] * 1000
    state["timing"] = timing
    text = json.dumps(state, default=str)
    if text != last:
        write(Path(path), text)
    return text


def _load_font(dpg) -> None:
    """A clearer font than the built-in bitmap one when the system has it."""
    from app.gui.view import FONT_SIZE, font_file

    path = font_file()
    if path:
        try:
            with dpg.font_registry():
                font = dpg.add_font(path, FONT_SIZE)
            dpg.bind_font(font)
        except Exception:
            pass
