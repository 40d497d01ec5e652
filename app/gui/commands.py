"""Undoable edits of a Graph, as commands in the model rather than in the UI (the NodeGraphQt
lesson): the canvas only redraws what the model says, so undo/redo, copy/paste and scripted
tests all take the same path as a mouse edit.

Every command changes `graph` (nodes, links, params) and `graph.ui` (positions, groups) and can
reverse that exactly: undo restores node ids, link ids and link order, so a recipe that is edited
and undone back saves to the same bytes.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

from app.graph.model import Graph

_MISSING = object()


# ---- ui section helpers --------------------------------------------------------------------

def ui_nodes(graph: Graph) -> dict:
    return graph.ui.setdefault("nodes", {})


def ui_groups(graph: Graph) -> list:
    return graph.ui.setdefault("groups", [])


def node_pos(graph: Graph, node_id: str) -> tuple[float, float]:
    pos = graph.ui.get("nodes", {}).get(node_id, {}).get("pos")
    if isinstance(pos, (list, tuple)) and len(pos) == 2 and all(isinstance(v, (int, float)) for v in pos):
        return float(pos[0]), float(pos[1])
    return 0.0, 0.0


def set_node_pos(graph: Graph, node_id: str, pos) -> None:
    ui_nodes(graph).setdefault(node_id, {})["pos"] = [round(float(pos[0])), round(float(pos[1]))]


def sweep_key(node_id: str, param: str) -> str:
    """How a sweep mark is named in the recipe's ``ui.sweeps``: ``"7.lr"`` (node id, param)."""
    return f"{node_id}.{param}"


def sweep_marks(graph: Graph) -> dict:
    """The planned sweep carried by the recipe: ``ui.sweeps`` = {"7.lr": [0.0001, 5e-05]} (empty if none)."""
    marks = graph.ui.get("sweeps")
    return marks if isinstance(marks, dict) else {}


# ---- commands --------------------------------------------------------------------------------

class Command:
    label = "edit"

    def do(self, graph: Graph) -> None:
        raise NotImplementedError

    def undo(self, graph: Graph) -> None:
        raise NotImplementedError

    def merge(self, other: "Command") -> bool:
        """Absorb a following command (e.g. keystrokes in one text field) into this one."""
        return False

    def nodes_touched(self) -> set[str]:
        return set()


@dataclass
class AddNode(Command):
    type: str
    version: int
    params: dict
    pos: tuple[float, float]
    title: str = ""
    node_id: str | None = None  # fixed at the first do(), so redo gives the same id
    label = "add node"

    def do(self, graph: Graph) -> None:
        node = graph.add_node(self.type, self.version, copy.deepcopy(self.params), self.node_id, self.title)
        self.node_id = node.id
        set_node_pos(graph, node.id, self.pos)

    def undo(self, graph: Graph) -> None:
        graph.remove_node(self.node_id)
        ui_nodes(graph).pop(self.node_id, None)

    def nodes_touched(self) -> set[str]:
        return {self.node_id} if self.node_id else set()


@dataclass
class RemoveNodes(Command):
    """Removes nodes and every link touching them; undo puts all of it back where it was."""

    node_ids: list[str]
    _saved: list = field(default_factory=list)
    _links: list = field(default_factory=list)  # (index in graph.links, Link)
    _node_order: list = field(default_factory=list)
    label = "delete"

    _ui_order: list = field(default_factory=list)
    _sweeps: Any = _MISSING  # ui.sweeps before: a deleted node's sweep marks go with it
    _ui_keys: list = field(default_factory=list)

    def do(self, graph: Graph) -> None:
        self._node_order = list(graph.nodes)
        self._ui_order = list(ui_nodes(graph))
        self._ui_keys = list(graph.ui)
        self._sweeps = _copied(graph.ui.get("sweeps", _MISSING))
        marks = sweep_marks(graph)
        gone = [k for k in marks if str(k).rsplit(".", 1)[0] in self.node_ids]
        for key in gone:
            del marks[key]
        if gone and not marks:
            del graph.ui["sweeps"]
        self._links = [(i, l) for i, l in enumerate(graph.links)
                       if l.from_node in self.node_ids or l.to_node in self.node_ids]
        self._saved = []
        for nid in self.node_ids:
            node, _ = graph.remove_node(nid)
            self._saved.append((node, ui_nodes(graph).pop(nid, _MISSING)))

    def undo(self, graph: Graph) -> None:
        for node, ui in self._saved:
            graph.nodes[node.id] = node
            if ui is not _MISSING:
                ui_nodes(graph)[node.id] = ui
        graph.nodes = _reordered(graph.nodes, self._node_order)
        graph.ui["nodes"] = _reordered(ui_nodes(graph), self._ui_order)
        if self._sweeps is not _MISSING:
            graph.ui["sweeps"] = copy.deepcopy(self._sweeps)
        _reorder_in_place(graph.ui, self._ui_keys)
        for index, link in self._links:
            graph.links.insert(index, link)

    def nodes_touched(self) -> set[str]:
        return set(self.node_ids)


