"""Length-prefixed msgpack frames over a pipe: 4 bytes big-endian length, then the msgpack body."""

from __future__ import annotations

import struct
import threading
from typing import IO, Any

import msgpack

MAX_FRAME = 512 * 1024 * 1024
_HEADER = struct.Struct(">I")


class FrameWriter:
    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, obj: Any) -> None:
        body = msgpack.packb(obj, use_bin_type=True, default=_fallback)
        if len(body) > MAX_FRAME:
            raise ValueError(f"message of {len(body)} bytes is too large for the worker pipe")
        with self.lock:
            self.stream.write(_HEADER.pack(len(body)) + body)
            self.stream.flush()


def read_frame(stream: IO[bytes]) -> Any | None:
    """The next message, or None at end of stream (the other side closed or died)."""
    header = _read_exact(stream, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ValueError(f"corrupt frame: length {length}")
    body = _read_exact(stream, length)
    if body is None:
        return None
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def _read_exact(stream: IO[bytes], n: int) -> bytes | None:
    chunks = []
    while n:
        chunk = stream.read(n)
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _fallback(obj: Any) -> Any:
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    if hasattr(obj, "__fspath__"):
        return str(obj)
    return repr(obj)
