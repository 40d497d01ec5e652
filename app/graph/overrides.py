"""`--set NODE.PARAM=VALUE` and `--target NODE`: find nodes by id, title or type, and set params
from command-line text, converted by the param's declared type."""

from __future__ import annotations

import json

from app.graph.model import Graph
from app.graph.spec import check_param_value


class UsageError(ValueError):
    pass


def find_node(graph: Graph, ref: str) -> str:
    """A node by id, else by title, else by type (when exactly one node matches)."""
    if ref in graph.nodes:
        return ref
    for attr in ("title", "type"):
        hits = [n.id for n in graph.nodes.values() if getattr(n, attr) == ref]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"{ref!r} matches nodes {', '.join(hits)}; use a node id")
    low = ref.lower()
    similar = sorted({f"{v} (node {n.id})" for n in graph.nodes.values() for v in (n.id, n.title, n.type)
                      if v and v.lower() == low})
    hint = f"; did you mean {' or '.join(similar)}?" if similar else ""
    nodes = ", ".join(f"{n.id} ({n.label()})" for n in graph.nodes.values())
    raise UsageError(f"no node {ref!r} in the recipe{hint} (use a node id, title or type; nodes: {nodes})")


def parse_value(text: str, type_: str):
    if type_ in ("STRING", "PATH", "ENUM"):
        return text
    if type_ == "BOOL":
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{text!r} is not true or false")
    if type_ == "INT":
        try:
            return int(text.strip().replace("_", ""))
        except ValueError:
            try:
                f = float(text)
            except ValueError:
                raise UsageError(f"{text!r} is not a whole number") from None
            if not f.is_integer():
                raise UsageError(f"{text!r} is not a whole number") from None
            return int(f)
    if type_ == "FLOAT":
        try:
            return float(text)
        except ValueError:
            raise UsageError(f"{text!r} is not a number") from None
    return json.loads(text)


def apply_set(graph: Graph, registry, assignment: str) -> None:
    if "=" not in assignment or "." not in assignment.split("=", 1)[0]:
        raise UsageError(f"--set {assignment!r}: expected NODE.PARAM=VALUE")
    lhs, text = assignment.split("=", 1)
    ref, name = lhs.rsplit(".", 1)
    nid = find_node(graph, ref)
    node = graph.nodes[nid]
    spec = registry.get(node.type)
    if spec is None:
        raise UsageError(f"--set {lhs}: node {nid} has unknown type {node.type!r}")
    inp = spec.input(name)
    if inp is None or inp.is_socket:
        names = ", ".join(p.name for p in spec.params)
        raise UsageError(f"--set {lhs}: {node.type} has no param {name!r} (params: {names})")
    try:
        value = parse_value(text, inp.type)
    except (UsageError, ValueError) as e:
        raise UsageError(f"--set {lhs}: {e}") from None
    problem = check_param_value(inp, value)
    if problem:
        raise UsageError(f"--set {lhs}: {problem}")
    graph.set_param(nid, name, value)
