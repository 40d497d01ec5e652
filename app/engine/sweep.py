"""Parameter sweeps: `--sweep NODE.PARAM=V1,V2,...` (repeatable) becomes the cartesian product of
runs, each in its own named sub-workspace (``lr=5e-05,rank=16``) with its own complete recipe.

The variants run one after another in ONE executor that keeps its outputs, so every node upstream of
all swept params (LoadModel, Concept, Bucketer, Cache, ...) runs once and the other variants take its
outputs from the cache (``node_cached`` events). The product is ordered so that the param of the
most upstream node changes slowest (nodes without inputs, like Optimizer, count as innermost): a sweep
over ``Optimizer.lr`` x ``LoRAInject.rank`` injects each rank once and trains every lr on it, instead
of re-injecting for every combination.

A node that writes files at the end of a branch no swept param reaches (the demo's "Sample before")
would write the same files in every variant: it runs in the first variant only, and the others say so.

Each variant's recipe is written to ``<sub-workspace>/recipe.json`` with the overrides applied and
input paths made absolute, so ``launch.py run <sub-workspace>/recipe.json --workspace <sub-workspace>``
repeats that one run exactly.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx

from app.graph.model import Graph
from app.graph.overrides import UsageError, apply_set, find_node

RECIPE_NAME = "recipe.json"
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # builtin:tiny-sd (not C:)


@dataclass
class Axis:
    """One swept param: the node it belongs to and the values, as command-line text."""

    ref: str  # as the user wrote it (node id, title or type)
    node: str  # node id
    param: str
    values: list[str]
    label: str = ""  # the name used in sub-workspace names


@dataclass
class Variant:
    name: str  # the sub-workspace name, e.g. "lr=5e-05,rank=16"
    sets: list[str]  # the --set assignments that make it
    graph: Graph
    values: dict[str, object] = field(default_factory=dict)  # "Node.param" -> value


def parse_sweep(text: str) -> tuple[str, str, list[str]]:
    """``NODE.PARAM=V1,V2`` -> (node ref, param, values). A JSON list also works for values that hold commas."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise UsageError(f"--sweep {text!r}: expected NODE.PARAM=VALUE1,VALUE2,...")
    lhs, rhs = text.split("=", 1)
    ref, param = lhs.rsplit(".", 1)
    rhs = rhs.strip()
    if rhs.startswith("["):
        try:
            values = [v if isinstance(v, str) else json.dumps(v) for v in json.loads(rhs)]
        except json.JSONDecodeError as e:
            raise UsageError(f"--sweep {lhs}: the value list is not valid JSON ({e})") from None
    else:
        values = [v.strip() for v in rhs.split(",")]
    values = [v for v in values if v != ""]
    if not values:
        raise UsageError(f"--sweep {lhs}: no values (give them separated by commas, e.g. {lhs}=1e-4,5e-5)")
    if len(set(values)) != len(values):
        raise UsageError(f"--sweep {lhs}: a value is listed twice ({', '.join(values)})")
    return ref, param, values


def format_value(value) -> str:
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _safe_name(text: str) -> str:
    """A folder name on every system: no separators, no reserved characters, not too long."""
    name = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', "_", text).strip(" .")
    return name[:120] or "run"


def axes(graph: Graph, registry, sweeps: list[str]) -> list[Axis]:
    out: list[Axis] = []
    for text in sweeps:
        ref, param, values = parse_sweep(text)
        nid = find_node(graph, ref)
        for a in out:
            if a.node == nid and a.param == param:
                raise UsageError(f"--sweep {ref}.{param} is given twice")
        out.append(Axis(ref, nid, param, values))
    names = [a.param for a in out]
    for a in out:  # "lr=..." unless two axes share a param name: then "TrainLoop.seed=..."
        a.label = a.param if names.count(a.param) == 1 else f"{a.ref}.{a.param}"
    return out


def _depth(graph: Graph) -> dict[str, int]:
    """How far downstream each node lies (longest path from a source)."""
    g = nx.DiGraph()
    g.add_nodes_from(graph.nodes)
    g.add_edges_from((l.from_node, l.to_node) for l in graph.links)
    depth: dict[str, int] = {}
    for nid in nx.topological_sort(g):
        depth[nid] = max((depth[p] + 1 for p in g.predecessors(nid)), default=0)
    return depth


