"""TensorBoard logs that never take a training run down, nor print a thread's traceback.

TensorBoard writes its event file from a background thread. When the disk fills up (or the folder
goes away), that thread dies with a raw traceback on stderr, and every later ``add_scalar`` and the
final ``close`` raise the same error into training. Logs are a convenience: here the first failure
becomes one warning naming the folder and the cause, and logging stops; training goes on.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

_hook_lock = threading.Lock()
_installed = False


def _is_tensorboard_thread(thread: threading.Thread | None) -> bool:
    return thread is not None and type(thread).__module__.startswith("tensorboard.")


def _install_thread_hook() -> None:
    """Silence tensorboard's writer threads only: the error comes back to the writer, which warns."""
    global _installed
    with _hook_lock:
        if _installed:
            return
        previous = threading.excepthook

        def hook(args) -> None:
            if _is_tensorboard_thread(args.thread) and issubclass(args.exc_type, Exception):
                return  # the guarded writer reports it once (the thread keeps it as .exception)
            previous(args)

        threading.excepthook = hook
        _installed = True


class GuardedWriter:
    """A ``SummaryWriter`` whose failures turn into one ``warn(message)`` and then silence."""

    def __init__(self, logdir: str | Path, warn: Callable[[str], None]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _install_thread_hook()
        self.logdir = Path(logdir)
        self._warn = warn
        self._writer = None
        self.failed: str | None = None
        self._guard(lambda: setattr(self, "_writer", SummaryWriter(str(self.logdir))))

    def _guard(self, fn: Callable[[], Any]) -> None:
        if self.failed is not None:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - any failure of the logs is reported the same way
            self._fail(e)

    def _fail(self, e: BaseException) -> None:
        from app.atomic import disk_full

        cause = "no space left on device" if disk_full(e) or getattr(e, "errno", None) == 28 else (
            getattr(e, "strerror", None) or str(e) or type(e).__name__)
        self.failed = cause
        self._warn(f"TensorBoard logs stopped: {cause} while writing {self.logdir}; training goes on")
        writer, self._writer = self._writer, None
        if writer is not None:
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - it already failed once; nothing more to say
                pass

    def add_scalar(self, *args, **kwargs) -> None:
        self._guard(lambda: self._writer.add_scalar(*args, **kwargs))

    def add_image(self, *args, **kwargs) -> None:
        self._guard(lambda: self._writer.add_image(*args, **kwargs))

    def flush(self) -> None:
        self._guard(lambda: self._writer.flush())

    def close(self) -> None:
        writer = self._writer
        if writer is not None:
            self._guard(writer.close)
            if self.failed is None and _thread_error(writer) is not None:  # died after the last write
                self._fail(_thread_error(writer))
        self._writer = None


def _thread_error(writer) -> BaseException | None:
    """The exception tensorboard's writer thread died with, if any (kept by the thread)."""
    try:
        return writer.file_writer.event_writer._async_writer._worker.exception
    except AttributeError:
        return None
