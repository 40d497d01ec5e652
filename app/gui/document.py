"""The recipe being edited: a Graph, where it lives on disk, its undo history, and the editing
rules the canvas needs answered before it draws anything (may this link exist? which nodes can
take this pin?). Pure Python so every rule is tested without a window.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from app.graph.model import Graph
from app.graph.problems import Problem
from app.graph.recipe import dumps_recipe, loads_recipe, save_recipe, to_data
from app.graph.types import can_link
from app.graph.validate import validate
from app.gui import commands as C

CLIPBOARD_KIND = "nodetrainer/nodes"
PASTE_OFFSET = (40, 40)


class Document:
    def __init__(self, registry, graph: Graph | None = None, path: str | Path | None = None,
                 load_problems: list[Problem] | None = None) -> None:
        self.registry = registry
        self.graph = graph if graph is not None else Graph()
        self.path = Path(path) if path else None
        self.load_problems = list(load_problems or [])
        self.history = C.History(self.graph)
        self.history.mark_saved()

    # ---- files ---------------------------------------------------------------------------------
    @classmethod
    def from_text(cls, registry, text: str, source: str, path: str | Path | None = None) -> "Document":
        graph, problems = loads_recipe(text, source, registry)
        return cls(registry, graph, path, problems)

    @classmethod
    def open(cls, registry, path: str | Path) -> "Document":
        """Opens a recipe, or the recipe embedded in a LoRA / PNG that NodeTrainer wrote (then the
        document has no path: saving asks where, so the output file is never overwritten)."""
        from app.gui.embedded import read_recipe_source

        text, is_recipe_file = read_recipe_source(path)
        return cls.from_text(registry, text, str(path), path if is_recipe_file else None)

    def save(self, path: str | Path | None = None) -> Path:
        target = Path(path) if path else self.path
        if target is None:
            raise ValueError("choose where to save the recipe")
        save_recipe(self.graph, target)
        self.path = target
        self.history.mark_saved()
        return target

    def dumps(self) -> str:
        return dumps_recipe(self.graph)

    def data(self) -> dict:
        return to_data(self.graph)

    @property
    def dirty(self) -> bool:
        return self.history.dirty

    @property
    def title(self) -> str:
        name = self.path.name if self.path else (self.graph.meta.get("title") or "untitled")
        return f"{name}{' *' if self.dirty else ''}"

    # ---- queries ---------------------------------------------------------------------------------
    def problems(self) -> list[Problem]:
        recipe_dir = self.path.resolve().parent if self.path else None  # input files are checked once saved
        return self.load_problems + validate(self.graph, self.registry, recipe_dir=recipe_dir)

    def spec(self, node_id: str):
        node = self.graph.nodes.get(node_id)
        return self.registry.get(node.type) if node else None

    def link_refusal(self, from_node: str, from_output: str, to_node: str, to_input: str) -> str | None:
        """Why this link may not be drawn (said to the user), or None if it may."""
        g = self.graph
        if from_node not in g.nodes or to_node not in g.nodes:
            return "that node no longer exists"
        if from_node == to_node:
            return "a node cannot feed itself"
        src, dst = self.spec(from_node), self.spec(to_node)
        if src is None or dst is None:
            return "the node type is unknown (is a plugin missing?)"
        out, inp = src.output(from_output), dst.input(to_input)
        if out is None:
            return f"{src.title} has no output {from_output!r}"
        if inp is None or not inp.is_socket:
            return f"{dst.title} has no input socket {to_input!r}"
        if not can_link(out.type, inp.type):
            return (f"{g.label(from_node)}.{from_output} gives {out.type}, but {g.label(to_node)}.{to_input} "
                    f"takes {inp.type}")
        for l in g.links_into(to_node, to_input):
            if l.from_node == from_node and l.from_output == from_output:
                return "these pins are already linked"
        if self._reaches(to_node, from_node):
            return f"linking {g.label(from_node)} to {g.label(to_node)} would make a cycle; a recipe flows one way"
        return None

    def _reaches(self, start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            nid = todo.pop()
            if nid == goal:
                return True
            if nid in seen:
                continue
            seen.add(nid)
            todo.extend(l.to_node for l in self.graph.links if l.from_node == nid)
        return False

    # ---- edits (each one undoable) ------------------------------------------------------------------
    def execute(self, cmd: C.Command, mergeable: bool = False) -> C.Command:
        return self.history.execute(cmd, mergeable=mergeable)

    def add_node(self, type_id: str, pos=(0, 0), params: dict | None = None) -> str:
        spec = self.registry.get(type_id)
        if spec is None:
            raise KeyError(f"unknown node type {type_id!r}")
        cmd = self.execute(C.AddNode(type_id, spec.version, dict(params or {}), tuple(pos)))
        return cmd.node_id

    def connect(self, from_node: str, from_output: str, to_node: str, to_input: str) -> tuple[int | None, str | None]:
        """Link two pins; returns (link id, None) or (None, why not). A second link into an input
        that takes one replaces the old link, in one undo step."""
        why = self.link_refusal(from_node, from_output, to_node, to_input)
        if why:
            return None, why
        inp = self.spec(to_node).input(to_input)
        steps: list[C.Command] = []
        if not inp.multi:
            steps += [C.RemoveLink(l.id) for l in self.graph.links_into(to_node, to_input)]
        add = C.AddLink(from_node, from_output, to_node, to_input)
        self.execute(C.Composite(steps + [add], "link") if steps else add)
        return add.link_id, None

    def add_linked_node(self, type_id: str, pos, pin: tuple[str, str, str]) -> tuple[str, int | None]:
        """Add a node and link it to the pin a drag started from, as one undo step.
        pin = (node id, socket name, 'out' | 'in')."""
        spec = self.registry.get(type_id)
        nid, name, side = pin
        add = C.AddNode(type_id, spec.version, {}, tuple(pos))
        steps: list[C.Command] = [add]
        add.do(self.graph)  # to learn the id and check the link; undone below, then redone as one
        link = None
        try:
            ptype = self._pin_type(nid, name, side)
            if side == "out":
                match = next((i.name for i in spec.sockets if can_link(ptype, i.type)), None)
                if match and not self.link_refusal(nid, name, add.node_id, match):
                    link = C.AddLink(nid, name, add.node_id, match)
            else:
                match = next((o.name for o in spec.outputs if can_link(o.type, ptype)), None)
                if match and not self.link_refusal(add.node_id, match, nid, name):
                    if not self.spec(nid).input(name).multi:
                        steps += [C.RemoveLink(l.id) for l in self.graph.links_into(nid, name)]
                    link = C.AddLink(add.node_id, match, nid, name)
        finally:
            add.undo(self.graph)
        if link:
            steps.append(link)
        self.execute(C.Composite(steps, "add linked node"))
        return add.node_id, link.link_id if link else None

    def _pin_type(self, node_id: str, name: str, side: str) -> str | None:
        spec = self.spec(node_id)
        if spec is None:
            return None
        sock = spec.output(name) if side == "out" else spec.input(name)
        return sock.type if sock else None

    def remove(self, node_ids=(), link_ids=()) -> None:
        node_ids = [n for n in node_ids if n in self.graph.nodes]
        links = [l for l in link_ids if self.graph.link(l) and
                 self.graph.link(l).from_node not in node_ids and self.graph.link(l).to_node not in node_ids]
        steps: list[C.Command] = [C.RemoveLink(l) for l in links]
        if node_ids:
            steps.append(C.RemoveNodes(list(node_ids)))
        if steps:
            self.execute(C.Composite(steps, "delete") if len(steps) > 1 else steps[0])

    def set_param(self, node_id: str, name: str, value) -> None:
        if self.graph.nodes[node_id].params.get(name, _unset) == value:
            return
        self.execute(C.SetParam(node_id, name, value), mergeable=True)

    # ---- sweep marks (the recipe's ui.sweeps: a planned sweep, queued as the product of its values) ----
    def sweep_marks(self) -> dict:
        return C.sweep_marks(self.graph)

    def sweep_values(self, node_id: str, param: str, text: str) -> list:
        """The values typed for a sweep mark ("1e-4, 5e-5", or a JSON list for values with commas),
        read exactly as `--sweep NODE.PARAM=...` reads them and checked against the param's type and
        range. Raises UsageError naming the node and what to write instead."""
        from app.engine.sweep import parse_sweep
        from app.graph.overrides import UsageError, apply_set

        where = f"{self.graph.label(node_id)} (node {node_id}).{param}"
        try:
            _, _, texts = parse_sweep(f"{node_id}.{param}={text}")
        except UsageError as e:
            raise UsageError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
        probe = self.graph.copy()
        values = []
        for t in texts:
            try:
                apply_set(probe, self.registry, f"{node_id}.{param}={t}")
            except UsageError as e:
                raise UsageError(f"{where}: {str(e).split(': ', 1)[-1]}") from None
            value = probe.nodes[node_id].params[param]
            if value in values:
                raise UsageError(f"{where}: {t!r} is the same value as another one listed; list each value once")
            values.append(value)
        return values

    def mark_sweep(self, node_id: str, param: str, values: list | None) -> bool:
        """Marks (or with None unmarks) a param for sweeping, as one undo step. False: nothing changed."""
        key = C.sweep_key(node_id, param)
        if self.sweep_marks().get(key) == values or (values is None and key not in self.sweep_marks()):
            return False
        self.execute(C.SetSweep(node_id, param, None if values is None else list(values)))
        return True

    def sweep_args(self) -> list[str]:
        """The marks as `--sweep` texts (``7.lr=[0.0001, 5e-05]``, a JSON list so any value survives).
        Raises UsageError naming the file for a mark that no longer fits the recipe."""
        import json

        from app.graph.overrides import UsageError

        where = f"the sweep marks (ui.sweeps) of {self.path or 'the recipe'}"
        marks = self.graph.ui.get("sweeps")
        if marks is None:
            return []
        if not isinstance(marks, dict):
            raise UsageError(f"{where} are not a table of \"NODE.PARAM\": [values]; fix or remove them in the file")
        out = []
        for key, values in marks.items():
            nid, _, param = str(key).rpartition(".")
            spec = self.spec(nid)
            if spec is None or spec.input(param) is None or spec.input(param).is_socket:
                raise UsageError(f"{where}: {key!r} names no param of a node in the recipe; remove that mark "
                                 f"(right-click the node) or fix the file")
            if not isinstance(values, list) or not values:
                raise UsageError(f"{where}: {key!r} holds no list of values; mark the param again")
            out.append(f"{nid}.{param}=" + json.dumps(values))
        return out

    def move(self, new_positions: dict[str, tuple[float, float]]) -> None:
        moves = {}
        for nid, new in new_positions.items():
            old = C.node_pos(self.graph, nid)
            if nid in self.graph.nodes and (round(old[0]), round(old[1])) != (round(new[0]), round(new[1])):
                moves[nid] = (old, (round(new[0]), round(new[1])))
        if moves:
            self.execute(C.MoveNodes(moves))

    def group(self, node_ids, title: str = "Group", sizes: dict | None = None, pad: float = 20) -> bool:
        """Frame the nodes in a titled group. sizes: node id -> (w, h) as drawn (default 260 x 200)."""
        ids = [n for n in node_ids if n in self.graph.nodes]
        if not ids:
            return False
        boxes = []
        for nid in ids:
            x, y = C.node_pos(self.graph, nid)
            w, h = (sizes or {}).get(nid, (260, 200))
            boxes.append((x, y, x + w, y + h))
        x0, y0 = min(b[0] for b in boxes) - pad, min(b[1] for b in boxes) - pad - 20
        x1, y1 = max(b[2] for b in boxes) + pad, max(b[3] for b in boxes) + pad
        self.execute(C.AddGroup(title, [x0, y0, x1 - x0, y1 - y0]))
        return True

    # ---- clipboard -------------------------------------------------------------------------------
    def copy(self, node_ids) -> dict:
        """Selected nodes with the links between them (links to outside nodes are left behind)."""
        ids = [n for n in self.graph.nodes if n in set(node_ids)]
        nodes = []
        for nid in ids:
            n = self.graph.nodes[nid]
            nodes.append({"id": nid, "type": n.type, "version": n.version, "title": n.title,
                          "params": copy.deepcopy(n.params), "pos": list(C.node_pos(self.graph, nid))})
        links = [l.to_dict() for l in self.graph.links if l.from_node in ids and l.to_node in ids]
        return {"kind": CLIPBOARD_KIND, "nodes": nodes, "links": links}

    def paste(self, clip: dict, offset=PASTE_OFFSET) -> list[str]:
        """Paste as new nodes (fresh ids), in one undo step; returns the new ids."""
        if not isinstance(clip, dict) or clip.get("kind") != CLIPBOARD_KIND or not clip.get("nodes"):
            return []
        steps: list[C.Command] = []
        id_map: dict[str, str] = {}
        next_id = int(self.graph.new_node_id())
        for entry in clip["nodes"]:
            if self.registry.get(entry["type"]) is None:
                continue
            new_id = str(next_id)
            next_id += 1
            id_map[entry["id"]] = new_id
            x, y = entry.get("pos", (0, 0))
            steps.append(C.AddNode(entry["type"], entry["version"], entry["params"],
                                   (x + offset[0], y + offset[1]), entry.get("title", ""), node_id=new_id))
        next_link = self.graph.new_link_id()
        for l in clip.get("links", []):
            if l["from_node"] in id_map and l["to_node"] in id_map:
                steps.append(C.AddLink(id_map[l["from_node"]], l["from_output"], id_map[l["to_node"]], l["to_input"],
                                       link_id=next_link))
                next_link += 1
        if steps:
            self.execute(C.Composite(steps, "paste"))
        return list(id_map.values())

    def duplicate(self, node_ids) -> list[str]:
        return self.paste(self.copy(node_ids))


_unset = object()


def clipboard_text(clip: dict) -> str:
    return json.dumps(clip)


def clipboard_from_text(text: str) -> dict | None:
    try:
        data = json.loads(text)
    except (ValueError, TypeError):
        return None
    return data if isinstance(data, dict) and data.get("kind") == CLIPBOARD_KIND else None
