"""Importing other trainers' configs as NodeTrainer recipes (pure data: no torch).

    launch.py import onetrainer CONFIG.json -o RECIPE.json
    launch.py import kohya CONFIG.toml [--dataset DATASET.toml] -o RECIPE.json   (also kohya_ss GUI .json)

Every setting of the source is either mapped onto a node param or listed as
``not imported: KEY = VALUE (why)``; the list is printed and kept in the recipe's
``meta.imported.not_imported``, so nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


class ImportError_(ValueError):
    """A config that cannot be imported: the message names the file and what to do."""


@dataclass
class ImportResult:
    recipe: dict
    mapped: list[str] = field(default_factory=list)  # "KEY -> Node.param"
    not_imported: list[str] = field(default_factory=list)  # "KEY = VALUE (why)"
    problems: list[str] = field(default_factory=list)  # validation of the written recipe (missing folders...)


def read_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ImportError_(f"{p}: no such file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ImportError_(f"{p}: cannot read the file ({e})") from None
    if p.suffix.lower() == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ImportError_(f"{p}: not valid TOML ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ImportError_(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ImportError_(f"{p}: expected a JSON object of settings, found {type(data).__name__}")
    return data


def import_config(kind: str, config: str | Path, *, dataset: str | Path | None = None, output: str | Path | None = None,
                  registry=None) -> ImportResult:
    """Convert, validate the structure, and write the recipe to ``output`` (atomically) when given."""
    from app.graph.recipe import atomic_write_text, parse_recipe

    if registry is None:
        from app.graph.registry import load_registry

        registry = load_registry()
    data = read_config(config)
    if kind == "onetrainer":
        from app.importers.onetrainer import convert

        result = convert(data, Path(config), registry)
    elif kind == "kohya":
        from app.importers.kohya import convert

        result = convert(data, Path(config), registry, dataset=read_config(dataset) if dataset else None,
                         dataset_path=Path(dataset) if dataset else None)
    else:
        raise ImportError_(f"unknown config kind {kind!r} (onetrainer or kohya)")
    graph, problems = parse_recipe(result.recipe, str(config), registry)
    if problems:  # a mapping error of this importer, not of the user's file
        raise ImportError_(f"{config}: the converted recipe is not valid: " + "; ".join(map(str, problems)))
    if output:
        from app.graph.validate import validate

        out = Path(output)
        result.problems = [str(p) for p in validate(graph, registry, recipe_dir=out.resolve().parent)]
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out, json.dumps(result.recipe, indent=2, ensure_ascii=False) + "\n")
    return result
