"""The worker process: a long-lived engine that keeps its output cache between runs.

The editor (which never imports torch) starts it through WorkerClient and talks to it with
msgpack frames: commands in (run, cancel, shutdown, clear_cache, ping), events out. A node that
crashes this process (an exception is caught; os._exit or a segfault is not) ends only this
process: the client reports it on the node that was running and can start a fresh worker.

    python -m app.engine.worker --in-fd R --out-fd W [--nodes-dir DIR ...]
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
import traceback

from app.engine.executor import Executor
from app.engine.protocol import FrameWriter, read_frame
from app.graph.problems import RecipeError
from app.graph.recipe import parse_recipe
from app.graph.registry import load_registry


def serve(cmd_in, events_out, nodes_dirs=(), keep_outputs: bool = True, threads: tuple[int, str] | None = None) -> int:
    writer = FrameWriter(events_out)
    registry = load_registry(nodes_dirs)
    executor = Executor(registry, keep_outputs=keep_outputs)
    jobs: queue.Queue = queue.Queue()

    def emit(event: dict) -> None:
        try:
            writer.write(event)
        except (BrokenPipeError, OSError):
            executor.cancel()  # the parent is gone: stop at the next check

    def read_commands() -> None:
        while True:
            try:
                msg = read_frame(cmd_in)
            except Exception:
                msg = None
            if msg is None or msg.get("cmd") == "shutdown":
                executor.cancel()
                jobs.put(None)
                return
            cmd = msg.get("cmd")
            if cmd == "cancel":
                executor.cancel()
            elif cmd == "ping":
                emit({"event": "pong", "id": msg.get("id")})
            else:
                jobs.put(msg)

    threading.Thread(target=read_commands, name="worker-commands", daemon=True).start()
    emit({"event": "worker_ready", "pid": os.getpid(), "node_types": len(registry),
          "plugin_problems": [str(p) for p in registry.problems],
          "threads": threads[0] if threads else None, "threads_why": threads[1] if threads else ""})
    while True:
        msg = jobs.get()
        if msg is None:
            break
        try:
            handle(msg, executor, registry, emit)
        except Exception as e:  # never let one bad command end the worker
            emit({"event": "run_done", "run_id": msg.get("run_id"), "status": "error",
                  "message": f"worker: {type(e).__name__}: {e}", "traceback": traceback.format_exc()})
    emit({"event": "worker_exit"})
    return 0


def handle(msg: dict, executor: Executor, registry, emit) -> None:
    cmd = msg.get("cmd")
    run_id = msg.get("run_id")
    if cmd == "clear_cache":
        executor.clear_cache()
        emit({"event": "cache_cleared"})
        return
    if cmd != "run":
        emit({"event": "log", "level": "warning", "message": f"worker: unknown command {cmd!r}"})
        return
    try:
        graph, problems = parse_recipe(msg.get("recipe"), msg.get("source") or "recipe", registry)
    except RecipeError as e:
        emit({"event": "run_done", "run_id": run_id, "status": "invalid", "message": str(e), "problems": []})
        return
    if problems:
        emit({"event": "run_done", "run_id": run_id, "status": "invalid",
              "problems": [p.to_dict() for p in problems], "message": "; ".join(map(str, problems))})
        return
    executor.run(graph, msg.get("targets") or None, emit=emit, recipe_dir=msg.get("recipe_dir"),
                 workspace=msg.get("workspace"), run_id=run_id)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="nodetrainer-worker")
    ap.add_argument("--in-fd", type=int, required=True)
    ap.add_argument("--out-fd", type=int, required=True)
    ap.add_argument("--nodes-dir", action="append", default=[])
    ap.add_argument("--one-shot", action="store_true", help="one recipe run: cache nothing, free outputs after use")
    ap.add_argument("--reserve-cores", type=int, default=0, help="cores to leave free (the editor's render loop)")
    args = ap.parse_args(argv)
    cmd_in = os.fdopen(args.in_fd, "rb", buffering=0)
    events_out = os.fdopen(args.out_fd, "wb", buffering=0)
    # Node code that prints must not corrupt anything: stdout goes to stderr (the worker log).
    sys.stdout = sys.stderr
    threads = _apply_threads(args.reserve_cores)
    return serve(cmd_in, events_out, args.nodes_dir, keep_outputs=not args.one_shot, threads=threads)


def _apply_threads(reserve: int) -> tuple[int, str]:
    """The CLI's thread policy (app/engine/threads.py), set before any node makes torch work."""
    from app.engine import threads

    try:
        return threads.apply(reserve=reserve)
    except ValueError as e:  # a malformed override: say so in the worker log, use the free cores
        print(f"worker: ignoring {e}", file=sys.stderr)
        return threads.apply(reserve=reserve, environ={})


if __name__ == "__main__":
    sys.exit(main())
