"""Helpers for the dataset-node tests: generated images of mixed sizes (some broken), graphs run
through the real executor with every event recorded."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]

# (name, (width, height)): square, 3:2, 2:3, 4:3, 1:2 and a very wide 4:1
SIZES = [
    ("square_a", (64, 64)), ("square_b", (72, 72)), ("land_a", (96, 64)), ("land_b", (120, 80)),
    ("port_a", (64, 96)), ("port_b", (80, 120)), ("four_three", (96, 72)), ("tall", (48, 96)),
    ("wide", (128, 32)),
]


def write_image(path, size, seed=0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    rng = np.random.default_rng(seed)
    # smooth colour field plus noise: augmentation changes are visible in every pixel
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, np.full_like(xx, 128)], -1)
    arr = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    return path


def make_mixed_dataset(folder: Path) -> Path:
    """9 good images with captions except one missing and one empty; a truncated PNG and a text
    file named .jpg; one mask."""
    folder = Path(folder)
    for i, (name, size) in enumerate(SIZES):
        write_image(folder / f"{name}.png", size, seed=i)
        if name == "tall":
            continue  # missing caption
        text = "" if name == "wide" else f"photo of {name.replace('_', ' ')}, tag1, tag2\n"
        (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    good = (folder / "square_a.png").read_bytes()
    (folder / "broken.png").write_bytes(good[: len(good) // 2])
    (folder / "broken.txt").write_text("broken\n")
    (folder / "notanimage.jpg").write_bytes(b"this is not a jpeg at all")
    Image.new("L", (64, 96), 255).save(folder / "port_a-masklabel.png")
    return folder


def registry():
    from app.graph.registry import load_registry

    return load_registry(include_user=False)


def graph(nodes, links=()):
    """graph([("1", "Concept", {...}), ...], links=[("1", "dataset", "2", "datasets")])"""
    from app.graph.model import Graph

    reg = registry()
    g = Graph()
    for nid, ntype, params in nodes:
        g.add_node(ntype, reg.get(ntype).version, dict(params), node_id=nid)
    for src, out, dst, inp in links:
        g.add_link(src, out, dst, inp)
    return g


class Run:
    def __init__(self, result, events):
        self.result = result
        self.events = events

    @property
    def status(self):
        return self.result.status

    def output(self, nid, name=None):
        outs = self.result.outputs[nid]
        return outs[name] if name else next(iter(outs.values()))

    def of(self, kind, node=None):
        return [e for e in self.events if e["event"] == kind and (node is None or e.get("node") == node)]

    def logs(self, node=None, level=None):
        return [e["message"] for e in self.of("log", node) if level is None or e["level"] == level]

    def previews(self, node):
        """kind -> latest payload of that node (what the editor shows)."""
        return {e["kind"]: e for e in self.of("preview", node)}

    def ran(self, nid):
        return nid in self.result.executed

    def error(self):
        errs = self.of("node_error")
        return errs[0] if errs else None


def run(g, executor=None, workspace=None, targets=None) -> tuple[Run, object]:
    from app.engine.executor import Executor

    ex = executor or Executor(registry())
    events: list[dict] = []
    res = ex.run(g, targets, emit=events.append, workspace=workspace)
    return Run(res, events), ex


def png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def bump_mtime(path: Path, seconds: float = 5.0) -> None:
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + int(seconds * 1e9)))
