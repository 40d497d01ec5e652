"""The event stream: one vocabulary for the editor, the CLI and `--events FILE.jsonl`.

    run_start    nodes (in run order), targets, titles
    node_start   node, type, title, index, count
    node_cached  node, ...            (its outputs came from the cache)
    progress     node, value, total, text
    metric       node, values {loss, lr, steps_per_s, eta_s, memory_mb, step, epoch, ...}
    preview      node, kind ('images' | 'histogram' | 'table' | 'text'), payload
    log          node, level, message
    node_done    node, elapsed_s
    node_error   node, message, error_type, traceback
    node_cancelled node
    resumable    node, param, path    (a stopped node left a backup: set param to path to continue)
    run_done     status ('done' | 'error' | 'cancelled' | 'invalid'), elapsed_s, message
    worker_ready / worker_died / worker_exit   (from the worker process and its client)

Events are plain dicts of msgpack-safe values (bytes for image data). Every event has `event`,
`run_id` (inside a run) and `t` (unix time).
"""

from __future__ import annotations

import base64
import json
import math
from typing import IO, Any


def jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$base64": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class JsonlWriter:
    """Writes each event as one JSON line, flushed, so a crash leaves a readable log."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream

    def __call__(self, event: dict) -> None:
        self.stream.write(json.dumps(jsonable(event), ensure_ascii=False, default=str) + "\n")
        self.stream.flush()


class Fanout:
    def __init__(self, *sinks) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def __call__(self, event: dict) -> None:
        for sink in self.sinks:
            sink(event)