def _reordered(d: dict, order: list) -> dict:
    """Dict order is file order: put restored entries back where they were."""
    rank = {k: i for i, k in enumerate(order)}
    return dict(sorted(d.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def _copied(value):
    return value if value is _MISSING else copy.deepcopy(value)  # a deep copy of the marker is another object


def _reorder_in_place(d: dict, order: list) -> None:
    items = _reordered(d, order)
    d.clear()
    d.update(items)


@dataclass
class AddLink(Command):
    from_node: str
    from_output: str
    to_node: str
    to_input: str
    link_id: int | None = None
    label = "link"

    def do(self, graph: Graph) -> None:
        self.link_id = graph.add_link(self.from_node, self.from_output, self.to_node, self.to_input, self.link_id).id

    def undo(self, graph: Graph) -> None:
        graph.remove_link(self.link_id)

    def nodes_touched(self) -> set[str]:
        return {self.from_node, self.to_node}


@dataclass
class RemoveLink(Command):
    link_id: int
    _saved: tuple | None = None
    label = "unlink"

    def do(self, graph: Graph) -> None:
        link = graph.link(self.link_id)
        index = graph.links.index(link)
        graph.remove_link(self.link_id)
        self._saved = (index, link)

    def undo(self, graph: Graph) -> None:
        index, link = self._saved
        graph.links.insert(index, link)

    def nodes_touched(self) -> set[str]:
        return {self._saved[1].from_node, self._saved[1].to_node} if self._saved else set()


@dataclass
class SetParam(Command):
    node_id: str
    name: str
    value: Any
    _old: Any = _MISSING
    _t: float = field(default_factory=time.monotonic)
    label = "change param"
    MERGE_WINDOW_S = 1.5

    def do(self, graph: Graph) -> None:
        params = graph.nodes[self.node_id].params
        if self._old is _MISSING:
            self._old = params.get(self.name, _MISSING)
        params[self.name] = copy.deepcopy(self.value)

    def undo(self, graph: Graph) -> None:
        params = graph.nodes[self.node_id].params
        if self._old is _MISSING:
            params.pop(self.name, None)
        else:
            params[self.name] = self._old

    def merge(self, other: Command) -> bool:
        if (isinstance(other, SetParam) and (other.node_id, other.name) == (self.node_id, self.name)
                and other._t - self._t < self.MERGE_WINDOW_S):
            self.value, self._t = other.value, other._t
            return True
        return False

    def nodes_touched(self) -> set[str]:
        return {self.node_id}


@dataclass
class SetTitle(Command):
    node_id: str
    title: str
    _old: str = ""
    label = "rename"

    def do(self, graph: Graph) -> None:
        node = graph.nodes[self.node_id]
        self._old, node.title = node.title, self.title

    def undo(self, graph: Graph) -> None:
        graph.nodes[self.node_id].title = self._old

    def nodes_touched(self) -> set[str]:
        return {self.node_id}


@dataclass
class MoveNodes(Command):
    moves: dict[str, tuple[tuple[float, float], tuple[float, float]]]  # id -> (old, new)
    label = "move"

    def do(self, graph: Graph) -> None:
        for nid, (_, new) in self.moves.items():
            set_node_pos(graph, nid, new)

    def undo(self, graph: Graph) -> None:
        for nid, (old, _) in self.moves.items():
            set_node_pos(graph, nid, old)

    def nodes_touched(self) -> set[str]:
        return set(self.moves)


@dataclass
class AddGroup(Command):
    """A titled frame on the canvas, stored in the recipe's ui section as a grid-space
    rect [x, y, width, height] (UI-only, never run)."""

    title: str
    rect: list[float]
    label = "group"

    def do(self, graph: Graph) -> None:
        ui_groups(graph).append({"title": self.title, "rect": [round(v) for v in self.rect]})

    def undo(self, graph: Graph) -> None:
        ui_groups(graph).pop()
        if not graph.ui["groups"]:
            del graph.ui["groups"]


@dataclass
class EditGroup(Command):
    index: int
    title: str | None = None  # None: remove the group
    _old: dict | None = None
    label = "edit group"

    def do(self, graph: Graph) -> None:
        groups = ui_groups(graph)
        self._old = copy.deepcopy(groups[self.index])
        if self.title is None:
            groups.pop(self.index)
        else:
            groups[self.index]["title"] = self.title

    def undo(self, graph: Graph) -> None:
        groups = ui_groups(graph)
        if self.title is None:
            groups.insert(self.index, self._old)
        else:
            groups[self.index] = self._old


@dataclass
class SetSweep(Command):
    """Marks a param to be swept over ``values`` (None: removes the mark). Stored in the recipe's ui
    section, so a shared recipe carries the planned sweep; the last mark removed takes the key with it,
    so a recipe without marks never gains one."""

    node_id: str
    param: str
    values: list | None
    _old: Any = _MISSING  # ui.sweeps before, exactly (undo gives back the same bytes)
    _ui_keys: list = field(default_factory=list)
    label = "sweep mark"

    def do(self, graph: Graph) -> None:
        self._ui_keys = list(graph.ui)
        self._old = _copied(graph.ui.get("sweeps", _MISSING))
        marks = graph.ui.get("sweeps")
        if not isinstance(marks, dict):
            marks = {}
        key = sweep_key(self.node_id, self.param)
        if self.values is None:
            marks.pop(key, None)
        else:
            marks[key] = copy.deepcopy(list(self.values))
        if marks:
            graph.ui["sweeps"] = marks
        else:
            graph.ui.pop("sweeps", None)

    def undo(self, graph: Graph) -> None:
        if self._old is _MISSING:
            graph.ui.pop("sweeps", None)
        else:
            graph.ui["sweeps"] = copy.deepcopy(self._old)
        _reorder_in_place(graph.ui, self._ui_keys)

    def nodes_touched(self) -> set[str]:
        return {self.node_id}


@dataclass
class Composite(Command):
    """Several commands undone as one (paste, delete with links, replace a link)."""

    commands: list[Command]
    label: str = "edit"

    def do(self, graph: Graph) -> None:
        for c in self.commands:
            c.do(graph)

    def undo(self, graph: Graph) -> None:
        for c in reversed(self.commands):
            c.undo(graph)

    def nodes_touched(self) -> set[str]:
        return set().union(*(c.nodes_touched() for c in self.commands)) if self.commands else set()


# ---- history ---------------------------------------------------------------------------------

class History:
    """Undo and redo stacks, plus the position that matches the file on disk (for 'unsaved')."""

    def __init__(self, graph: Graph, limit: int = 500) -> None:
        self.graph = graph
        self.done: list[Command] = []
        self.undone: list[Command] = []
        self.limit = limit
        self.version = 0  # bumps on every change: autosave, validation and redraws watch it
        self._saved_marker: Command | None = None
        self._saved_depth = 0
        self._trimmed_saved = False

    def execute(self, cmd: Command, *, mergeable: bool = False) -> Command:
        cmd.do(self.graph)
        # never merge into the command that matches the saved file: that would hide the change
        if mergeable and self.done and self.done[-1] is not self._saved_marker and self.done[-1].merge(cmd):
            self.version += 1
            return self.done[-1]
        self.done.append(cmd)
        self.undone.clear()
        if len(self.done) > self.limit:
            dropped = self.done.pop(0)
            if dropped is self._saved_marker:
                self._trimmed_saved = True
        self.version += 1
        return cmd

    def undo(self) -> Command | None:
        if not self.done:
            return None
        cmd = self.done.pop()
        cmd.undo(self.graph)
        self.undone.append(cmd)
        self.version += 1
        return cmd

    def redo(self) -> Command | None:
        if not self.undone:
            return None
        cmd = self.undone.pop()
        cmd.do(self.graph)
        self.done.append(cmd)
        self.version += 1
        return cmd

    @property
    def can_undo(self) -> bool:
        return bool(self.done)

    @property
    def can_redo(self) -> bool:
        return bool(self.undone)

    def mark_saved(self) -> None:
        self._saved_marker = self.done[-1] if self.done else None
        self._saved_depth = len(self.done)
        self._trimmed_saved = False

    def mark_unsaved(self) -> None:
        """The graph differs from its file though nothing was edited (e.g. recovered from an autosave)."""
        self._trimmed_saved = True

    @property
    def dirty(self) -> bool:
        if self._trimmed_saved:
            return True
        top = self.done[-1] if self.done else None
        return top is not self._saved_marker or len(self.done) != self._saved_depth
