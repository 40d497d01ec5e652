"""How many CPU threads torch may use for one run: the one policy of the CLI, the worker and the editor.

torch's default is one compute thread per core. On a machine that is busy with something else, those
threads spin-wait for cores they do not get, and a small model runs many times slower (the tiny demo
took 384 s instead of 33 s). So a run uses at most the cores that are free when it starts: the cores
this process may run on (``os.sched_getaffinity``) minus the load already on them (the 1-minute load
average), minus any it should leave to someone else (the editor keeps one for its render loop), and at
least one. ``NODETRAINER_THREADS=N`` or an explicit ``OMP_NUM_THREADS=N`` overrides that.

Imports no torch until ``apply`` is called, so the editor's side can use it too.
"""

from __future__ import annotations

import os
from typing import Mapping

OVERRIDE_VARS = ("NODETRAINER_THREADS", "OMP_NUM_THREADS")
_applied_interop = False


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def current_load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _override(environ: Mapping[str, str]) -> tuple[int, str] | None:
    for var in OVERRIDE_VARS:
        value = (environ.get(var) or "").strip()
        if not value:
            continue
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"{var}={value!r}: expected a whole number of threads (e.g. {var}=2)") from None
        if n < 1:
            raise ValueError(f"{var}={value!r}: at least 1 thread")
        return n, f"{var}={n}"
    return None


def thread_count(*, reserve: int = 0, environ: Mapping[str, str] | None = None, cores: int | None = None,
                 load: float | None = None) -> tuple[int, str]:
    """(threads, why). ``reserve``: cores to leave free for this program's other work (the editor's
    render loop). Under ``accelerate launch`` the free cores are shared by the processes of this machine."""
    environ = os.environ if environ is None else environ
    explicit = _override(environ)
    if explicit is not None:
        return explicit
    cores = available_cores() if cores is None else cores
    load = current_load() if load is None else load
    busy = int(load + 0.5)
    free = max(1, cores - busy - reserve)
    local = max(1, int(environ.get("LOCAL_WORLD_SIZE") or 1))
    n = max(1, free // local)
    why = f"{cores} core(s), load {load:.1f}" + (f", {reserve} kept for the editor" if reserve else "") \
        + (f", shared by {local} processes" if local > 1 else "")
    return n, why


def apply(*, reserve: int = 0, environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Set torch's thread counts for this process; call before torch does any work.

    Compute threads can change at any time; inter-op threads only once, before any parallel work
    (torch raises afterwards), so a second call leaves them alone.
    """
    global _applied_interop
    n, why = thread_count(reserve=reserve, environ=environ)
    import torch

    torch.set_num_threads(n)
    if not _applied_interop:
        _applied_interop = True
        try:
            torch.set_num_interop_threads(max(1, min(n, 4)))
        except RuntimeError:
            pass  # torch already ran parallel work in this process: it keeps its pool
    return n, why
