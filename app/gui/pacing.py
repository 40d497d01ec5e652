"""When the render loop may stop drawing: an idle editor waits for input instead of redrawing an
unchanged picture (which cost a third of a core under Xvfb and keeps a laptop's GPU awake).

Dear PyGui can block the next frame until an input event arrives (`wait_for_input`); nothing else
wakes it, so the editor stays awake while anything moves without input: a run streaming events,
a worker starting, a pending fit or autosave, a scripted test, and for a short while after the last
input (hover highlights and tooltips settle a few frames after the mouse stops).
"""

from __future__ import annotations

import time

AWAKE_AFTER_INPUT_S = 1.0
MAX_FPS = 60


class Pacer:
    def __init__(self, clock=time.monotonic, awake_s: float = AWAKE_AFTER_INPUT_S) -> None:
        self.clock = clock
        self.awake_s = awake_s
        self.last_input = clock()
        self.waiting = False  # whether the next frame blocks until input
        self._seen = None

    def frame(self, inputs, busy: bool) -> bool:
        """Call once per frame with a snapshot of the input state (anything comparable: mouse
        position, buttons, pending callbacks) and whether the editor has work without input.
        Returns whether the next frame should wait for input."""
        now = self.clock()
        if inputs != self._seen or self.waiting:  # a frame that waited was woken by input
            self.last_input = now
        self._seen = inputs
        self.waiting = not busy and now - self.last_input > self.awake_s
        return self.waiting
