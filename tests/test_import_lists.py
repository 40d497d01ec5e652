"""Steps the importers share between settings: OneTrainer's concepts and samples come inline or from a
file a key names; kohya's save and sample schedules come in steps or epochs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.importers import import_config

FIX = Path(__file__).resolve().parent / "fixtures" / "import"


def _train(recipe):
    return next(n["params"] for n in recipe["nodes"].values() if n["type"] == "TrainLoop")


def _onetrainer(tmp_path, **changes):
    cfg = json.loads((FIX / "onetrainer_sd15_lora.json").read_text())
    cfg.update(changes)
    path = tmp_path / "ot.json"
    path.write_text(json.dumps(cfg))
    for name in ("concepts.json", "samples.json"):
        (tmp_path / name).write_text((FIX / "onetrainer_sdxl" / name).read_text())
    return import_config("onetrainer", path)


@pytest.mark.parametrize("key, file_key, target", [
    ("concepts", "concept_file_name", "Concept nodes"),
    ("samples", "sample_definition_file_name", "TrainLoop.sample_prompts"),
])
def test_onetrainer_lists_come_inline_or_from_the_named_file(tmp_path, key, file_key, target):
    from_file = _onetrainer(tmp_path, **{key: [], file_key: f"{key}.json"})
    assert f"{file_key} -> {target}" in from_file.mapped
    inline = _onetrainer(tmp_path, **{file_key: f"{key}.json"})
    assert any(line.startswith(f"{file_key} = ") and f"holds its {key} inline" in line for line in inline.not_imported)
    assert f"{file_key} -> {target}" not in inline.mapped
    missing = _onetrainer(tmp_path, **{key: [], file_key: "nowhere.json"})
    assert any(line.startswith(f"{file_key} = ") and "cannot read" in line for line in missing.not_imported)
    n_concepts = lambda r: sum(n["type"] == "Concept" for n in r.recipe["nodes"].values())  # noqa: E731
    if key == "concepts":
        assert n_concepts(from_file) == 2 and n_concepts(missing) == 0  # the file's enabled concepts
    else:
        assert "standing in a park" in _train(from_file.recipe)["sample_prompts"]


def test_kohya_schedules_prefer_steps_and_backups_follow_saves(tmp_path):
    base = (FIX / "kohya_sd15_lora.toml").read_text()
    for key in ("save_every_n_epochs", "sample_every_n_epochs"):
        base = "\n".join(line for line in base.splitlines() if not line.startswith(key))
    (tmp_path / "plain.toml").write_text(base)
    steps = tmp_path / "steps.toml"
    steps.write_text(base + "\nsave_every_n_steps = 50\nsave_every_n_epochs = 3\nsample_every_n_steps = 20\n")
    p = _train(import_config("kohya", steps).recipe)
    assert (p["save_every"], p["save_unit"], p["backup_every"], p["backup_unit"]) == (50, "steps", 50, "steps")
    assert (p["sample_every"], p["sample_unit"]) == (20, "steps")
    epochs = tmp_path / "epochs.toml"
    epochs.write_text(base + "\nsave_every_n_epochs = 3\nsample_every_n_epochs = 2\n")
    p = _train(import_config("kohya", epochs).recipe)
    assert (p["save_every"], p["save_unit"], p["backup_every"], p["backup_unit"]) == (3, "epochs", 3, "epochs")
    assert (p["sample_every"], p["sample_unit"]) == (2, "epochs")


def test_kohya_schedule_helper_sets_every_and_unit_and_returns_both():
    from app.importers.kohya import _every

    class B:
        def __init__(self):
            self.params = {}

        def set(self, node, param, value, key=None):
            self.params[param] = (value, key)

    for settings, expected in [
        ({"save_every_n_steps": 9, "save_every_n_epochs": 2}, {"save_every": (9, "save_every_n_steps"),
                                                              "save_unit": ("steps", None)}),
        ({"save_every_n_epochs": 2}, {"save_every": (2, "save_every_n_epochs"), "save_unit": ("epochs", None)}),
        ({}, {}),
    ]:
        b = B()
        got = _every(b, settings, "7", "save")
        assert b.params == expected
        assert got == (settings.get("save_every_n_epochs"), settings.get("save_every_n_steps"))


def test_onetrainer_list_helper_reads_the_file_only_without_an_inline_list(tmp_path):
    from app.importers.onetrainer import _inline_or_file

    class B:
        def __init__(self):
            self.mapped, self.skipped = [], []

        def skip(self, key, value, why):
            self.skipped.append((key, value, why))

    (tmp_path / "list.json").write_text('[{"name": "a"}]')
    b = B()
    assert _inline_or_file(b, {"concept_file_name": "list.json"}, tmp_path, "concepts", "concept_file_name",
                           "Concept nodes") == [{"name": "a"}]
    assert b.mapped == ["concept_file_name -> Concept nodes"] and not b.skipped
    b = B()
    assert _inline_or_file(b, {"concepts": [1], "concept_file_name": "list.json"}, tmp_path, "concepts",
                           "concept_file_name", "Concept nodes") == [1]
    assert not b.mapped and b.skipped[0][:2] == ("concept_file_name", "list.json")
