"""Runs recipes in the worker process without ever making the render loop wait.

WorkerClient.start() blocks until the worker has loaded its catalogue, so starting (or restarting
after a crash) happens on a short-lived thread; the editor keeps drawing and polls events each
frame. A worker that died is replaced on the next run; its cache went with it.
"""

from __future__ import annotations

import queue
import threading
import time

from app.engine.client import WorkerClient, WorkerError


class Runner:
    def __init__(self, nodes_dirs=(), client_factory=WorkerClient) -> None:
        self.nodes_dirs = [str(d) for d in nodes_dirs]
        self.client_factory = client_factory
        self.client: WorkerClient | None = None
        self.local: queue.Queue = queue.Queue()  # events made here (start failures)
        self.thread: threading.Thread | None = None
        self.run_id: str | None = None

    @property
    def starting(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self, recipe: dict, *, source: str, recipe_dir: str, targets: list[str] | None,
              workspace: str) -> None:
        if self.starting:
            return
        self.run_id = None

        def go() -> None:
            try:
                if self.client is None:
                    self.client = self.client_factory(nodes_dirs=self.nodes_dirs)
                if not self.client.alive:
                    self.client.start()
                self.run_id = self.client.run(recipe, source=source, recipe_dir=recipe_dir,
                                              targets=targets or None, workspace=workspace)
            except (WorkerError, OSError) as e:
                self.local.put({"event": "run_done", "status": "error", "t": time.time(),
                                "message": f"could not start the worker: {e}"})

        self.thread = threading.Thread(target=go, name="worker-start", daemon=True)
        self.thread.start()

    def poll(self) -> list[dict]:
        out = []
        while True:
            try:
                out.append(self.local.get_nowait())
            except queue.Empty:
                break
        if self.client is not None:
            out.extend(self.client.poll())
        return out

    def cancel(self) -> None:
        if self.client is not None and self.client.alive:
            try:
                self.client.cancel()
            except WorkerError:
                pass

    def clear_cache(self) -> None:
        if self.client is not None and self.client.alive:
            try:
                self.client.clear_cache()
            except WorkerError:
                pass

    def shutdown(self) -> None:
        if self.thread is not None:
            self.thread.join(timeout=5)
        if self.client is not None:
            self.client.shutdown(timeout=3)
            self.client.kill()
