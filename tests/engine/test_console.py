"""The terminal progress line: its time-left estimate ignores set-up time before the first step."""

import io

import app.engine.console as console


def started(monkeypatch, title):
    """A reporter on a fake clock, with node 7 started at t = 0."""
    clock = [0.0]
    monkeypatch.setattr(console.time, "monotonic", lambda: clock[0])
    stream = io.StringIO()
    r = console.ConsoleReporter(stream)
    r({"event": "node_start", "node": "7", "index": 0, "count": 1, "title": title})

    def bars():
        return [line for line in stream.getvalue().splitlines() if "%" in line]

    return r, clock, bars


def test_eta_uses_the_rate_since_the_first_report_not_the_node_start(monkeypatch):
    r, clock, bars = started(monkeypatch, "Work")
    clock[0] += 60  # a minute of set-up (loading, a "before" sample) before the first step
    r({"event": "progress", "node": "7", "value": 1, "total": 101})
    clock[0] += 10  # then 10 steps in 10 s: 90 steps = 90 s left
    r({"event": "progress", "node": "7", "value": 11, "total": 101})
    first, last = bars()
    assert "1:00<?" in first and "1:10<1:30" in last, bars()


def test_eta_prefers_the_nodes_own_estimate(monkeypatch):
    r, clock, bars = started(monkeypatch, "TrainLoop")
    clock[0] += 5
    r({"event": "metric", "node": "7", "values": {"loss": 0.5, "steps_per_s": 2.0, "eta_s": 125.0}})
    r({"event": "progress", "node": "7", "value": 3, "total": 253})
    assert "0:05<2:05" in bars()[-1] and "loss 0.5000" in bars()[-1]
