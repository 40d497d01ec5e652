"""What both importers share: a settings reader that remembers which keys were used, and a recipe
builder that checks every value against the node's declared param before setting it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from app.graph.model import Graph
from app.graph.spec import check_param_value
from app.importers import ImportResult

_MISSING = object()
# the optimizers TrainLoop's fused_backward can step one weight at a time (app/ml/train/optim.py's, kept
# here so that importing stays free of torch)
FUSED_OPTIMIZERS = ("adamw", "adafactor")


def flatten(data: dict, prefix: str = "", keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """{"unet": {"train": true}} -> {"unet.train": true}; keys in ``keep`` stay whole (lists of concepts)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and key not in keep:
            out.update(flatten(v, key + ".", keep))
        else:
            out[key] = v
    return out


def show(value: Any, width: int = 80) -> str:
    """A value for the one-line ``KEY = VALUE (why)`` report: strings as they are, other values as JSON; a
    line break or another control character is escaped (the string's repr), so each entry stays one line,
    and a long value is cut."""
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
    if not text.isprintable():
        text = repr(value) if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= width else text[:width - 3] + "..."


class Settings:
    """A flat key -> value map. ``get`` marks a key used; ``leftover`` is what nobody used."""

    def __init__(self, values: dict[str, Any], label: str = "") -> None:
        self.values = dict(values)
        self.used: set[str] = set()
        self.label = label  # prefix for keys in messages (e.g. "concepts[0].")

    def has(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: Any = None) -> Any:
        if key in self.values:
            self.used.add(key)
            return self.values[key]
        return default

    def peek(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def leftover(self) -> list[tuple[str, Any]]:
        return [(k, v) for k, v in self.values.items() if k not in self.used]


class Builder:
    """Builds the recipe graph; each ``set`` checks the value and records the mapping, or lists the
    source key as not imported with the reason."""

    def __init__(self, registry, tool: str, source: Path) -> None:
        self.reg, self.tool, self.source = registry, tool, source
        self.graph = Graph()
        self.mapped: list[str] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.column: dict[int, int] = {}
        self.shown: dict[str, str] = {}  # key as read -> key as the user's file names it (renamed GUI fields)
        self.tracked: list[Settings] = []  # read settings: a used key nobody mapped or listed is reported too
        self.ui: dict[str, dict] = {}

    def node(self, type_: str, col: int, title: str | None = None, **params) -> str:
        spec = self.reg.get(type_)
        nid = self.graph.new_node_id()
        self.graph.add_node(type_, spec.version, {}, node_id=nid)
        if title:
            self.graph.nodes[nid].title = title
        row = self.column.get(col, 0)
        self.column[col] = row + 1
        self.ui[nid] = {"pos": [40 + col * 300, 40 + row * 260]}
        for name, value in params.items():
            self.set(nid, name, value)
        return nid

    def objective(self, train: str, flow: bool = False) -> str:
        """Where the noise and loss settings go: a NoiseObjective (Flux: FlowObjective) node linked into
        TrainLoop's ``objective`` where the catalogue has one, else TrainLoop itself (its params before
        that split)."""
        if getattr(self, "_objective", None) is None:
            loop = self.reg.get("TrainLoop")
            kind = "FlowObjective" if flow else "NoiseObjective"
            if self.reg.get(kind) is not None and loop.input("objective") is not None:
                self._objective = self.node(kind, 2)
                self.link(self._objective, "objective", train, "objective")
            else:
                self._objective = train
        return self._objective

    def set_flow(self, obj: str, param: str, value: Any, key: str) -> bool:
        """A setting of Flux's objective: on the FlowObjective node, or listed where there is none."""
        if self.graph.nodes[obj].type != "FlowObjective":
            self.skip(key, value, "this catalogue has no FlowObjective node: TrainLoop trains Flux with its defaults")
            return False
        return self.set(obj, param, value, key)

    def link(self, a: str, out: str, b: str, inp: str) -> None:
        self.graph.add_link(a, out, b, inp)

    def set(self, nid: str, param: str, value: Any, key: str | None = None, raw: Any = _MISSING) -> bool:
        """Set ``param``; with ``key`` the source setting is recorded as mapped (or not imported when
        the value does not fit the param)."""
        node = self.graph.nodes[nid]
        inp = self.reg.get(node.type).input(param)
        if inp is not None and inp.type == "INT" and isinstance(value, float) and value.is_integer():
            value = int(value)
        if inp is not None and inp.type == "FLOAT" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if inp is None and node.type == "FlowObjective":
            problem = "Flux's flow-matching objective has no such setting"
        else:
            problem = f"{node.type} has no param {param!r}" if inp is None else check_param_value(inp, value)
        key = self.shown.get(key, key) if key is not None else None
        if problem:
            if key is not None:
                self.skip(key, value if raw is _MISSING else raw, f"{node.type}.{param}: {problem}")
            return False
        self.graph.set_param(nid, param, value)
        if key is not None:
            self.mapped.append(f"{key} -> {node.label()}.{param}")
        return True

    def skip(self, key: str, value: Any, why: str) -> None:
        key = self.shown.get(key, key)
        if any(w in key.lower() for w in ("api_key", "token", "secret", "password")) and value:
            value = "<hidden>"  # the recipe is shared: never copy a credential into it
        self.skipped.append(f"{key} = {show(value)} ({why})")

    def note(self, text: str) -> None:
        self.notes.append(text)

    def leftovers(self, settings: Settings, why: str = "no NodeTrainer equivalent known to this importer",
                  reasons: dict[str, str] | None = None) -> None:
        """Every key nobody used is listed; ``reasons`` by the key's last part (``__version``) or whole key."""
        reasons = reasons or {}
        for k, v in settings.leftover():
            self.skip(settings.label + k, v, reasons.get(k) or reasons.get(k.rsplit(".", 1)[-1]) or why)

    def track(self, settings: Settings) -> Settings:
        self.tracked.append(settings)
        return settings

    def _account(self) -> None:
        """A key that was read but led to no param (an 'off' switch, a value that selects the default)
        is still reported, as mapped to the default."""
        text = " ".join(self.mapped) + " " + " ".join(self.skipped)
        for st in self.tracked:
            for key in sorted(st.used):
                full = self.shown.get(st.label + key, st.label + key)
                if full not in text:
                    self.mapped.append(f"{full} = {show(st.values.get(key))} -> the default of the recipe")

    def _unique_concept_names(self) -> None:
        """Concepts are named by their folder unless named; two folders called 'img' need two names."""
        seen: set[str] = set()
        for nid, node in self.graph.nodes.items():
            if node.type != "Concept":
                continue
            name = node.params.get("name") or Path(str(node.params.get("folder", ""))).name or "concept"
            unique, n = name, 2
            while unique in seen:
                unique, n = f"{name} {n}", n + 1
            seen.add(unique)
            if unique != name:
                self.graph.set_param(nid, "name", unique)

    def result(self, title: str, description: str) -> ImportResult:
        from app.graph.recipe import to_data

        self._account()
        self._unique_concept_names()
        self.graph.meta = {"title": title, "description": description,
                           "imported": {"tool": self.tool, "source": str(self.source), "mapped": len(self.mapped),
                                        "not_imported": list(self.skipped), "notes": list(self.notes)}}
        self.graph.ui = {"nodes": self.ui}
        return ImportResult(to_data(self.graph), list(self.mapped), list(self.skipped))


def local_path(value: str, base: Path, model: bool = False) -> str:
    """A path from the source config: ``~`` expanded; relative ones are taken relative to the config's
    folder. With ``model``, a Hugging Face id ("stabilityai/stable-diffusion-xl-base-1.0") stays as it is
    (validation then asks for a local copy)."""
    if not value:
        return value
    p = Path(os.path.expanduser(value))
    if "://" in value or (model and not p.is_absolute() and len(p.parts) == 2
                          and p.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".bin", ".pth")
                          and not (base / p).exists() and not value.startswith(".")):
        return value
    return str(p if p.is_absolute() else (base / p).resolve())


def unit(value: Any) -> str | None:
    """OneTrainer/kohya time units to NodeTrainer's."""
    return {"EPOCH": "epochs", "STEP": "steps", "MINUTE": "minutes", "SECOND": None, "HOUR": None,
            "NEVER": None, "ALWAYS": None}.get(str(value).upper())
