"""The node catalogue: built-in node modules from `nodes/` plus user plugins.

Plugins are Python files (or packages) in a user folder: `$NODETRAINER_NODES` (several folders
separated by os.pathsep), `~/.config/nodetrainer/nodes` (or `$XDG_CONFIG_HOME/nodetrainer/nodes`),
and any `--nodes-dir` given on the command line. A plugin that fails to import or declares a broken
node is reported and skipped; it never takes the program down, and it can never replace a built-in
node type.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType

from app.graph.spec import NodeSpec, SpecError

BUILTIN_DIR = Path(__file__).resolve().parents[2] / "nodes"


@dataclass(frozen=True)
class PluginProblem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"plugin {self.path}: {self.message} (skipped)"


def user_plugin_dirs() -> list[Path]:
    dirs = [Path(p) for p in os.environ.get("NODETRAINER_NODES", "").split(os.pathsep) if p]
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    dirs.append(config / "nodetrainer" / "nodes")
    return dirs


class Registry:
    def __init__(self) -> None:
        self.specs: dict[str, NodeSpec] = {}
        self.problems: list[PluginProblem] = []

    def get(self, type_id: str) -> NodeSpec | None:
        return self.specs.get(type_id)

    def __contains__(self, type_id: str) -> bool:
        return type_id in self.specs

    def __iter__(self):
        return iter(sorted(self.specs.values(), key=lambda s: (s.category, s.type)))

    def __len__(self) -> int:
        return len(self.specs)

    def add(self, spec: NodeSpec, source: str = "builtin") -> None:
        spec.check()
        existing = self.specs.get(spec.type)
        if existing is not None:
            if existing.fn is spec.fn:
                return  # the same function imported into a second module
            if existing.source == "builtin":
                raise SpecError(f"node type {spec.type!r} is built in and cannot be replaced by a plugin")
            raise SpecError(f"node type {spec.type!r} is already defined by {existing.source}")
        self.specs[spec.type] = replace(spec, source=source)

    def add_module(self, module: ModuleType, source: str) -> int:
        """Register every node declared in a module; returns how many were added."""
        count = 0
        for value in list(vars(module).values()):
            spec = getattr(value, "__node_spec__", None)
            if isinstance(spec, NodeSpec):
                owner = getattr(value, "__module__", "") or ""
                if owner != module.__name__ and not owner.startswith(module.__name__ + "."):
                    continue  # imported from elsewhere; registered with its own module
                self.add(spec, source)
                count += 1
        return count

    # ---- discovery --------------------------------------------------------------------------
    def load_builtin(self, folder: Path = BUILTIN_DIR) -> None:
        for path in _module_files(folder):
            name = f"nodes.{path.stem}"
            try:
                self.add_module(importlib.import_module(name), "builtin")
            except Exception as e:  # a broken built-in is a bug, but keep the rest usable
                self.problems.append(PluginProblem(str(path), _describe(e)))

    def load_plugins(self, folders) -> None:
        for folder in folders:
            folder = Path(folder).expanduser()
            if not folder.is_dir():
                continue
            for path in _module_files(folder):
                self.load_plugin_file(path)

    def load_plugin_file(self, path: Path) -> None:
        module_name = "nodetrainer_plugins._" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:10] + "_" + path.stem
        target = path / "__init__.py" if path.is_dir() else path
        try:
            spec = importlib.util.spec_from_file_location(module_name, target,
                                                          submodule_search_locations=[str(path)] if path.is_dir() else None)
            if spec is None or spec.loader is None:
                raise ImportError("not an importable Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            # register atomically: a plugin with one bad node adds none of its nodes
            trial = Registry()
            trial.specs = dict(self.specs)
            added = trial.add_module(module, str(path))
            if added == 0:
                raise SpecError("declares no nodes (decorate node functions with @node)")
            self.specs = trial.specs
        except (KeyboardInterrupt, GeneratorExit):
            raise
        except BaseException as e:  # SystemExit too: a plugin cannot exit the program
            self.problems.append(PluginProblem(str(path), _describe(e)))


def _module_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    out = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith(("_", ".")):
            continue
        if p.suffix == ".py" and p.is_file():
            out.append(p)
        elif p.is_dir() and (p / "__init__.py").is_file():
            out.append(p)
    return out


def _describe(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return f"syntax error at line {e.lineno}: {e.msg}"
    if isinstance(e, SpecError):
        return str(e)
    tb = traceback.extract_tb(e.__traceback__)
    where = f" (line {tb[-1].lineno})" if tb else ""
    return f"{type(e).__name__}: {e}{where}"


_DEFAULT: dict[tuple, Registry] = {}


def load_registry(extra_dirs=(), include_user: bool = True) -> Registry:
    """The built-in catalogue plus plugins; cached per set of folders."""
    key = (tuple(str(d) for d in extra_dirs), include_user, os.environ.get("NODETRAINER_NODES", ""))
    reg = _DEFAULT.get(key)
    if reg is None:
        reg = Registry()
        reg.load_builtin()
        reg.load_plugins([*extra_dirs, *(user_plugin_dirs() if include_user else [])])
        _DEFAULT[key] = reg
    return reg
