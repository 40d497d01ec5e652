"""The executor: runs what the targets need, in topological order, reusing cached outputs.

Cache key = node type + version + params (+ a fingerprint of the files a node reads) + the keys of
its inputs, recursively. So changing a Sample prompt re-runs Sample only, while changing a LoRA rank
re-runs LoRAInject and everything downstream of it. Pure nodes are cached; side-effect nodes (they
write files) always run. Cached outputs are frozen so no consumer can change them.

A one-shot run (``launch.py run``: ``keep_outputs=False``) caches nothing and lets go of each output
once its last reader has it, so memory holds only what is still needed. There a node may ask
``ctx.exclusive(obj)``: when no value that a later node reads (or the run returns) holds ``obj``,
the node may change it in place instead of copying it (TrainLoop trains the LoRAInject adapter or
the loaded UNet itself, rather than a second copy of it).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import networkx as nx

from app.engine.context import NodeContext
from app.engine.errors import Cancelled
from app.engine.workspace import WorkspaceBusy, WorkspaceLock, clean_debris, debris_note
from app.engine.freeze import freeze
from app.graph.confine import ensure_inside, strict_for, writes
from app.graph.model import Graph
from app.graph.problems import Problem
from app.graph.recipe import to_data
from app.graph.spec import NodeSpec
from app.graph.validate import _id_key, effective_params, validate

Emit = Callable[[dict], None]


@dataclass
class RunResult:
    status: str  # "done", "error", "cancelled" or "invalid"
    run_id: str
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # node id -> output name -> value
    executed: list[str] = field(default_factory=list)
    cached: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    error_node: str | None = None
    error: str | None = None


class Executor:
    """Holds the output cache between runs; the worker keeps one Executor for its whole life."""

    def __init__(self, registry, *, keep_outputs: bool = True, allow_output=()) -> None:
        self.keep_outputs = keep_outputs  # False: a one-shot run (nothing cached, outputs freed after use)
        # folders outside the workspace the user allows writes to (--allow-output; the environment's
        # NODETRAINER_ALLOW_OUTPUT is read as well): a recipe writes nowhere else
        self.allow_output = [str(d) for d in allow_output]
        self.registry = registry
        self.cache: dict[str, tuple] = {}  # cache key -> frozen outputs
        self.node_keys: dict[str, str] = {}  # node id -> key of its latest outputs
        self.cancel_event = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        self.cancel_event.set()

    def clear_cache(self) -> None:
        self.cache.clear()
        self.node_keys.clear()

    # ---- planning ----------------------------------------------------------------------------
    def plan(self, graph: Graph, targets: list[str] | None = None) -> list[str]:
        """The targets and their ancestors in topological order (ties broken by node id)."""
        g = nx.DiGraph()
        g.add_nodes_from(graph.nodes)
        g.add_edges_from((l.from_node, l.to_node) for l in graph.links)
        targets = list(targets) if targets else graph.sinks()
        needed = set(targets)
        for t in targets:
            needed |= nx.ancestors(g, t)
        return list(nx.lexicographical_topological_sort(g.subgraph(needed), key=_id_key))

    def keys(self, graph: Graph, order: list[str], recipe_dir: Path | None = None,
             workspace: Path | None = None) -> dict[str, str]:
        keys: dict[str, str] = {}
        for nid in order:
            node = graph.nodes[nid]
            spec = self.registry.get(node.type)
            params = resolve_paths(effective_params(node, spec), spec, recipe_dir, workspace)
            inputs = {}
            for sock in spec.sockets:
                links = sorted(graph.links_into(nid, sock.name), key=lambda l: l.id)
                inputs[sock.name] = [f"{keys[l.from_node]}:{l.from_output}" for l in links]
            payload = {"type": spec.type, "version": spec.version, "params": params, "inputs": inputs}
            if spec.fingerprint is not None:
                try:
                    payload["files"] = spec.fingerprint(params)
                except Exception:  # a missing folder: let the node itself report it when it runs
                    payload["files"] = uuid.uuid4().hex
            blob = json.dumps(payload, sort_keys=True, ensure_ascii=True, default=str)
            keys[nid] = hashlib.sha256(blob.encode()).hexdigest()
        return keys

    # ---- running -----------------------------------------------------------------------------
    def run(self, graph: Graph, targets: list[str] | None = None, *, emit: Emit | None = None,
            recipe_dir: str | Path | None = None, workspace: str | Path | None = None,
            run_id: str | None = None) -> RunResult:
        with self._lock:  # one run at a time per executor
            return self._run(graph, targets, emit or (lambda e: None), Path(recipe_dir) if recipe_dir else None,
                             Path(workspace) if workspace else Path("workspace"), run_id or uuid.uuid4().hex[:12])

    def _run(self, graph: Graph, targets, emit_raw: Emit, recipe_dir: Path | None, workspace: Path,
             run_id: str) -> RunResult:
        """Validate, then run while holding the workspace (one run per workspace; debris of a killed
        run removed first, this run's own on every way out)."""
        def emit(event: dict) -> None:
            event.setdefault("run_id", run_id)
            event.setdefault("t", time.time())
            emit_raw(event)

        result = RunResult("invalid", run_id)
        problems = validate(graph, self.registry, workspace=workspace, recipe_dir=recipe_dir,
                            allow_output=self.allow_output)
        for t in targets or []:
            if t not in graph.nodes:
                problems.append(Problem(None, None, f"target {t!r} is not a node of this recipe"))
        if problems:
            result.problems = problems
            emit({"event": "run_done", "status": "invalid", "problems": [p.to_dict() for p in problems],
                  "message": "; ".join(map(str, problems))})
            return result
        if not _main_process():  # accelerate's other processes write nothing of their own here
            return self._run_nodes(graph, targets, emit, recipe_dir, workspace, run_id, result)
        recipe = graph.meta.get("title") if isinstance(graph.meta.get("title"), str) else ""
        lock = WorkspaceLock(workspace, recipe=recipe or str(recipe_dir or ""), run_id=run_id)
        try:
            lock.acquire()
        except (WorkspaceBusy, OSError) as e:
            result.status, result.error = "error", str(e)
            emit({"event": "log", "level": "error", "message": str(e)})
            emit({"event": "run_done", "status": "error", "message": str(e), "executed": [], "cached": []})
            return result
        held: list[dict] = []  # run_done waits until the workspace is free: a next run may follow at once

        def emit_held(event: dict) -> None:
            (held.append if event.get("event") == "run_done" else emit)(event)

        try:
            for note in lock.notes:
                emit({"event": "log", "level": "warning", "message": note})
            count, freed = clean_debris(workspace)
            if count:
                emit({"event": "log", "level": "info", "message": debris_note(count, freed)})
            return self._run_nodes(graph, targets, emit_held, recipe_dir, workspace, run_id, result)
        finally:
            clean_debris(workspace)  # temp files of this run that an interrupted write left
            lock.release()
            for event in held:
                emit(event)

    def _run_nodes(self, graph: Graph, targets, emit: Emit, recipe_dir: Path | None, workspace: Path,
                   run_id: str, result: RunResult) -> RunResult:
        self.cancel_event.clear()
        t_run = time.perf_counter()
        order = self.plan(graph, targets)
        keys = self.keys(graph, order, recipe_dir, workspace)
        recipe_data = to_data(graph)
        emit({"event": "run_start", "nodes": order, "targets": list(targets or graph.sinks()),
              "titles": {nid: graph.label(nid) for nid in order}})
        values: dict[str, list] = {}
        status = "done"
        # outputs still to be read by a later node of this run, and the ones the run returns
        pinned = set(targets or graph.sinks())
        in_run = set(order)
        reads_left = Counter((l.from_node, l.from_output) for l in graph.links
                             if l.from_node in in_run and l.to_node in in_run)

        def live_values() -> list:
            out = [values[n] for n in pinned if n in values]
            out += [values[n][self._output_index(graph, n, o)] for (n, o), left in reads_left.items()
                    if left > 0 and n in values]
            return out

        def release(producer: str, output: str) -> None:
            """A one-shot run lets go of an output no later node reads and the run does not return."""
            if not self.keep_outputs and reads_left[(producer, output)] <= 0 and producer not in pinned:
                values[producer][self._output_index(graph, producer, output)] = None

        for index, nid in enumerate(order):
            node = graph.nodes[nid]
            spec: NodeSpec = self.registry.get(node.type)
            key = keys[nid]
            base = {"node": nid, "type": node.type, "title": node.label(), "index": index, "count": len(order)}
            if self.cancel_event.is_set():
                status = "cancelled"
                break
            if self.keep_outputs and spec.pure and key in self.cache:
                values[nid] = list(self.cache[key])
                self.node_keys[nid] = key
                result.cached.append(nid)
                emit({"event": "node_cached", **base})
                continue
            emit({"event": "node_start", **base})
            t0 = time.perf_counter()
            ctx = NodeContext(node_id=nid, node_type=node.type, title=node.label(), emit=emit,
                              cancel_event=self.cancel_event, workspace=workspace, recipe=recipe_data,
                              recipe_dir=recipe_dir, run_id=run_id,
                              live_values=None if self.keep_outputs else live_values)
            kwargs = resolve_paths(effective_params(node, spec), spec, recipe_dir, workspace)
            read: list[tuple[str, str]] = []
            for sock in spec.sockets:
                links = sorted(graph.links_into(nid, sock.name), key=lambda l: l.id)
                got = [values[l.from_node][self._output_index(graph, l.from_node, l.from_output)] for l in links]
                kwargs[sock.name] = got if sock.multi else (got[0] if got else None)
                read += [(l.from_node, l.from_output) for l in links]
            for producer, output in read:
                reads_left[(producer, output)] -= 1
            for producer, output in set(read):  # this node may now hold the last reference
                release(producer, output)
            try:
                self._confine(spec, kwargs, workspace)
                outputs = freeze(normalise_outputs(spec, spec.fn(ctx, **kwargs)))
            except Cancelled:
                emit({"event": "node_cancelled", **base, "elapsed_s": time.perf_counter() - t0})
                status = "cancelled"
                break
            except Exception as e:
                message = error_message(e)
                emit({"event": "node_error", **base, "message": message, "error_type": type(e).__name__,
                      "traceback": traceback.format_exc()})
                result.error_node, result.error = nid, f"node {nid} ({node.label()}): {message}"
                status = "error"
                break
            values[nid] = list(outputs)
            for out in spec.outputs:  # outputs no node of this run reads
                release(nid, out.name)
            result.executed.append(nid)
            if spec.pure and self.keep_outputs:
                self.cache[key] = outputs
                self.node_keys[nid] = key
            emit({"event": "node_done", **base, "elapsed_s": time.perf_counter() - t0})
        self._evict()
        result.status = status
        for nid in (targets or graph.sinks()):
            if nid in values:
                spec = self.registry.get(graph.nodes[nid].type)
                result.outputs[nid] = dict(zip((o.name for o in spec.outputs), values[nid]))
        done = {"event": "run_done", "status": status, "elapsed_s": time.perf_counter() - t_run,
                "executed": result.executed, "cached": result.cached}
        if result.error:
            done["message"] = result.error
        if status == "cancelled":
            done["message"] = "stopped by the user"
        emit(done)
        return result

    def _confine(self, spec: NodeSpec, kwargs: dict, workspace: Path) -> None:
        """Checked again as the node starts: a symlink made since validation cannot move a write."""
        for inp in spec.params:
            value = kwargs.get(inp.name)
            if writes(inp) and isinstance(value, str) and value and not _SCHEME.match(value):
                ensure_inside(value, workspace, self.allow_output, what=f"param {inp.name!r}", strict=strict_for(inp))

    def _output_index(self, graph: Graph, node_id: str, output: str) -> int:
        spec = self.registry.get(graph.nodes[node_id].type)
        return [o.name for o in spec.outputs].index(output)

    def _evict(self) -> None:
        """Keep only the latest outputs of each node, so memory holds one model per node, not a history."""
        live = set(self.node_keys.values())
        for key in [k for k in self.cache if k not in live]:
            del self.cache[key]


def normalise_outputs(spec: NodeSpec, value: Any) -> tuple:
    """A node returns a bare value for one output, or a tuple / name -> value dict for several."""
    names = [o.name for o in spec.outputs]
    if len(names) == 0:
        return ()
    if len(names) == 1:
        return (value,)
    if isinstance(value, dict) and set(value) == set(names):
        return tuple(value[n] for n in names)
    if isinstance(value, (tuple, list)) and len(value) == len(names):
        return tuple(value)
    raise TypeError(f"{spec.type} must return {len(names)} outputs ({', '.join(names)})")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # builtin:tiny-sd (two letters at least: not C:)


def resolve_paths(params: dict, spec: NodeSpec, recipe_dir: Path | None, workspace: Path | None = None) -> dict:
    """PATH params are stored relative to the recipe (outputs: to the workspace); nodes get
    absolute paths."""
    out = dict(params)
    for inp in spec.params:
        value = out.get(inp.name)
        if inp.type != "PATH" or not value or _SCHEME.match(value):
            continue
        p = Path(value).expanduser()
        base = workspace if inp.path_kind.startswith("output") else recipe_dir
        if not p.is_absolute() and base is not None:
            p = Path(base).resolve() / p
        out[inp.name] = str(p)
    return out


_PLAIN_ERRORS = (OSError, ValueError, KeyError, NotImplementedError, MemoryError)


def _main_process() -> bool:
    """False in the other processes of ``accelerate launch`` (they share the main one's workspace)."""
    import os

    rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    return not rank.isdigit() or int(rank) == 0


def error_message(e: BaseException) -> str:
    """User-facing errors speak for themselves; programming errors keep their type name."""
    text = str(e)
    if text and (isinstance(e, _PLAIN_ERRORS) or type(e).__name__ in ("NodeError", "DataError", "ModelLoadError")):
        return text
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
