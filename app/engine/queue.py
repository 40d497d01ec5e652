"""The run queue: runs wait their turn in one JSON file that survives a restart of the editor or the
machine, and one runner works through them in order.

    launch.py queue add RECIPE [--set ...] [--sweep ...] [--workspace DIR]
    launch.py queue list | cancel ID | move ID POS | resume ID | run

The file is ``./workspace/.queue/queue.json`` (``$NODETRAINER_QUEUE`` names another). Every change is
a read-modify-write under a lock file beside it and is written atomically (app/atomic.py), so the
editor, ``queue add`` in a terminal and the runner can all change it at once and a crash never leaves
half a file.

An entry keeps the recipe snapshot it was added with (overrides applied, input paths absolute: later
edits of the recipe file do not change a queued run), its workspace, its state (queued, running,
done, failed, cancelled, interrupted), start and end times, exit code, the last loss, progress and
ETA. The runner (``queue run``) runs the entries in ONE executor that keeps its outputs, so runs that
share their upstream (a sweep's variants) load, scan and bucket once. It writes each run's recipe to
``<workspace>/recipe.json`` and its events to ``<workspace>/events.jsonl``.

A runner that dies (kill -9, a power cut) leaves its entry 'running' with a pid that no longer lives;
whoever reads the queue next marks it 'interrupted'. ``queue resume ID`` queues it again, first in
line, continuing from the newest backup in its workspace (TrainLoop's ``resume_from``).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

from app.engine.workspace import _alive

QUEUE_ENV = "NODETRAINER_QUEUE"
STATES = ("queued", "running", "done", "failed", "cancelled", "interrupted")
FINISHED = ("done", "failed", "cancelled", "interrupted")
EXIT_CODES = {"done": 0, "error": 1, "invalid": 2, "cancelled": 130}


class QueueError(ValueError):
    """A queue request that cannot be done (unknown id, wrong state, no backup...)."""


def default_path() -> Path:
    return Path(os.environ.get(QUEUE_ENV) or Path("workspace") / ".queue" / "queue.json")


def _now() -> float:
    return round(time.time(), 3)


class RunQueue:
    """The queue file. Every method reads the file, changes it and writes it back under the lock."""

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = Path(path) if path else default_path()

    # ---- storage -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(self.path.name + ".lock"), "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"format_version": 1, "next_id": 1, "entries": [], "runner": None}
        except OSError as e:
            raise QueueError(f"cannot read the queue {self.path}: {e.strerror or e}") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
                raise ValueError("no list of entries")
        except ValueError as e:
            raise QueueError(f"the queue file {self.path} is damaged ({e}); move it away to start a new "
                             f"queue (nothing else reads it)") from None
        data.setdefault("next_id", 1 + max((int(e.get("id", 0)) for e in data["entries"]), default=0))
        data.setdefault("runner", None)
        return data

    def _write(self, data: dict) -> None:
        from app.graph.recipe import atomic_write_text

        atomic_write_text(self.path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")

    @contextlib.contextmanager
    def edit(self):
        """``with q.edit() as data:`` change ``data``; written back when the block ends without error."""
        with self._locked():
            data = self._read()
            _mark_dead(data)
            yield data
            self._write(data)

    # ---- reading -------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """All entries in queue order; a running entry whose runner is gone is marked interrupted
        (the file is written only then: the editor reads it every second)."""
        if not self.path.exists():
            return []
        with self._locked():
            data = self._read()
            if _mark_dead(data):
                self._write(data)
            return [dict(e) for e in data["entries"]]

    def get(self, entry_id) -> dict:
        for e in self.entries():
            if str(e["id"]) == str(entry_id):
                return e
        raise QueueError(f"no entry {entry_id} in the queue {self.path} ('launch.py queue list' shows them)")

    # ---- changing ------------------------------------------------------------------------------
    def add(self, recipe: dict, *, source: str, recipe_dir: str, workspace: str, sets=(), sweep: str | None = None,
            allow_output=(), title: str = "") -> dict:
        with self.edit() as data:
            workspace = _unique_workspace(data, str(Path(workspace).resolve()))
            entry = {"id": data["next_id"], "title": title or Path(source).stem, "source": str(source),
                     "recipe_dir": str(recipe_dir), "workspace": workspace, "sets": list(sets), "sweep": sweep,
                     "allow_output": [str(Path(d).resolve()) for d in allow_output], "state": "queued",
                     "created": _now(), "started": None, "ended": None, "exit_code": None, "pid": None,
                     "host": None, "last_loss": None, "step": None, "total": None, "eta_s": None,
                     "node": None, "message": "", "recipe": recipe}
            data["next_id"] += 1
            data["entries"].append(entry)
            return dict(entry)

    def cancel(self, entry_id) -> dict:
        """A queued run is cancelled at once; a running one is asked to stop (the runner stops it at its
        next check and TrainLoop leaves a backup to resume from)."""
        with self.edit() as data:
            e = _find(data, entry_id, self.path)
            if e["state"] == "queued":
                e["state"], e["ended"], e["message"] = "cancelled", _now(), "cancelled before it started"
            elif e["state"] == "running":
                e["cancel_requested"] = True
                e["message"] = "stopping..."
            else:
                raise QueueError(f"entry {entry_id} is already {e['state']}: nothing to cancel")
            return dict(e)

    def move(self, entry_id, position: int) -> list[dict]:
        """Put an entry at ``position`` (1 = first) of the queue list."""
        with self.edit() as data:
            e = _find(data, entry_id, self.path)
            data["entries"].remove(e)
            index = max(0, min(int(position) - 1, len(data["entries"])))
            data["entries"].insert(index, e)
            return [dict(x) for x in data["entries"]]

    def remove(self, entry_id) -> None:
        with self.edit() as data:
            e = _find(data, entry_id, self.path)
            if e["state"] == "running":
                raise QueueError(f"entry {entry_id} is running: cancel it first")
            data["entries"].remove(e)

    def resume(self, entry_id) -> dict:
        """Queue an interrupted, cancelled or failed run again, first in line, continuing from the newest
        backup in its workspace. Raises QueueError when it has no backup."""
        with self.edit() as data:
            e = _find(data, entry_id, self.path)
            if e["state"] not in ("interrupted", "cancelled", "failed"):
                raise QueueError(f"entry {entry_id} is {e['state']}: only an interrupted, cancelled or failed run "
                                 f"can be resumed")
            found = latest_backup(Path(e["workspace"]), e["recipe"])
            if found is None:
                raise QueueError(f"entry {entry_id}: no backup in {e['workspace']} to resume from. TrainLoop makes "
                                 f"backups every 'backup_every' (and one when a run is stopped, not when it is "
                                 f"killed); 'launch.py queue add' runs it again from the start")
            nid, backup = found
            e["recipe"]["nodes"][nid]["params"]["resume_from"] = str(backup)
            e["sets"] = [s for s in e["sets"] if ".resume_from=" not in s] + [f"{nid}.resume_from={backup}"]
            e.update(state="queued", started=None, ended=None, exit_code=None, pid=None, eta_s=None,
                     message=f"resumes from {backup}", resumed_from=str(backup))
            e.pop("cancel_requested", None)
            data["entries"].remove(e)
            first = next((i for i, x in enumerate(data["entries"]) if x["state"] == "queued"), len(data["entries"]))
            data["entries"].insert(first, e)
            return dict(e)

    def update(self, entry_id, **fields) -> dict:
        with self.edit() as data:
            e = _find(data, entry_id, self.path)
            e.update(fields)
            return dict(e)

    def claim_next(self) -> dict | None:
        """The first queued entry, marked running by this process; None when nothing is queued."""
        with self.edit() as data:
            for e in data["entries"]:
                if e["state"] == "queued":
                    e.update(state="running", started=_now(), pid=os.getpid(), host=socket.gethostname(),
                             message="", ended=None, exit_code=None)
                    return dict(e)
        return None

    def take_runner(self) -> None:
        """One runner per queue: refuse when a live one holds it."""
        with self.edit() as data:
            r = data.get("runner")
            if r and r.get("pid") != os.getpid() and _same_host(r) and _alive(int(r.get("pid") or 0)):
                raise QueueError(f"a queue runner is already working on {self.path} (pid {r['pid']}, started "
                                 f"{time.strftime('%H:%M:%S', time.localtime(r.get('started', 0)))})")
            data["runner"] = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}

    def release_runner(self) -> None:
        with self.edit() as data:
            if (data.get("runner") or {}).get("pid") == os.getpid():
                data["runner"] = None


def _find(data: dict, entry_id, path) -> dict:
    for e in data["entries"]:
        if str(e["id"]) == str(entry_id):
            return e
    raise QueueError(f"no entry {entry_id} in the queue {path} ('launch.py queue list' shows them)")


def _same_host(entry: dict) -> bool:
    return not entry.get("host") or entry.get("host") == socket.gethostname()


def _mark_dead(data: dict) -> bool:
    """A running entry whose runner process is gone was interrupted (kill -9, crash, power cut).
    True when something changed."""
    changed = False
    for e in data["entries"]:
        if e.get("state") == "running" and _same_host(e) and not _alive(int(e.get("pid") or 0)):
            changed = True
            e.update(state="interrupted", ended=e.get("ended") or _now(), exit_code=None,
                     message=f"the runner (pid {e.get('pid')}) ended during the run; 'launch.py queue resume "
                             f"{e['id']}' continues from its newest backup")
    r = data.get("runner")
    if r and _same_host(r) and not _alive(int(r.get("pid") or 0)):
        data["runner"] = None
        changed = True
    return changed


def _unique_workspace(data: dict, workspace: str) -> str:
    """Two waiting runs never share a workspace (they would overwrite each other's outputs)."""
    taken = {e["workspace"] for e in data["entries"] if e["state"] in ("queued", "running")}
    candidate, n = workspace, 2
    while candidate in taken:
        candidate, n = f"{workspace}-{n}", n + 1
    return candidate


def latest_backup(workspace: Path, recipe: dict) -> tuple[str, Path] | None:
    """(TrainLoop node id, newest backup folder) in a workspace, by the time in its backup.json."""
    best = None
    for nid, node in (recipe.get("nodes") or {}).items():
        if node.get("type") != "TrainLoop":
            continue
        for meta in (workspace / f"TrainLoop_{nid}" / "backups").glob("*/backup.json"):
            try:
                info = json.loads(meta.read_text(encoding="utf-8"))
                t, step = float(info.get("time", 0)), int(info.get("step", 0))
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if step > 0 and (best is None or (t, step) > best[0]):
                best = ((t, step), nid, meta.parent)
    return None if best is None else (best[1], best[2])


# ---- the runner --------------------------------------------------------------------------------

class _Progress:
    """Turns a run's events into the entry's progress fields, written at most every ``every_s``."""

    def __init__(self, queue: RunQueue, entry_id, every_s: float = 1.0) -> None:
        self.queue, self.id, self.every_s = queue, entry_id, every_s
        self.fields: dict = {}
        self.types: dict[str, str] = {}  # node id -> type, from node_start
        self.last_write = 0.0

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "node_start":
            self.fields["node"] = event.get("title")
            self.types[event.get("node")] = event.get("type")
        elif kind == "progress" and event.get("total") and self.types.get(event.get("node")) == "TrainLoop":
            self.fields.update(step=event.get("value"), total=event.get("total"))  # training steps, not samples
        elif kind == "metric":
            values = event.get("values") or {}
            if values.get("loss") is not None:
                self.fields["last_loss"] = float(values["loss"])
            if values.get("eta_s") is not None:
                self.fields["eta_s"] = float(values["eta_s"])
            if values.get("validation_loss") is not None:
                self.fields["validation_loss"] = float(values["validation_loss"])
        else:
            return
        if time.monotonic() - self.last_write >= self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.fields:
            self.queue.update(self.id, **self.fields)
            self.fields = {}
        self.last_write = time.monotonic()


def run_queue(queue: RunQueue, registry, *, reporter=None, once: bool = False, poll_s: float = 0.5,
              stop: threading.Event | None = None) -> int:
    """Run queued entries in order until none is left (or ``stop`` is set). Returns how many ran.
    ``reporter(entry)`` gives an extra event sink for an entry (the console)."""
    from app.engine.events import Fanout, JsonlWriter
    from app.engine.executor import Executor
    from app.engine.sweep import RECIPE_NAME, write_recipe
    from app.graph.recipe import parse_recipe

    stop = stop or threading.Event()
    executor = Executor(registry, keep_outputs=True)
    queue.take_runner()
    ran = 0
    try:
        while not stop.is_set():
            entry = queue.claim_next()
            if entry is None:
                break
            ran += 1
            ws = Path(entry["workspace"])
            executor.allow_output = list(entry.get("allow_output") or [])
            done = threading.Event()

            def watch(entry_id=entry["id"], done=done):  # a 'queue cancel' from elsewhere, or the runner's stop
                while not done.wait(poll_s):
                    try:
                        wanted = stop.is_set() or queue.get(entry_id).get("cancel_requested")
                    except QueueError:  # the entry was removed
                        wanted = True
                    if wanted:
                        executor.cancel()
                        return

            watcher = threading.Thread(target=watch, daemon=True, name="queue-cancel-watch")
            watcher.start()
            progress = _Progress(queue, entry["id"])
            status, message = "error", ""
            ws.mkdir(parents=True, exist_ok=True)
            try:
                write_recipe(entry["recipe"], ws / RECIPE_NAME)  # what ran, beside its outputs (compare reads it)
                graph, problems = parse_recipe(entry["recipe"], entry["source"], registry)
                if problems:
                    status, message = "invalid", "; ".join(map(str, problems))
                else:
                    with open(ws / "events.jsonl", "a", encoding="utf-8") as events:
                        emit = Fanout(progress, JsonlWriter(events), reporter(entry) if reporter else None)
                        result = executor.run(graph, None, emit=emit, recipe_dir=entry["recipe_dir"], workspace=ws)
                    status = result.status
                    message = result.error or "; ".join(map(str, result.problems))
            except Exception as e:  # a broken snapshot must not stop the rest of the queue
                status, message = "error", f"{type(e).__name__}: {e}"
            finally:
                done.set()
                watcher.join(timeout=5)
            progress.flush()
            current = queue.get(entry["id"])
            if status == "cancelled":
                state = "cancelled" if current.get("cancel_requested") else "interrupted"
                message = message or ("stopped by 'queue cancel'" if state == "cancelled" else "the runner was stopped")
            else:
                state = {"done": "done"}.get(status, "failed")
            queue.update(entry["id"], state=state, ended=_now(), exit_code=EXIT_CODES.get(status, 1),
                         message=message, pid=None, cancel_requested=False)
            if once:
                break
    finally:
        queue.release_runner()
    return ran


# ---- presentation ------------------------------------------------------------------------------

def fmt_duration(s) -> str:
    if s is None:
        return ""
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def describe(e: dict) -> dict:
    """The columns the CLI and the editor show."""
    progress = f"{e['step']}/{e['total']}" if e.get("step") is not None and e.get("total") else ""
    if e.get("started"):
        elapsed = (e.get("ended") or time.time()) - e["started"]
    else:
        elapsed = None
    loss = f"{e['last_loss']:.4f}" if isinstance(e.get("last_loss"), (int, float)) else ""
    return {"id": str(e["id"]), "state": e["state"] + ("*" if e.get("cancel_requested") else ""),
            "title": e.get("title", ""), "progress": progress,
            "eta": fmt_duration(e.get("eta_s")) if e["state"] == "running" else "",
            "elapsed": fmt_duration(elapsed), "loss": loss,
            "exit": "" if e.get("exit_code") is None else str(e["exit_code"]),
            "workspace": e["workspace"], "message": e.get("message", "")}


def table(entries: list[dict]) -> str:
    cols = ("id", "state", "title", "progress", "eta", "elapsed", "loss", "exit", "workspace")
    rows = [describe(e) for e in entries]
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in cols}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in cols).rstrip()]
    for r in rows:
        lines.append("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
        if r["message"] and r["state"] in ("failed", "interrupted", "cancelled"):
            lines.append(f"      {r['message']}")
    return "\n".join(lines)
