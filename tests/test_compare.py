"""compare: one grid with every run's samples (same prompts and seeds), one loss plot, a table of the
settings that differ with the final losses, and the recipes, all in one folder."""

import json

import pytest
from PIL import Image

from app.cli import main
from tests.experiments_recipe import tiny_recipe


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    recipe = tiny_recipe(tmp, trainloop={"max_steps": 2, "save_every": 1, "save_unit": "steps"})
    ws = tmp / "ws"
    assert main(["run", str(recipe), "--workspace", str(ws), "--sweep", "LoRAInject.rank=2,4",
                 "--sweep", "Optimizer.lr=1e-3,1e-4"]) == 0
    return tmp, sorted(ws.iterdir())


def test_compare_writes_grid_plot_table_and_recipes_of_every_run(runs):
    tmp, wss = runs
    (wss[0] / "events.jsonl").unlink()  # this run's losses come from its TensorBoard logs instead
    out = tmp / "cmp"
    assert main(["compare", *map(str, wss), "--out", str(out), "--prompts", "red circle|blue square", "--steps", "2",
                 "--size", "64"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    names = [w.name for w in wss]
    assert [r["name"] for r in summary["runs"]] == names
    assert all(isinstance(r["final_loss"], float) for r in summary["runs"])
    assert set(summary["images"]) == set(names) and all(len(v) == 2 for v in summary["images"].values())
    assert summary["differing"] == ["LoRAInject.rank", "Optimizer.lr"]
    grid = Image.open(out / "grid.png")
    cell = Image.open(summary["images"][names[0]][0]).size[1] * 3  # 64 px enlarged to at least 192
    assert grid.size[1] == 40 + cell * len(names)  # one row per run
    # the same prompt and seed: two runs with different adapters draw different pictures
    a, b = (Image.open(summary["images"][n][0]).tobytes() for n in (names[0], names[-1]))
    assert a != b
    table = (out / "compare.md").read_text()
    for name in names:
        assert f"| {name} |" in table
        assert (out / "recipes" / f"{name}.json").is_file()
    assert "| run | LoRAInject.rank | Optimizer.lr | steps | final loss |" in table
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "compare.csv").read_text().count("\n") == 1 + len(names)


def test_compare_names_a_workspace_without_output(runs, tmp_path, capsys):
    _, wss = runs
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    assert main(["compare", str(wss[0]), str(empty), "--out", str(tmp_path / "cmp"), "--no-images"]) == 2
    assert f"{empty}: no saved model or LoRA" in capsys.readouterr().err


def test_compare_a_chosen_step_uses_the_periodic_saves(runs, tmp_path, capsys):
    _, wss = runs
    out = tmp_path / "cmp"
    assert main(["compare", str(wss[0]), str(wss[1]), "--out", str(out), "--step", "1", "--steps", "1",
                 "--size", "64"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["output"].rsplit("/", 2)[1:] for r in summary["runs"]] == [["saves", "step_0000001.safetensors"]] * 2
    assert main(["compare", str(wss[0]), str(wss[1]), "--out", str(out), "--step", "7"]) == 2
    assert "no save of step 7 (saved steps: 1)" in capsys.readouterr().err


def test_compare_full_fine_tunes_samples_their_saved_checkpoints(tmp_path):
    recipe = tiny_recipe(tmp_path)
    data = json.loads(recipe.read_text())
    del data["nodes"]["5"]  # no LoRAInject: TrainLoop fine-tunes the model itself
    data["links"] = [l for l in data["links"] if "5" not in (l["from_node"], l["to_node"])]
    data["links"].append({"id": 99, "from_node": "1", "from_output": "model", "to_node": "7", "to_input": "model"})
    # a diffusers folder: a single file of the tiny model would be read as a full-size SD 1.5
    data["nodes"]["9"]["params"].update(what="full_model", layout="diffusers_folder", path="ft")
    recipe.write_text(json.dumps(data))
    for lr in ("1e-3", "1e-4"):
        assert main(["run", str(recipe), "--workspace", str(tmp_path / lr / "run"), "--set", f"Optimizer.lr={lr}"]) == 0
    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "1e-3" / "run"), str(tmp_path / "1e-4" / "run"), "--out", str(out),
                 "--steps", "1", "--size", "64", "--prompts", "red circle"]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["run", "run (2)"]  # one folder name twice
    assert all(r["output"].endswith("/ft") for r in summary["runs"])
    assert summary["differing"] == ["Optimizer.lr"]


def test_validation_losses_without_a_step_belong_to_the_last_training_step(tmp_path):
    from app.ml.compare import Run, _from_events

    log = tmp_path / "events.jsonl"
    log.write_text("\n".join(json.dumps(e) for e in [
        {"event": "metric", "values": {"loss": 0.5, "smooth_loss": 0.6, "step": 3}},
        {"event": "metric", "values": {"validation_loss": 0.7}},
        {"event": "metric", "values": {"loss": 0.4, "step": 6}},
        {"event": "metric", "values": {"validation_loss": 0.65, "step": 6}}]) + "\n")
    run = Run("r", tmp_path, {}, tmp_path, True)
    assert _from_events(log, run)
    assert run.validation == [(3, 0.7), (6, 0.65)] and run.losses == [(3, 0.5), (6, 0.4)]
