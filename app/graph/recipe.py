"""Recipe files: the saved graph is the training recipe.

    {
      "format_version": 1,
      "meta": {"title": "...", "description": "..."},
      "nodes": {"1": {"type": "Concept", "version": 1, "params": {"folder": "data/cats", ...}}, ...},
      "links": [{"id": 1, "from_node": "1", "from_output": "dataset", "to_node": "2", "to_input": "datasets"}],
      "ui": {"nodes": {"1": {"pos": [40, 80]}}, "groups": [...]}
    }

Params are a name -> value map (never positional), so adding a param to a node type does not shift
anything. A recipe is data only: it is parsed with `json` and nothing in it is executed, imported or
unpickled. Files this program writes are canonical, so loading then saving an unchanged recipe gives
identical bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from app.atomic import atomic_file
from app.graph.confine import rename_unsafe_ids
from app.graph.model import Graph, Link, Node
from app.graph.problems import Problem, RecipeError

FORMAT_VERSION = 1
# Size limits: recipes are shared like workflows, so a hostile or broken file must be refused at
# once, not parsed for minutes. A real recipe is a few KB with tens of nodes; these leave room for
# thousands of times that. The file size is checked before reading, the node and link counts
# before parsing (a cheap key count) and again exactly before building the graph.
MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_NODES = 10_000
MAX_LINKS = 10_000
_NODE_KEYS = ("type", "version", "title", "params")
_TOP_KEYS = ("format_version", "meta", "nodes", "links", "ui")


# ---- reading -------------------------------------------------------------------------------

def read_recipe_text(path: str | os.PathLike) -> str:
    p = Path(path)
    if not p.exists():
        raise RecipeError(f"{p}: no such file")
    if p.is_dir():
        raise RecipeError(f"{p}: is a folder, not a recipe file")
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise RecipeError(_too_big(str(p), size))
        raw = p.read_bytes()
    except OSError as e:
        raise RecipeError(f"{p}: cannot read the file ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: not a recipe (the file is not UTF-8 text)") from None


def _too_big(source: str, size: int) -> str:
    return (f"{source}: {size / (1024 * 1024):.1f} MB is too large for a recipe (the limit is "
            f"{MAX_FILE_BYTES // (1024 * 1024)} MB); this is not a NodeTrainer recipe or it holds data "
            f"that belongs in files beside it")


def _too_many(source: str, count: int, what: str, limit: int, about: bool = False) -> str:
    return (f"{source}: {'about ' if about else ''}{count:,} {what} is too many for a recipe (the limit "
            f"is {limit:,}); split the graph into several recipes")


def _check_size(text: str, source: str) -> None:
    """Refuse oversized text before json parses it: the byte size, then a key count
    (each node has a "type" key, each link a "from_node" key; a generous bound, so a
    string value that happens to equal them cannot refuse a real recipe)."""
    if len(text) > MAX_FILE_BYTES:
        raise RecipeError(_too_big(source, len(text.encode("utf-8", "surrogatepass"))))
    nodes = text.count('"type"')
    if nodes > 2 * MAX_NODES:
        raise RecipeError(_too_many(source, nodes, "nodes", MAX_NODES, about=True))
    links = text.count('"from_node"')
    if links > 2 * MAX_LINKS:
        raise RecipeError(_too_many(source, links, "links", MAX_LINKS, about=True))


def _check_counts(data: dict, source: str) -> None:
    nodes, links = data.get("nodes"), data.get("links")
    if isinstance(nodes, dict) and len(nodes) > MAX_NODES:
        raise RecipeError(_too_many(source, len(nodes), "nodes", MAX_NODES))
    if isinstance(links, list) and len(links) > MAX_LINKS:
        raise RecipeError(_too_many(source, len(links), "links", MAX_LINKS))


def parse_json(text: str, source: str = "recipe") -> Any:
    if not text.strip():
        raise RecipeError(f"{source}: the file is empty")
    _check_size(text, source)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{source}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise RecipeError(f"{source}: not a recipe (JSON nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal with thousands of digits
        raise RecipeError(f"{source}: not a valid recipe ({e})") from None


def load_recipe(path: str | os.PathLike, registry=None) -> tuple[Graph, list[Problem]]:
    """Read a recipe file. Whole-file failures raise RecipeError (one clear line); problems with
    single entries come back as Problems so every one of them can be reported."""
    source = str(path)
    return parse_recipe(parse_json(read_recipe_text(path), source), source, registry)


def loads_recipe(text: str, source: str = "recipe", registry=None) -> tuple[Graph, list[Problem]]:
    return parse_recipe(parse_json(text, source), source, registry)


def parse_recipe(data: Any, source: str = "recipe", registry=None) -> tuple[Graph, list[Problem]]:
    if not isinstance(data, dict) or "nodes" not in data or "format_version" not in data:
        raise RecipeError(f"{source}: not a NodeTrainer recipe (expected a JSON object with "
                          f"'format_version' and 'nodes')")
    fv = data["format_version"]
    if not isinstance(fv, int) or isinstance(fv, bool) or fv < 1:
        raise RecipeError(f"{source}: format_version must be a whole number >= 1")
    if fv > FORMAT_VERSION:
        raise RecipeError(f"{source}: written by a newer NodeTrainer (format_version {fv}; this program "
                          f"reads up to {FORMAT_VERSION}). Update NodeTrainer to open it.")
    _check_counts(data, source)
    data = _upgrade_format(data, fv)
    rename_unsafe_ids(data)  # old recipes: node ids become plain names (they name folders)
    problems: list[Problem] = []
    g = Graph()
    for key in ("meta", "ui"):
        value = data.get(key, {})
        if isinstance(value, dict):
            setattr(g, key, value)
        else:
            problems.append(Problem(None, None, f"'{key}' must be an object; it was ignored"))
    g.extra = {k: v for k, v in data.items() if k not in _TOP_KEYS}

    nodes = data["nodes"]
    if not isinstance(nodes, dict):
        problems.append(Problem(None, None, "'nodes' must be an object mapping node ids to nodes"))
        nodes = {}
    for nid, entry in nodes.items():
        node, problem = _parse_node(nid, entry)
        if problem:
            problems.append(problem)
            g.broken_ids.add(nid)
        else:
            g.nodes[nid] = node

    links = data.get("links", [])
    if not isinstance(links, list):
        problems.append(Problem(None, None, "'links' must be a list"))
        links = []
    seen_ids: set[int] = set()
    for i, entry in enumerate(links):
        link, problem = _parse_link(i, entry, seen_ids)
        if problem:
            problems.append(problem)
        else:
            seen_ids.add(link.id)
            g.links.append(link)
    if registry is not None:
        problems.extend(migrate(g, registry))
    return g, problems


def _parse_node(nid: str, entry: Any) -> tuple[Node | None, Problem | None]:
    def bad(msg: str):
        return None, Problem(nid, None, msg)

    if not isinstance(entry, dict):
        return bad("the node entry must be an object with 'type', 'version' and 'params'")
    ntype = entry.get("type")
    title = entry.get("title", "")
    if not isinstance(ntype, str) or not ntype:
        return bad("the node has no 'type'")
    if not isinstance(title, str):
        return None, Problem(nid, ntype, "'title' must be text")
    version = entry.get("version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None, Problem(nid, title or ntype, "'version' must be a whole number >= 1")
    params = entry.get("params", {})
    if not isinstance(params, dict):
        return None, Problem(nid, title or ntype, "'params' must be an object mapping names to values")
    extra = {k: v for k, v in entry.items() if k not in _NODE_KEYS}
    return Node(nid, ntype, version, params, title, extra), None


def _parse_link(index: int, entry: Any, seen_ids: set[int]) -> tuple[Link | None, Problem | None]:
    where = f"link #{index + 1}"
    if not isinstance(entry, dict):
        return None, Problem(None, None, f"{where} must be an object")
    fields = {}
    for key in ("from_node", "from_output", "to_node", "to_input"):
        value = entry.get(key)
        if not isinstance(value, str) or not value:
            return None, Problem(None, None, f"{where} has no '{key}' text")
        fields[key] = value
    link_id = entry.get("id", index + 1)
    if not isinstance(link_id, int) or isinstance(link_id, bool) or link_id in seen_ids:
        return None, Problem(fields["to_node"], None, f"{where} has a missing or duplicate 'id'")
    return Link(link_id, **fields), None


def _upgrade_format(data: dict, version: int) -> dict:
    """Whole-file format upgrades go here, one step per format version (none yet: version 1)."""
    return data


def migrate(graph: Graph, registry) -> list[Problem]:
    """Upgrade nodes saved by older versions of their node type, one step at a time.

    A spec's `migrations[v]` takes the params of version v and returns those of version v + 1. A step
    marked ``graph_step = True`` is called as ``step(params, graph=graph, node=node)`` and may also add
    nodes and links to the graph (params that moved into a node of their own, say); it must leave the
    graph as it found it when it raises, so it adds them only after everything it needs is checked.
    """
    problems = []
    for node in list(graph.nodes.values()):
        spec = registry.get(node.type)
        if spec is None or node.version == spec.version:
            continue
        if node.version > spec.version:
            problems.append(Problem(node.id, node.label(),
                                    f"saved by a newer version of {node.type} (version {node.version}; this "
                                    f"program has version {spec.version}). Update NodeTrainer."))
            continue
        params = dict(node.params)
        try:
            for v in range(node.version, spec.version):
                step = spec.migrations.get(v)
                if step is None:
                    raise LookupError(f"no migration from version {v} to {v + 1}")
                params = step(dict(params), graph=graph, node=node) if getattr(step, "graph_step", False) \
                    else step(dict(params))
                if not isinstance(params, dict):
                    raise TypeError(f"migration from version {v} did not return params")
        except Exception as e:  # a recipe must never take the program down
            problems.append(Problem(node.id, node.label(), f"cannot upgrade {node.type} from version "
                                    f"{node.version} to {spec.version}: {e}"))
            continue
        node.params = params
        node.version = spec.version
    return problems


# ---- writing -------------------------------------------------------------------------------

def to_data(graph: Graph) -> dict:
    nodes = {}
    for nid, n in graph.nodes.items():
        entry: dict[str, Any] = {"type": n.type, "version": n.version}
        if n.title:
            entry["title"] = n.title
        entry["params"] = n.params
        entry.update(n.extra)
        nodes[nid] = entry
    data: dict[str, Any] = {"format_version": FORMAT_VERSION}
    if graph.meta:
        data["meta"] = graph.meta
    data["nodes"] = nodes
    data["links"] = [l.to_dict() for l in graph.links]
    if graph.ui:
        data["ui"] = graph.ui
    data.update(graph.extra)
    return data


def dumps_recipe(graph: Graph) -> str:
    return json.dumps(to_data(graph), indent=2, ensure_ascii=False) + "\n"


def save_recipe(graph: Graph, path: str | os.PathLike) -> None:
    """Write atomically: a crash or a full disk never leaves a half-written recipe behind."""
    atomic_write_text(Path(path), dumps_recipe(graph))


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, overwrite=True) as target:
        with open(target.tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
