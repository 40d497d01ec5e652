"""Cheap fingerprints of files and folders a node reads (sizes and modification times, not
contents), so the executor's cache notices when a dataset or model changes on disk."""

from __future__ import annotations

import hashlib
import os

MAX_ENTRIES = 200_000


def path_fingerprint(path: str) -> str:
    if not path or ":" in path.split("/")[0] and not os.path.isabs(path) and not os.path.exists(path):
        return path  # empty, or builtin:...
    h = hashlib.sha256(os.path.abspath(path).encode())
    if os.path.isfile(path):
        st = os.stat(path)
        h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    elif os.path.isdir(path):
        count = 0
        top = os.path.realpath(path)
        seen: set[str] = set()
        for root, dirs, files in os.walk(path, followlinks=True):  # as Concept scans: linked folders count
            real = os.path.realpath(root)
            if real in seen or (real != top and top.startswith(real.rstrip(os.sep) + os.sep)):
                dirs[:] = []  # a folder read already, or one holding this one: a symlink loop
                continue
            seen.add(real)
            dirs.sort()
            for name in sorted(files):
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                h.update(f"{os.path.relpath(os.path.join(root, name), path)}:{st.st_size}:{st.st_mtime_ns};".encode())
                count += 1
                if count >= MAX_ENTRIES:
                    return h.hexdigest()
    else:
        h.update(b"missing")
    return h.hexdigest()
