"""Stub nodes for engine tests, loaded as a plugin folder only by the tests.

Their outputs record which nodes produced them so tests can check ordering and caching, and some
misbehave on purpose (fail, crash the process, mutate their input, run slowly).
"""

import ctypes
import os
import signal
import time

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node


@node(type="TestConst", category="test", description="Emits a value.",
      inputs=[Int("value", 1, min=-1000, max=1000), String("tag", "")],
      outputs=[Output("out", "DATASET")])
def const(ctx, value, tag):
    return {"value": value, "trace": [ctx.node_id], "items": [value]}


@node(type="TestAdd", category="test", description="Adds its inputs (several links).",
      inputs=[Socket("items", "DATASET", multi=True), Int("bias", 0, min=-1000, max=1000)],
      outputs=[Output("out", "DATASET")])
def add(ctx, items, bias):
    trace = [t for it in items for t in it["trace"]] + [ctx.node_id]
    return {"value": sum(it["value"] for it in items) + bias, "trace": trace, "items": [it["value"] for it in items]}


@node(type="TestPair", category="test", description="Two outputs.",
      inputs=[Socket("a", "DATASET"), Socket("b", "DATASET", optional=True)],
      outputs=[Output("first", "DATASET"), Output("second", "BUCKETS")])
def pair(ctx, a, b):
    return {"first": a, "second": {"value": a["value"] * 2, "trace": [ctx.node_id]}}


@node(type="TestUse", category="test", description="Consumes BUCKETS.",
      inputs=[Socket("buckets", "BUCKETS")], outputs=[Output("out", "DATASET")])
def use(ctx, buckets):
    return {"value": buckets["value"], "trace": [ctx.node_id], "items": []}


@node(type="TestMutate", category="test", description="Tries to change its input in place.",
      inputs=[Socket("data", "DATASET"), Enum("how", ["setitem", "append", "array"])],
      outputs=[Output("out", "DATASET")])
def mutate(ctx, data, how):
    if how == "setitem":
        data["value"] = 999
    elif how == "append":
        data["items"].append(999)
    else:
        data["array"][0] = 999
    return data


@node(type="TestArray", category="test", description="Emits a numpy array.",
      inputs=[], outputs=[Output("out", "DATASET")])
def array(ctx):
    import numpy as np

    return {"value": 0, "trace": [ctx.node_id], "items": [], "array": np.zeros(4)}


@node(type="TestFail", category="test", description="Raises.",
      inputs=[Socket("data", "DATASET", optional=True), String("message", "boom")],
      outputs=[Output("out", "DATASET")])
def fail(ctx, data, message):
    raise ValueError(message)


@node(type="TestCrash", category="test", description="Ends the process abruptly.",
      inputs=[Socket("data", "DATASET", optional=True), Enum("how", ["exit", "segfault", "kill"])],
      outputs=[Output("out", "DATASET")])
def crash(ctx, data, how):
    if how == "exit":
        os._exit(3)
    if how == "segfault":
        ctypes.string_at(0)
    os.kill(os.getpid(), signal.SIGKILL)


@node(type="TestSlow", category="test", description="Works in steps, reporting progress.",
      inputs=[Socket("data", "DATASET", optional=True), Int("steps", 10, min=1, max=100000),
              Float("step_s", 0.01, min=0.0, max=10.0), Path("marker", "", optional=True)],
      outputs=[Output("out", "DATASET")])
def slow(ctx, data, steps, step_s, marker):
    for i in range(steps):
        if marker and i == 1:
            open(marker, "w").close()  # tells a test the node is running
        time.sleep(step_s)
        ctx.metric(loss=1.0 / (i + 1), step=i)
        ctx.progress(i + 1, steps)
    return {"value": steps, "trace": [ctx.node_id], "items": []}


@node(type="TestWrite", category="test", description="Writes its input to a file (a side effect).",
      side_effect=True,
      inputs=[Socket("data", "DATASET"), Path("path", "")], outputs=[])
def write(ctx, data, path):
    with open(path, "a") as f:
        f.write(f"{data['value']}\n")


@node(type="TestFlag", category="test", description="A node with every widget type.",
      inputs=[Bool("flag", False), Float("ratio", 0.5, min=0.0, max=1.0), Enum("mode", ["a", "b"]),
              Path("folder", "", kind="folder")],
      outputs=[Output("out", "DATASET")])
def flag(ctx, flag, ratio, mode, folder):
    return {"value": int(flag), "trace": [ctx.node_id], "items": [ratio, mode, folder]}


@node(type="TestPending", category="test", description="Declared, not implemented yet.",
      inputs=[], outputs=[Output("out", "DATASET")])
def pending(ctx):
    raise NotImplementedError("TestPending is declared but not implemented yet: it arrives with a later issue")


SEEN = []  # weak references to the inputs TestOwn saw (tests check what the engine let go of)


@node(type="TestOwn", category="test", description="Reports whether it may change its input in place.",
      inputs=[Socket("data", "DATASET")], outputs=[Output("out", "DATASET")])
def own(ctx, data):
    import weakref

    import gc

    gc.collect()
    alive = [ref() is not None for ref in SEEN]  # what the engine still holds of earlier inputs
    SEEN.append(weakref.ref(data))
    exclusive = ctx.exclusive(data)
    ctx.log(f"exclusive={exclusive}")
    ctx.log(f"earlier inputs alive={alive}")
    return {"value": data["value"], "exclusive": exclusive, "trace": [ctx.node_id], "items": []}
