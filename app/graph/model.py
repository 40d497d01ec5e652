"""The Graph model: nodes keyed by stable ids, links as objects, and UI state kept apart.

This is the single in-memory form of a recipe. The editor edits it through commands (undo/redo
lives with the model, not the UI), the executor reads it, and recipe.py turns it into bytes and
back. It holds plain data only and knows nothing of node implementations.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Node:
    id: str
    type: str
    version: int
    params: dict[str, Any] = field(default_factory=dict)
    title: str = ""  # user-chosen title; empty means the spec's name
    extra: dict[str, Any] = field(default_factory=dict)  # unknown keys, kept so nothing is lost

    def label(self) -> str:
        return self.title or self.type


@dataclass
class Link:
    id: int
    from_node: str
    from_output: str
    to_node: str
    to_input: str

    def to_dict(self) -> dict:
        return {"id": self.id, "from_node": self.from_node, "from_output": self.from_output,
                "to_node": self.to_node, "to_input": self.to_input}


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    links: list[Link] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    ui: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # ids of node entries the loader could not read: links to them are not reported again
    broken_ids: set[str] = field(default_factory=set)

    # ---- queries -------------------------------------------------------------------------
    def node(self, node_id: str) -> Node:
        return self.nodes[node_id]

    def label(self, node_id: str) -> str:
        n = self.nodes.get(node_id)
        return n.label() if n else "?"

    def links_into(self, node_id: str, input_name: str | None = None) -> list[Link]:
        return [l for l in self.links if l.to_node == node_id and (input_name is None or l.to_input == input_name)]

    def links_from(self, node_id: str) -> list[Link]:
        return [l for l in self.links if l.from_node == node_id]

    def link(self, link_id: int) -> Link | None:
        for l in self.links:
            if l.id == link_id:
                return l
        return None

    def sinks(self) -> list[str]:
        """Nodes nothing is linked from: the default targets of a run."""
        sources = {l.from_node for l in self.links}
        return [nid for nid in self.nodes if nid not in sources]

    # ---- edits (the editor's commands call these) -----------------------------------------
    def new_node_id(self) -> str:
        used = {int(k) for k in self.nodes if k.isdigit()} | {int(k) for k in self.broken_ids if k.isdigit()}
        return str(max(used, default=0) + 1)

    def new_link_id(self) -> int:
        return max((l.id for l in self.links), default=0) + 1

    def add_node(self, type: str, version: int, params: dict | None = None, node_id: str | None = None,
                 title: str = "") -> Node:
        nid = node_id or self.new_node_id()
        if nid in self.nodes:
            raise KeyError(f"node id {nid!r} is already used")
        n = Node(nid, type, version, dict(params or {}), title)
        self.nodes[nid] = n
        return n

    def remove_node(self, node_id: str) -> tuple[Node, list[Link]]:
        """Remove a node and every link touching it; returns both so an undo can restore them."""
        n = self.nodes.pop(node_id)
        gone = [l for l in self.links if l.from_node == node_id or l.to_node == node_id]
        self.links = [l for l in self.links if l not in gone]
        return n, gone

    def add_link(self, from_node: str, from_output: str, to_node: str, to_input: str,
                 link_id: int | None = None) -> Link:
        link = Link(link_id if link_id is not None else self.new_link_id(), from_node, from_output, to_node, to_input)
        self.links.append(link)
        return link

    def remove_link(self, link_id: int) -> Link:
        link = self.link(link_id)
        if link is None:
            raise KeyError(f"no link {link_id}")
        self.links.remove(link)
        return link

    def set_param(self, node_id: str, name: str, value: Any) -> Any:
        """Set a param and return the old value (or a sentinel-free None if it was unset)."""
        params = self.nodes[node_id].params
        old = params.get(name)
        params[name] = value
        return old

    def copy(self) -> "Graph":
        return copy.deepcopy(self)
