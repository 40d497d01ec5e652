"""Executor overhead on a 50-node stub graph: ms per run, cold and fully cached (in-process and
through the worker). Not part of the test suite.

    python tests/bench/bench_executor.py
"""

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from app.engine.client import WorkerClient  # noqa: E402
from app.engine.executor import Executor  # noqa: E402
from app.graph.model import Graph  # noqa: E402
from app.graph.recipe import to_data  # noqa: E402
from app.graph.registry import Registry  # noqa: E402

STUBS = ROOT / "tests" / "stub_nodes"


def graph_50() -> Graph:
    """10 sources feeding a 40-node chain of multi-input adds: 50 nodes, 49+ links."""
    g = Graph()
    for i in range(1, 11):
        g.add_node("TestConst", 1, {"value": i}, node_id=str(i))
    prev = None
    for i in range(11, 51):
        g.add_node("TestAdd", 1, {"bias": 0}, node_id=str(i))
        g.add_link(str((i - 11) % 10 + 1), "out", str(i), "items")
        if prev:
            g.add_link(prev, "out", str(i), "items")
        prev = str(i)
    return g


def timed(fn, n):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return statistics.median(out)


def main():
    reg = Registry()
    reg.load_builtin()
    reg.load_plugins([STUBS])
    g = graph_50()
    assert len(g.nodes) == 50

    def cold():
        ex = Executor(reg)
        assert ex.run(g).status == "done"

    ex = Executor(reg)
    ex.run(g)

    def cached():
        r = ex.run(g)
        assert len(r.cached) == 50

    print(f"in-process, 50 nodes: cold {timed(cold, 20):.2f} ms/run, fully cached {timed(cached, 50):.2f} ms/run")

    client = WorkerClient(nodes_dirs=[STUBS])
    client.start()
    data = to_data(g)
    try:
        def via_worker():
            done = client.wait_run(client.run(data), timeout=60)
            assert done["status"] == "done"

        client.clear_cache()
        t0 = time.perf_counter()
        via_worker()
        first = (time.perf_counter() - t0) * 1000
        print(f"worker, 50 nodes: cold {first:.2f} ms/run, fully cached {timed(via_worker, 50):.2f} ms/run "
              "(round trip incl. events)")
    finally:
        client.shutdown()


if __name__ == "__main__":
    main()
