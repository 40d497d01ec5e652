"""The parent's side of the worker process (used by the editor, and by `launch.py run --worker`).

Events arrive on a reader thread and wait in a queue: the editor polls it once per frame and never
blocks its render loop on the worker. If the worker dies, the client turns that into events on the
node that was running (node_error, worker_died, run_done) and a later run starts a fresh worker.
This module imports neither torch nor the engine's executor.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import IO

from app.engine.protocol import FrameWriter, read_frame

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerError(RuntimeError):
    pass


class WorkerClient:
    def __init__(self, nodes_dirs=(), log: IO | int | None = None, env: dict | None = None,
                 one_shot: bool = False) -> None:
        self.nodes_dirs = [str(d) for d in nodes_dirs]
        self.one_shot = one_shot  # the worker runs one recipe: it caches nothing (see Executor.keep_outputs)
        self.log = log
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.events: queue.Queue = queue.Queue()
        self._writer: FrameWriter | None = None
        self._reader: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self.current_run: str | None = None
        self.current_node: str | None = None
        self.pending_runs: list[str] = []  # sent, not yet done: each gets a run_done even if the worker dies
        self.ready: dict | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> dict:
        """Start a fresh worker and wait for it to say it is ready (its node catalogue loaded)."""
        if self.alive:
            return self.ready or {}
        cmd_r, cmd_w = os.pipe()
        ev_r, ev_w = os.pipe()
        args = [sys.executable, "-m", "app.engine.worker", "--in-fd", str(cmd_r), "--out-fd", str(ev_w)]
        for d in self.nodes_dirs:
            args += ["--nodes-dir", d]
        # the worker sets its torch threads by app/engine/threads.py (free cores, or an explicit
        # NODETRAINER_THREADS / OMP_NUM_THREADS); an editor session keeps a core for its render loop
        args += ["--one-shot"] if self.one_shot else ["--reserve-cores", "1"]
        env = dict(os.environ if self.env is None else self.env)
        env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        out = self.log if self.log is not None else None
        self.proc = subprocess.Popen(args, pass_fds=(cmd_r, ev_w), cwd=str(REPO_ROOT), env=env,
                                     stdin=subprocess.DEVNULL, stdout=out if out is not None else sys.stderr,
                                     stderr=out, start_new_session=True)
        os.close(cmd_r)
        os.close(ev_w)
        self._writer = FrameWriter(os.fdopen(cmd_w, "wb", buffering=0))
        self.events = queue.Queue()
        ready_q: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read_events, args=(os.fdopen(ev_r, "rb", buffering=0),
                                        self.proc, ready_q), name="worker-events", daemon=True)
        self._reader.start()
        try:
            self.ready = ready_q.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise WorkerError(f"the worker did not start within {timeout:.0f} s") from None
        if self.ready.get("event") != "worker_ready":
            raise WorkerError(f"the worker failed to start: {self.ready.get('message', 'it exited')}")
        return self.ready

    def shutdown(self, timeout: float = 10.0) -> None:
        if not self.alive:
            return
        try:
            self._send({"cmd": "shutdown"})
            self.proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, WorkerError, OSError):
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
            self.proc.wait()

    def restart(self) -> dict:
        self.kill()
        return self.start()

    # ---- commands ----------------------------------------------------------------------------
    def run(self, recipe: dict, *, source: str = "recipe", recipe_dir: str | None = None,
            targets: list[str] | None = None, workspace: str | None = None) -> str:
        """Queue a run of recipe data (a dict as saved in a file); returns its run id."""
        if not self.alive:
            self.start()
        run_id = uuid.uuid4().hex[:12]
        with self._state_lock:
            self.pending_runs.append(run_id)
        self._send({"cmd": "run", "run_id": run_id, "recipe": recipe, "source": source,
                    "recipe_dir": recipe_dir, "targets": targets or [], "workspace": workspace})
        return run_id

    def cancel(self) -> None:
        if self.alive:
            self._send({"cmd": "cancel"})

    def clear_cache(self) -> None:
        self._send({"cmd": "clear_cache"})

    def _send(self, msg: dict) -> None:
        if self._writer is None:
            raise WorkerError("the worker is not running")
        try:
            self._writer.write(msg)
        except (BrokenPipeError, OSError) as e:
            raise WorkerError(f"the worker is gone ({e})") from None

    # ---- events ------------------------------------------------------------------------------
    def poll(self) -> list[dict]:
        """Every event that has arrived, without waiting (the editor calls this each frame)."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def next_event(self, timeout: float | None = None) -> dict | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def wait_run(self, run_id: str, on_event=None, timeout: float | None = None) -> dict:
        """Block until the run's run_done event; returns it. Events go to on_event as they come."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if remaining == 0.0:
                raise TimeoutError(f"run {run_id} did not finish in {timeout} s")
            event = self.next_event(timeout=min(remaining, 0.5) if remaining is not None else 0.5)
            if event is None:
                continue
            if on_event:
                on_event(event)
            if event.get("event") == "run_done" and event.get("run_id") == run_id:
                return event

    def _read_events(self, stream, proc: subprocess.Popen, ready_q: queue.Queue) -> None:
        while True:
            try:
                event = read_frame(stream)
            except Exception:
                event = None
            if event is None:
                break
            kind = event.get("event")
            with self._state_lock:
                if kind == "run_start":
                    self.current_run = event.get("run_id")
                elif kind == "node_start":
                    self.current_node = event.get("node")
                elif kind in ("node_done", "node_error", "node_cancelled"):
                    self.current_node = None
                elif kind == "run_done":
                    self.current_run = self.current_node = None
                    if event.get("run_id") in self.pending_runs:
                        self.pending_runs.remove(event.get("run_id"))
            if kind == "worker_ready":
                ready_q.put(event)
                continue
            self.events.put(event)
        code = proc.wait()
        ready_q.put({"event": "worker_died", "message": describe_exit(code)})
        self._report_death(code)

    def _report_death(self, code: int) -> None:
        with self._state_lock:
            run_id, node = self.current_run, self.current_node
            pending, self.pending_runs = self.pending_runs, []
            self.current_run = self.current_node = None
        if code == 0 and not pending:
            return  # a clean shutdown
        message = f"the worker process died ({describe_exit(code)})"
        now = time.time()
        if node is not None:
            self.events.put({"event": "node_error", "run_id": run_id, "node": node, "t": now,
                             "message": f"{message} while running this node", "error_type": "WorkerDied",
                             "traceback": ""})
        self.events.put({"event": "worker_died", "run_id": run_id, "node": node, "exit_code": code,
                         "message": message, "t": now})
        for rid in pending:
            self.events.put({"event": "run_done", "run_id": rid, "status": "error", "t": now,
                             "message": f"node {node}: {message}" if node and rid == run_id else message})


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
