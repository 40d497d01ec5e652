"""Validation: every problem in a recipe, each naming its node, before anything runs."""

from __future__ import annotations

from app.graph.confine import check_graph
from app.graph.inputs_check import check_image_sizes, check_input_files
from app.graph.model import Graph, Node
from app.graph.problems import Problem
from app.graph.train_check import check_training
from app.graph.spec import NodeSpec, check_param_value, describe_value
from app.graph.types import can_link


def effective_params(node: Node, spec: NodeSpec) -> dict:
    """The params a node runs with: the spec's defaults overlaid with what the recipe sets."""
    params = spec.default_params()
    params.update({k: v for k, v in node.params.items() if k in params})
    return params


def validate(graph: Graph, registry, *, workspace=None, recipe_dir=None, allow_output=()) -> list[Problem]:
    """``workspace``/``recipe_dir``/``allow_output``: where the run writes, for the check that a
    shared recipe writes nothing outside it (app/graph/confine.py)."""
    problems: list[Problem] = []
    for node in graph.nodes.values():
        spec = registry.get(node.type)
        if spec is None:
            problems.append(Problem(node.id, node.label(), f"unknown node type {node.type!r} "
                                    "(is a plugin missing, or was the type renamed?)"))
            continue
        if node.version != spec.version:
            continue  # migrate() already reported why it could not upgrade this node
        problems.extend(_check_params(node, spec))
        problems.extend(_check_inputs(graph, node, spec))
    problems.extend(_check_links(graph, registry))
    problems.extend(_check_cycles(graph))
    problems.extend(check_graph(graph, registry, workspace=workspace, recipe_dir=recipe_dir, allow=allow_output))
    problems.extend(check_input_files(graph, registry, recipe_dir=recipe_dir))
    problems.extend(check_image_sizes(graph, registry, recipe_dir=recipe_dir))
    problems.extend(check_training(graph, registry))
    return problems


def _check_params(node: Node, spec: NodeSpec) -> list[Problem]:
    out = []
    label = node.label()
    for name, value in node.params.items():
        inp = spec.input(name)
        if inp is None:
            out.append(Problem(node.id, label, f"unknown param {name!r} for {spec.type}"))
        elif inp.is_socket:
            out.append(Problem(node.id, label, f"{name!r} is an input socket; link it instead of setting a value"))
    for inp in spec.params:
        value = node.params.get(inp.name, inp.default)
        if inp.type == "PATH" and value == "" and inp.required:
            what = {"folder": "folder", "file_or_folder": "file or folder"}.get(inp.path_kind, "file")
            hint = f" ({inp.tooltip})" if inp.tooltip else ""
            out.append(Problem(node.id, label, f"choose a {what} for {inp.name!r}{hint}"))
            continue
        problem = check_param_value(inp, value)
        if problem:
            out.append(Problem(node.id, label, f"param {inp.name!r} {problem}"))
    return out


def _check_inputs(graph: Graph, node: Node, spec: NodeSpec) -> list[Problem]:
    out = []
    for inp in spec.sockets:
        links = graph.links_into(node.id, inp.name)
        if not links and inp.required:
            out.append(Problem(node.id, node.label(), f"required input {inp.name!r} ({inp.type}) is not connected"))
        elif len(links) > 1 and not inp.multi:
            out.append(Problem(node.id, node.label(), f"input {inp.name!r} takes one link but has {len(links)}"))
    return out


def _check_links(graph: Graph, registry) -> list[Problem]:
    out = []
    for link in graph.links:
        src = graph.nodes.get(link.from_node)
        dst = graph.nodes.get(link.to_node)
        if dst is None:
            if link.to_node not in graph.broken_ids:
                where = src if src else None
                out.append(Problem(where.id if where else None, where.label() if where else None,
                                   f"link {link.id} goes to a missing node {link.to_node!r}"))
            continue
        if src is None:
            if link.from_node not in graph.broken_ids:
                out.append(Problem(dst.id, dst.label(), f"link {link.id} into {link.to_input!r} comes from a missing "
                                   f"node {link.from_node!r}"))
            continue
        src_spec, dst_spec = registry.get(src.type), registry.get(dst.type)
        if src_spec is None or dst_spec is None:
            continue  # already reported as an unknown type
        out_sock = src_spec.output(link.from_output)
        in_sock = dst_spec.input(link.to_input)
        if out_sock is None:
            out.append(Problem(dst.id, dst.label(), f"link {link.id} comes from {src.label()} (node {src.id}) output "
                               f"{link.from_output!r}, which does not exist"))
            continue
        if in_sock is None:
            out.append(Problem(dst.id, dst.label(), f"link {link.id} goes to input {link.to_input!r}, which "
                               f"{dst_spec.type} does not have"))
            continue
        if not in_sock.is_socket:
            out.append(Problem(dst.id, dst.label(), f"link {link.id} goes to {link.to_input!r}, which is a param, "
                               "not a socket"))
            continue
        if not can_link(out_sock.type, in_sock.type):
            out.append(Problem(dst.id, dst.label(), f"cannot link {src.label()}.{out_sock.name} ({out_sock.type}) "
                               f"to {link.to_input!r} ({in_sock.type}): the socket types differ"))
    return out


def _check_cycles(graph: Graph) -> list[Problem]:
    """Report each cycle once, on its first node, naming every node in it."""
    out = []
    succ: dict[str, list[str]] = {nid: [] for nid in graph.nodes}
    for l in graph.links:
        if l.from_node in succ and l.to_node in succ:
            succ[l.from_node].append(l.to_node)
    for comp in _strongly_connected(succ):
        if len(comp) > 1 or comp[0] in succ[comp[0]]:
            ordered = sorted(comp, key=_id_key)
            names = " -> ".join(f"{nid} ({graph.label(nid)})" for nid in ordered)
            first = ordered[0]
            out.append(Problem(first, graph.label(first), f"is part of a cycle: {names}; a recipe must flow one way"))
    return out


def _id_key(nid: str):
    return (0, int(nid), "") if nid.isdigit() else (1, 0, nid)


def _strongly_connected(succ: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative (recipes from the wild can be deep)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for root in succ:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(succ[w])))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


__all__ = ["validate", "effective_params", "Problem", "describe_value"]
