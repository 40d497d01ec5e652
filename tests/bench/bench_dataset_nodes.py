"""Dataset nodes end to end: Concept -> Augment -> Bucketer through the real executor, then one
epoch of batches (plan + load_item + stack_batch), then the Cache node with the tiny VAE.

Not a pytest test (no test_ prefix). Run from the repository root:

    python tests/bench/bench_dataset_nodes.py [--n 1000] [--cache-n 1000] [--workers 2]

Generates N 512x768 (width x height) JPEGs with captions in a temp folder (not timed), runs the
graph at resolution 512 (SD1.5 buckets, q=8) with batch size 4 and default augmentation plus
rotation and colour jitter, and prints seconds and images/s for each stage.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_data import generate  # noqa: E402  (the same generated images as the library benchmark)


def line(label: str, seconds: float, n: int) -> None:
    print(f"{label:<58} {seconds:8.2f} s  {n / seconds:9.1f} images/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--cache-n", type=int, default=1000, help="images for the Cache node run (0 = skip)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    args = ap.parse_args()

    from app.engine.executor import Executor
    from app.graph.model import Graph
    from app.graph.registry import load_registry
    from app.ml.data.batches import iter_loaded, load_item, plan_epoch, stack_batch

    reg = load_registry(include_user=False)
    print(f"CPU: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "images"
        folder.mkdir()
        t = time.perf_counter()
        generate(folder, args.n)
        print(f"generated {args.n} 512x768 JPEGs in {time.perf_counter() - t:.1f} s (not timed below)")

        def build(n_images_folder, cache=False):
            g = Graph()
            g.add_node("Concept", 1, {"folder": str(n_images_folder), "name": "bench"}, node_id="1")
            g.add_node("Augment", 1, {"rotation": 5.0, "brightness": 0.1, "contrast": 0.1, "saturation": 0.1},
                       node_id="2")
            g.add_node("Bucketer", 2, {"resolution": "512", "quantization": 8, "batch_size": args.batch_size,
                                       "leftovers": "repeat"}, node_id="3")
            g.add_link("1", "dataset", "2", "dataset")
            g.add_link("2", "dataset", "3", "datasets")
            if cache:
                g.add_node("LoadModel", 1, {"source": "builtin:tiny-sd"}, node_id="4")
                g.add_node("Cache", 1, {"folder": str(tmp / "cache")}, node_id="5")
                g.add_link("4", "model", "5", "model")
                g.add_link("3", "buckets", "5", "buckets")
            return g

        events: list[dict] = []
        ex = Executor(reg)
        t = time.perf_counter()
        res = ex.run(build(folder), emit=events.append, workspace=tmp / "ws")
        t_nodes = time.perf_counter() - t
        assert res.status == "done", res.error
        for e in events:
            if e["event"] == "node_done":
                line(f"  node {e['type']}", e["elapsed_s"], args.n)
        line("Concept + Augment + Bucketer (executor run)", t_nodes, args.n)
        buckets = res.outputs["3"]["buckets"]

        t = time.perf_counter()
        plan = plan_epoch(buckets.dataset, buckets.settings, buckets.batch_size, 42, 1, buckets.leftover)
        t_plan = time.perf_counter() - t
        n_items = len(plan.items)
        line(f"plan epoch 2 ({plan.iterations} batches of {args.batch_size})", t_plan, n_items)
        t = time.perf_counter()
        for batch in plan.batches:
            images, _ = stack_batch([load_item(it) for it in batch])
        t_load = time.perf_counter() - t
        line("load_item + stack_batch, 1 thread", t_load, n_items)
        t = time.perf_counter()
        loaded = iter_loaded(plan.items, workers=args.workers)
        for batch in plan.batches:
            images, _ = stack_batch([next(loaded) for _ in batch])
        t_load2 = time.perf_counter() - t
        line(f"load_item + stack_batch, {args.workers} threads", t_load2, n_items)
        line("end to end: nodes + plan + batches, 1 thread", t_nodes + t_plan + t_load, args.n)
        line(f"end to end: nodes + plan + batches, {args.workers} threads", t_nodes + t_plan + t_load2, args.n)

        if args.cache_n:
            sub = tmp / "cache_images"
            sub.mkdir()
            for p in sorted(folder.iterdir())[: 2 * args.cache_n]:
                os.link(p, sub / p.name)
            n = len(list(sub.glob("*.jpg")))
            from app.ml.models import load_model

            load_model("builtin:tiny-sd")  # import torch and build the model outside the timing
            for label in ("Cache node, cold (load + VAE encode + write)", "Cache node, warm (hash + read)"):
                events = []
                res = Executor(reg).run(build(sub, cache=True), emit=events.append, workspace=tmp / "ws")
                assert res.status == "done", res.error
                cache_s = [e["elapsed_s"] for e in events if e["event"] == "node_done" and e["node"] == "5"][0]
                line(label, cache_s, n)
                for e in events:
                    if e["event"] == "log" and e["node"] == "5":
                        print("    " + e["message"])
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
