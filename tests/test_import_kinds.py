"""Each importer reads only its own tool's files: a NodeTrainer recipe, a config of the other tool or a folder is
refused with exit 2, a message naming the file and what it is, and no recipe written (instead of a recipe that
imports the wrong settings as a default SD 1.5 fine-tune)."""

import json
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures" / "import"


@pytest.mark.parametrize("kind, config, says", [
    ("onetrainer", ROOT / "presets" / "tiny_demo.json", "this is a NodeTrainer recipe: open or run it directly"),
    ("kohya", ROOT / "presets" / "tiny_demo.json", "this is a NodeTrainer recipe: open or run it directly"),
    ("onetrainer", FIX / "kohya_ss_sdxl_lora_gui.json", "use 'launch.py import kohya"),
    ("onetrainer", FIX / "kohya_sd15_lora.toml", "use 'launch.py import kohya"),
    ("kohya", FIX / "onetrainer_sd15_lora.json", "use 'launch.py import onetrainer"),
    ("kohya", FIX / "onetrainer_sdxl" / "sdxl_lora.json", "use 'launch.py import onetrainer"),
    ("onetrainer", FIX / "onetrainer_sdxl", "is a folder; give the config file in it (concepts.json, samples.json, "
                                            "sdxl_lora.json)"),
])
def test_a_file_of_another_kind_is_refused_by_name(tmp_path, capsys, kind, config, says):
    out = tmp_path / "recipe.json"
    assert main(["import", kind, str(config), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {config}: " in err and says in err, err
    assert not out.exists()


def test_a_json_of_no_known_tool_is_not_a_onetrainer_config(tmp_path, capsys):
    other = tmp_path / "settings.json"
    other.write_text(json.dumps({"learning_rate": 0.0001, "epochs": 10}))
    assert main(["import", "onetrainer", str(other), "-o", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"{other}: not a OneTrainer config" in err and "__version" in err
    assert not (tmp_path / "r.json").exists()


def test_every_onetrainer_fixture_is_still_read_as_one(tmp_path):
    from app.importers import looks_like

    for path in sorted(FIX.glob("onetrainer_*.json")) + [FIX / "onetrainer_sdxl" / "sdxl_lora.json"]:
        assert looks_like(json.loads(path.read_text())) == "onetrainer", path
    assert looks_like(json.loads((FIX / "kohya_ss_sdxl_lora_gui.json").read_text())) == "kohya"
