"""Declarative node specs: one description drives the editor's widgets, validation, the recipe
schema and `launch.py nodes`.

A node module declares each node with the `node` decorator on the function that runs it:

    @node(type="Bucketer", version=2, category="dataset",
          description="Groups images into aspect-ratio buckets.",
          inputs=[Socket("datasets", "DATASET", multi=True),
                  Int("batch_size", 1, min=1, max=256, tooltip="Images per step.")],
          outputs=[Output("buckets", "BUCKETS")])
    def bucketer(ctx, datasets, batch_size): ...

Node modules must not import torch at module level (import it inside the function) so that
listing and validating recipes stays fast and the editor never loads it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from app.graph.types import SOCKET_TYPES, WIDGET_TYPES

PATH_KINDS = ("file", "folder", "file_or_folder", "output_file", "output_folder")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TYPE_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


class SpecError(ValueError):
    """A node declaration is inconsistent (a programming error in a node module or plugin)."""


@dataclass(frozen=True)
class Input:
    """One input of a node: a socket (linked) or a widget param (stored in the recipe)."""

    name: str
    type: str
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    choices: tuple[str, ...] | None = None
    tooltip: str = ""
    optional: bool = False
    multi: bool = False
    path_kind: str = "file"  # PATH only: "file", "folder", "file_or_folder"; "output_file" / "output_folder"
    # are written by the node and resolve against the run's workspace instead of the recipe
    multiline: bool = False  # STRING only: edit in a multi-line box
    advanced: bool = False  # hidden behind "more" in the editor
    # STRING only: a light function (no torch) returning why a value is unacceptable, or None
    check: Callable[[str], str | None] | None = field(default=None, compare=False, repr=False)
    # PATH only: the node writes there although the kind is not an output one (e.g. a cache folder);
    # written paths must stay inside the workspace (app/graph/confine.py)
    writes: bool = False

    @property
    def is_socket(self) -> bool:
        return self.type in SOCKET_TYPES

    @property
    def required(self) -> bool:
        return not self.optional

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "kind": "socket" if self.is_socket else "widget"}
        if not self.is_socket:
            d["default"] = self.default
        for key in ("min", "max", "step"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.choices is not None:
            d["choices"] = list(self.choices)
        if self.type == "PATH":
            d["path_kind"] = self.path_kind
        d["optional"] = self.optional
        if self.multi:
            d["multi"] = True
        if self.multiline:
            d["multiline"] = True
        if self.advanced:
            d["advanced"] = True
        d["tooltip"] = self.tooltip
        return d


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "tooltip": self.tooltip}


# Convenience constructors: they read like the spec they produce.
def Socket(name: str, type: str, *, optional: bool = False, multi: bool = False, tooltip: str = "") -> Input:
    return Input(name, type, optional=optional, multi=multi, tooltip=tooltip)


def Int(name: str, default: int, *, min: int | None = None, max: int | None = None, step: int | None = None,
        tooltip: str = "", optional: bool = False, advanced: bool = False) -> Input:
    return Input(name, "INT", default, min, max, step, tooltip=tooltip, optional=optional, advanced=advanced)


def Float(name: str, default: float, *, min: float | None = None, max: float | None = None,
          step: float | None = None, tooltip: str = "", optional: bool = False, advanced: bool = False) -> Input:
    return Input(name, "FLOAT", default, min, max, step, tooltip=tooltip, optional=optional, advanced=advanced)


def String(name: str, default: str = "", *, tooltip: str = "", multiline: bool = False,
           optional: bool = True, advanced: bool = False, check: Callable[[str], str | None] | None = None) -> Input:
    return Input(name, "STRING", default, tooltip=tooltip, multiline=multiline, optional=optional, advanced=advanced,
                 check=check)


def Bool(name: str, default: bool, *, tooltip: str = "", advanced: bool = False) -> Input:
    return Input(name, "BOOL", default, tooltip=tooltip, optional=True, advanced=advanced)


def Enum(name: str, choices: list[str] | tuple[str, ...], default: str | None = None, *, tooltip: str = "",
         advanced: bool = False) -> Input:
    choices = tuple(choices)
    return Input(name, "ENUM", choices[0] if default is None else default, choices=choices, tooltip=tooltip,
                 optional=True, advanced=advanced)


def Path(name: str, default: str = "", *, kind: str = "file", optional: bool = False, tooltip: str = "",
         advanced: bool = False, writes: bool = False) -> Input:
    return Input(name, "PATH", default, path_kind=kind, optional=optional, tooltip=tooltip, advanced=advanced,
                 writes=writes)


@dataclass(frozen=True)
class NodeSpec:
    """Everything the program knows about a node type, independent of any recipe."""

    type: str
    version: int
    category: str
    description: str
    inputs: tuple[Input, ...]
    outputs: tuple[Output, ...]
    fn: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    side_effect: bool = False
    migrations: dict[int, Callable[[dict], dict]] = field(default_factory=dict, compare=False, repr=False)
    source: str = "builtin"  # "builtin" or the plugin file it came from
    display_name: str = ""
    # For nodes that read files: a cheap fingerprint of what they read (e.g. sizes and mtimes of a
    # folder) computed from the params, so the cache notices when the files change on disk.
    fingerprint: Callable[[dict], str] | None = field(default=None, compare=False, repr=False)

    @property
    def pure(self) -> bool:
        """Pure nodes are cached; side-effect nodes (they write files) always run."""
        return not self.side_effect

    @property
    def title(self) -> str:
        return self.display_name or self.type

    def input(self, name: str) -> Input | None:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        return None

    def output(self, name: str) -> Output | None:
        for out in self.outputs:
            if out.name == name:
                return out
        return None

    @property
    def sockets(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if i.is_socket)

    @property
    def params(self) -> tuple[Input, ...]:
        return tuple(i for i in self.inputs if not i.is_socket)

    def default_params(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}

    def to_dict(self) -> dict:
        return {
            "type": self.type,
            "title": self.title,
            "version": self.version,
            "category": self.category,
            "description": self.description,
            "pure": self.pure,
            "inputs": [i.to_dict() for i in self.inputs],
            "outputs": [o.to_dict() for o in self.outputs],
            "source": self.source,
        }

    def check(self) -> None:
        """Raise SpecError if the declaration is inconsistent; run when a node is registered."""
        where = f"node type {self.type!r}"
        if not isinstance(self.type, str) or not _TYPE_ID.match(self.type):
            raise SpecError(f"{where}: the type id must be letters, digits, '_', '.' or '-'")
        if not isinstance(self.version, int) or isinstance(self.version, bool) or self.version < 1:
            raise SpecError(f"{where}: version must be a whole number >= 1")
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise SpecError(f"{where}: duplicate input names")
        out_names = [o.name for o in self.outputs]
        if len(set(out_names)) != len(out_names):
            raise SpecError(f"{where}: duplicate output names")
        for inp in self.inputs:
            if not _NAME.match(inp.name):
                raise SpecError(f"{where}: input name {inp.name!r} is not an identifier")
            if inp.type not in SOCKET_TYPES and inp.type not in WIDGET_TYPES:
                raise SpecError(f"{where}: input {inp.name!r} has unknown type {inp.type!r}")
            if inp.is_socket:
                continue
            if inp.multi:
                raise SpecError(f"{where}: only sockets can take several links ({inp.name!r})")
            problem = check_param_value(inp, inp.default)
            if problem and not (inp.type == "PATH" and inp.default == ""):
                raise SpecError(f"{where}: default of {inp.name!r} is invalid: {problem}")
            if inp.type == "ENUM" and not inp.choices:
                raise SpecError(f"{where}: enum {inp.name!r} has no choices")
            if inp.type == "PATH" and inp.path_kind not in PATH_KINDS:
                raise SpecError(f"{where}: path {inp.name!r} has unknown kind {inp.path_kind!r}")
        for out in self.outputs:
            if not _NAME.match(out.name):
                raise SpecError(f"{where}: output name {out.name!r} is not an identifier")
            if out.type not in SOCKET_TYPES:
                raise SpecError(f"{where}: output {out.name!r} must be a socket type, not {out.type!r}")
        for v, fn in self.migrations.items():
            if not isinstance(v, int) or not 1 <= v < self.version or not callable(fn):
                raise SpecError(f"{where}: migration keys must be versions below {self.version}")


def node(*, type: str, version: int = 1, category: str, description: str, inputs=(), outputs=(),
         side_effect: bool = False, migrations: dict | None = None, display_name: str = "",
         fingerprint: Callable[[dict], str] | None = None):
    """Declare the decorated function as the implementation of a node type.

    The function is called as fn(ctx, **inputs) with every socket and param by name (a multi socket
    gets a list) and returns its outputs: a single value for one output, a tuple or a name -> value
    dict for several.
    """

    def wrap(fn):
        spec = NodeSpec(type=type, version=version, category=category, description=description,
                        inputs=tuple(inputs), outputs=tuple(outputs), fn=fn, side_effect=side_effect,
                        migrations=dict(migrations or {}), display_name=display_name,
                        fingerprint=fingerprint)
        spec.check()
        fn.__node_spec__ = spec
        return fn

    return wrap


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_param_value(inp: Input, value: Any) -> str | None:
    """Return a problem description if `value` is not acceptable for widget `inp`, else None."""
    t = inp.type
    if t == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"must be a whole number, got {describe_value(value)}"
    elif t == "FLOAT":
        if not _is_number(value):
            return f"must be a number, got {describe_value(value)}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value}"
    elif t == "BOOL":
        if not isinstance(value, bool):
            return f"must be true or false, got {describe_value(value)}"
    elif t in ("STRING", "PATH"):
        if not isinstance(value, str):
            return f"must be text, got {describe_value(value)}"
        if "\x00" in value:
            return "must not contain NUL characters"
        if inp.check is not None:
            return inp.check(value)
    elif t == "ENUM":
        if not isinstance(value, str) or value not in (inp.choices or ()):
            return f"must be one of {', '.join(inp.choices or ())}; got {describe_value(value)}"
    if t in ("INT", "FLOAT"):
        if inp.min is not None and value < inp.min:
            return f"{value} is below the minimum {inp.min}"
        if inp.max is not None and value > inp.max:
            return f"{value} is above the maximum {inp.max}"
    return None


def describe_value(value: Any) -> str:
    """A short, safe description of any JSON value for error messages (never huge, never recursive)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) >= 10**30:
            return f"a {int(value.bit_length() * 0.30103) + 1}-digit number"
        return repr(value)
    if isinstance(value, str):
        return repr(value if len(value) <= 40 else value[:37] + "...")
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, dict):
        return f"an object with {len(value)} keys"
    return type(value).__name__
