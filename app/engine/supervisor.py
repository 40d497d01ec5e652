"""`launch.py run` in a forked child, so that a node that kills the process still gets a message.

A node that dies in native code (SIGSEGV, SIGBUS, SIGFPE, SIGABRT, SIGILL: a bug in an extension,
a corrupt file) ends the Python process before any handler of ours can run. So the command-line run
forks before torch is imported: the child runs the recipe exactly as before (same output, same
cooperative Ctrl-C) and notes on a pipe which node it starts and finishes; the parent only waits. If
the child dies by a signal, the parent names the node that was running, adds node_error and run_done
to the events file, and exits 1 like any failed node. The child also enables faulthandler, so the
Python traceback of the crash (the node function's frame) is printed above the message.

The child stays in the terminal's process group (Ctrl-C, Ctrl-Z, stdin and debuggers work as
before); SIGINT, SIGTERM and SIGHUP sent to the parent alone are passed on. If the parent is killed
outright, the child is asked to stop as after Ctrl-C (Linux), so it still leaves a backup.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time

EXIT_FAILED = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def available() -> bool:
    return hasattr(os, "fork") and hasattr(signal, "sigtimedwait") and sys.platform != "win32"


class NodeNotes:
    """The child's event sink: one line per node start and end on the pipe to the parent."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "node_start":
            line = json.dumps({"start": event.get("node"), "title": event.get("title"), "type": event.get("type"),
                               "run_id": event.get("run_id")})
        elif kind in ("node_done", "node_error", "node_cancelled"):
            line = json.dumps({"end": event.get("node")})
        else:
            return
        try:
            os.write(self.fd, (line + "\n").encode())
        except OSError:
            pass  # the parent is gone: nothing to tell


def fork_guarded(events_path: str | None = None) -> "int | NodeNotes":
    """In the child: returns the NodeNotes sink to add to the run's events. In the parent: waits for
    the child and returns the exit code for the command line."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    # blocked before the fork, so that none is missed; the parent takes them with sigtimedwait
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        os.close(r)
        _stop_with_parent()
        faulthandler.enable(file=sys.stderr, all_threads=False)
        return NodeNotes(w)
    os.close(w)
    try:
        return _wait(pid, r, events_path)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _stop_with_parent() -> None:
    """Linux: a SIGINT (a cooperative stop, with a backup) when the parent dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGINT))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _wait(pid: int, r: int, events_path: str | None) -> int:
    """Wait for the child. The child shares the terminal's process group, so a Ctrl-C typed there (or
    Ctrl-Z, or a hang-up) reaches it directly, and stdin and debuggers work in nodes; signals sent to
    this process alone (``kill -INT``, a test, a process manager) are passed on, once each."""
    notes: list[dict] = []
    reader = threading.Thread(target=_read_notes, args=(r, notes), name="run-notes", daemon=True)
    reader.start()
    received: list[int] = []
    status = None
    while status is None:
        info = signal.sigtimedwait({*FORWARDED, signal.SIGCHLD}, 1.0)
        if info is not None and info.si_signo != signal.SIGCHLD and info.si_code <= 0:  # sent by a process
            received.append(info.si_signo)
            try:
                os.kill(pid, info.si_signo)
            except ProcessLookupError:
                pass
        try:
            done, st = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return EXIT_FAILED
        if done == pid:
            status = st
    reader.join(timeout=5)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    signum = os.WTERMSIG(status)
    if signum == signal.SIGINT:  # Ctrl-C before the run could catch it
        print("Interrupted.", file=sys.stderr)
        return 130
    if signum in received or signum in (signal.SIGTERM, signal.SIGHUP):
        return 128 + signum  # ended by a signal meant for the run: no crash to report
    node = _running_node(notes)
    message = describe_signal(signum)
    if node is not None:
        print(f"ERROR in {node.get('title') or node.get('type')} (node {node['start']}, {node.get('type')}): "
              f"the process was {message} while running this node. {_hint(signum)}", file=sys.stderr)
    else:
        print(f"ERROR: the run's process was {message}. {_hint(signum)}", file=sys.stderr)
    if events_path:
        _append_events(events_path, node, message, signum)
    return EXIT_FAILED


def _read_notes(r: int, notes: list[dict]) -> None:
    with os.fdopen(r, "rb") as stream:
        for line in stream:
            try:
                notes.append(json.loads(line))
            except ValueError:
                pass


def _running_node(notes: list[dict]) -> dict | None:
    running: dict[str, dict] = {}
    for n in notes:
        if "start" in n:
            running[n["start"]] = n
        elif "end" in n:
            running.pop(n["end"], None)
    return list(running.values())[-1] if running else None


def describe_signal(signum: int) -> str:
    try:
        return f"killed by signal {signal.Signals(signum).name}"
    except ValueError:
        return f"killed by signal {signum}"


def _hint(signum: int) -> str:
    if signum == signal.SIGKILL:
        return "Something outside it ended it, often the system running out of memory."
    if signum in (signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGABRT, signal.SIGILL):
        return ("That is a crash in native code (the node, a library it calls, or a damaged file it reads); "
                "the traceback above shows where.")
    return ""


def _append_events(path: str, node: dict | None, message: str, signum: int) -> None:
    now = time.time()
    run_id = node.get("run_id") if node else None
    events = []
    if node is not None:
        events.append({"event": "node_error", "run_id": run_id, "node": node["start"], "type": node.get("type"),
                       "title": node.get("title"), "t": now, "message": f"the process was {message} while running this node",
                       "error_type": "ProcessDied", "signal": signum, "traceback": ""})
    events.append({"event": "run_done", "run_id": run_id, "status": "error", "t": now,
                   "message": (f"node {node['start']}: " if node else "") + f"the process was {message}"})
    try:
        with open(path, "a", encoding="utf-8") as f:
            for e in events:
                f.write(json.dumps(e) + "\n")
    except OSError:
        pass