def expand(graph: Graph, registry, sweeps: list[str], sets: list[str] = ()) -> list[Variant]:
    """The variants of a sweep, in the order that shares the most work (see the module docstring).
    ``sets``: plain overrides applied to every variant first. Raises UsageError for a bad sweep."""
    found = axes(graph, registry, sweeps)
    depth = _depth(graph)
    # the outer loop is the most upstream node that works on inputs (a model to copy and patch); nodes
    # without inputs (Optimizer: settings only) cost nothing to re-run and go innermost; ties keep the order
    has_inputs = {l.to_node for l in graph.links}
    order = sorted(range(len(found)), key=lambda i: (found[i].node not in has_inputs, depth.get(found[i].node, 0)))
    variants: list[Variant] = []
    seen: set[str] = set()
    for combo in itertools.product(*(found[i].values for i in order)):
        chosen = dict(zip(order, combo))
        g = graph.copy()
        for s in sets:
            apply_set(g, registry, s)
        assignments, values, parts = [], {}, []
        for i, a in enumerate(found):
            assignment = f"{a.node}.{a.param}={chosen[i]}"
            try:
                apply_set(g, registry, assignment)
            except UsageError as e:
                raise UsageError(str(e).replace(f"--set {a.node}.", f"--sweep {a.ref}.", 1)) from None
            value = g.nodes[a.node].params[a.param]
            assignments.append(assignment)
            values[f"{a.ref}.{a.param}"] = value
            parts.append(f"{a.label}={format_value(value)}")
        name = _safe_name(",".join(parts))
        if name in seen:  # two texts for one value, e.g. 1e-4 and 0.0001
            raise UsageError(f"--sweep: two variants would both be {name!r}; list each value once")
        seen.add(name)
        variants.append(Variant(name, assignments, g, values))
    return variants


def complete_recipe(graph: Graph, registry, recipe_dir: str | Path | None, meta: dict | None = None) -> dict:
    """The recipe as data, with every input path absolute (so the copy runs from any folder) and
    ``meta`` merged into its meta. Output paths stay relative: they go into the run's workspace."""
    from app.graph.recipe import to_data

    data = to_data(graph)
    data = json.loads(json.dumps(data))  # a deep copy
    base = Path(recipe_dir).resolve() if recipe_dir else None
    for nid, entry in data["nodes"].items():
        spec = registry.get(entry["type"])
        if spec is None:
            continue
        for inp in spec.params:
            value = entry.get("params", {}).get(inp.name)
            if (inp.type != "PATH" or not isinstance(value, str) or not value or _SCHEME.match(value)
                    or inp.path_kind.startswith("output")):
                continue
            p = Path(value).expanduser()
            if not p.is_absolute() and base is not None:
                entry["params"][inp.name] = str(base / p)
    if meta:
        data["meta"] = {**(data.get("meta") or {}), **meta}
    return data


def write_recipe(data: dict, path: Path) -> Path:
    from app.graph.recipe import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    return path


def sweep_meta(recipe: str, variant: Variant, sets: list[str], sweeps: list[str]) -> dict:
    return {"sweep": {"source": str(recipe), "name": variant.name, "set": list(sets) + variant.sets,
                      "sweep": list(sweeps), "values": {k: v for k, v in variant.values.items()}}}


def run_sweep(registry, variants: list[Variant], *, recipe: str, recipe_dir: str, root: Path, sets=(), sweeps=(),
              emit_for=None, allow_output=(), targets=None, executor=None) -> list[tuple[Variant, object]]:
    """Run every variant in one executor that keeps its outputs; ``emit_for(variant)`` gives each
    variant's event sink. Returns (variant, RunResult) pairs; stops after a cancelled one."""
    from app.engine.executor import Executor

    executor = executor or Executor(registry, keep_outputs=True, allow_output=allow_output)
    results = []
    done_keys: dict[str, str] = {}  # cache key of every node run so far -> the variant that ran it
    for v in variants:
        ws = Path(root) / v.name
        write_recipe(complete_recipe(v.graph, registry, recipe_dir, sweep_meta(recipe, v, list(sets), list(sweeps))),
                     ws / RECIPE_NAME)
        emit = emit_for(v) if emit_for else (lambda e: None)
        wanted = list(targets or v.graph.sinks())
        keys = executor.keys(v.graph, executor.plan(v.graph, wanted), Path(recipe_dir), ws)
        # a file-writing end node whose inputs and params are the same as in an earlier variant (the
        # "before" samples of the base model) would write the same files again: it runs once
        again = [n for n in wanted if not registry.get(v.graph.nodes[n].type).pure and keys[n] in done_keys]
        for n in again:
            emit({"event": "log", "level": "info", "node": n,
                  "message": f"{v.graph.label(n)} (node {n}): the same as in {done_keys[keys[n]]}, not repeated"})
        run_targets = [n for n in wanted if n not in again]
        result = executor.run(v.graph, run_targets, emit=emit, recipe_dir=recipe_dir, workspace=ws)
        for n in result.executed + result.cached:  # only what really ran counts as done
            done_keys.setdefault(keys[n], v.name)
        results.append((v, result))
        if result.status == "cancelled":
            break
    return results
