"""Every long command answers Ctrl-C the same way: the first stops at the next check, the second at once."""
from __future__ import annotations

import signal

import pytest

from app.cli import _InterruptHandler, main


def test_queue_run_installs_the_one_ctrl_c_handler_and_restores_the_old(tmp_path, monkeypatch, capsys):
    installed = []
    real = signal.signal

    def record(signum, handler):
        if signum == signal.SIGINT:
            installed.append(handler)
        return real(signum, handler)

    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(signal, "signal", record)
    assert main(["queue", "--file", str(tmp_path / "queue.json"), "run", "--once"]) == 0
    handler = installed[0]
    assert isinstance(handler, _InterruptHandler)
    assert installed[-1] is before  # the previous handler is back
    handler(signal.SIGINT, None)  # first: asks the runner to stop at its next check
    assert "Ctrl-C again" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        handler(signal.SIGINT, None)  # second: stops now
