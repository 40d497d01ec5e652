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
    if p.is_dir():
        configs = sorted(q.name for q in p.iterdir() if q.suffix.lower() in (".json", ".toml"))[:5]
        raise ImportError_(f"{p}: is a folder; give the config file in it"
                           + (f" ({', '.join(configs)})" if configs else ""))
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


# keys every OneTrainer config has (its UI saves them all; its presets name the method and the model)
ONETRAINER_KEYS = ("__version", "training_method", "model_type", "base_model_name")
# keys of kohya sd-scripts' TOML and of the kohya_ss GUI's JSON
KOHYA_KEYS = ("pretrained_model_name_or_path", "network_module", "LoRA_type", "train_data_dir", "sdxl")


def looks_like(data: dict) -> str | None:
    """What a settings file is, from keys its tool always writes: "nodetrainer", "onetrainer", "kohya" or None.
    The kind the user named is checked against it, so a wrong file is refused instead of half imported."""
    if isinstance(data.get("nodes"), dict) and ("format_version" in data or "links" in data):
        return "nodetrainer"
    if any(k in data for k in ONETRAINER_KEYS):
        return "onetrainer"
    if any(k in data for k in KOHYA_KEYS):
        return "kohya"
    return None


def check_kind(kind: str, data: dict, path: Path) -> None:
    """Refuse a file of another tool, saying what it is and which command reads it."""
    found = looks_like(data)
    if found == kind:
        return
    if found == "nodetrainer":
        raise ImportError_(f"{path}: this is a NodeTrainer recipe: open or run it directly "
                           f"(launch.py run {path}), there is nothing to import")
    if found == "onetrainer":
        raise ImportError_(f"{path}: this is a OneTrainer config: use 'launch.py import onetrainer {path}'")
    if found == "kohya":
        raise ImportError_(f"{path}: this is a kohya config: use 'launch.py import kohya {path}'")
    if kind == "onetrainer":  # kohya's TOML is checked by the keys it needs (pretrained_model_name_or_path)
        raise ImportError_(f"{path}: not a OneTrainer config: it has none of the keys every OneTrainer config has "
                           f"({', '.join(ONETRAINER_KEYS)}); save the config from OneTrainer's UI and import that file")


def import_config(kind: str, config: str | Path, *, dataset: str | Path | None = None, output: str | Path | None = None,
                  registry=None) -> ImportResult:
    """Convert, validate the structure, and write the recipe to ``output`` (atomically) when given."""
    from app.graph.recipe import atomic_write_text, parse_recipe

    if registry is None:
        from app.graph.registry import load_registry

        registry = load_registry()
    data = read_config(config)
    if kind in ("onetrainer", "kohya"):
        check_kind(kind, data, Path(config))
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
