"""Sweeps: the cartesian product of swept params runs in one executor, so the nodes upstream of every
swept param run once for all variants; each variant writes its own complete, rerunnable recipe."""

from collections import Counter

import pytest

from app.cli import main
from tests.experiments_recipe import events, tiny_recipe

LRS, RANKS = ("1e-3", "5e-4", "2e-4"), ("2", "4")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    recipe = tiny_recipe(tmp)
    ws, log = tmp / "ws", tmp / "all.jsonl"
    rc = main(["run", str(recipe), "--workspace", str(ws), "--events", str(log),
               "--sweep", f"Optimizer.lr={','.join(LRS)}", "--sweep", f"LoRAInject.rank={','.join(RANKS)}"])
    return rc, recipe, ws, events(log)


def test_sweep_runs_every_combination_in_its_named_sub_workspace(swept):
    rc, _, ws, evs = swept
    assert rc == 0
    names = {f"lr={float(lr):g},rank={r}" for lr in LRS for r in RANKS}
    assert {p.name for p in ws.iterdir()} == names
    done = [e for e in evs if e["event"] == "run_done"]
    assert [e["status"] for e in done] == ["done"] * 6
    for name in names:
        assert (ws / name / "tiny_demo_lora.safetensors").is_file()


def test_upstream_nodes_run_once_for_all_variants(swept):
    _, _, _, evs = swept
    started = Counter(e["type"] for e in evs if e["event"] == "node_start")
    cached = Counter(e["type"] for e in evs if e["event"] == "node_cached")
    for upstream in ("LoadModel", "Concept", "Bucketer"):
        assert (started[upstream], cached[upstream]) == (1, 5), (upstream, started, cached)
    # rank is the outer loop: each rank is injected once and every lr trains on it
    assert (started["LoRAInject"], cached["LoRAInject"]) == (2, 4)
    assert started["Optimizer"] == 6  # settings only: the executor keeps the latest outputs per node
    assert started["TrainLoop"] == 6
    # the "before" samples of the base model are the same in every variant: sampled once
    assert (started["Sample"], cached["Sample"]) == (1 + 6, 0)
    assert sum("Sample before (node 2): the same as in" in e.get("message", "") for e in evs) == 5


def test_each_variant_has_its_own_complete_recipe_that_reruns_it(swept, tmp_path):
    from app.graph.recipe import load_recipe
    from app.graph.registry import load_registry

    _, _, ws, evs = swept
    reg = load_registry()
    for sub in ws.iterdir():
        graph, problems = load_recipe(sub / "recipe.json", reg)
        assert not problems
        lr, rank = sub.name.split(",")
        assert f"{graph.nodes['6'].params['lr']:g}" == lr.split("=")[1]
        assert graph.nodes["5"].params["rank"] == int(rank.split("=")[1])
        assert graph.meta["sweep"]["name"] == sub.name
        assert (graph.nodes["3"].params["folder"]).startswith("/")  # runs from any folder
    # the recipe alone repeats the run: same loss as in the sweep
    name = "lr=0.0005,rank=4"
    log = tmp_path / "one.jsonl"
    assert main(["run", str(ws / name / "recipe.json"), "--workspace", str(tmp_path / "again"),
                 "--events", str(log)]) == 0

    def loss(evs):
        return [e["values"]["loss"] for e in evs if e["event"] == "metric" and "loss" in e.get("values", {})]

    assert loss(events(log)) == loss(events(ws / name / "events.jsonl"))


def test_bad_sweeps_are_refused_before_anything_runs(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path)
    ws = tmp_path / "ws"
    assert main(["run", str(recipe), "--workspace", str(ws), "--sweep", "Optimizer.lr=1e-3,fast"]) == 2
    assert "not a number" in capsys.readouterr().err
    assert main(["run", str(recipe), "--workspace", str(ws), "--sweep", "Nope.lr=1,2"]) == 2
    assert "no node 'Nope'" in capsys.readouterr().err
    assert main(["run", str(recipe), "--workspace", str(ws), "--sweep", "LoRAInject.rank=4,0"]) == 2
    assert not ws.exists()


def test_a_variant_that_did_not_run_leaves_its_once_only_nodes_to_the_next(tmp_path):
    from app.engine.sweep import expand, run_sweep
    from app.graph.recipe import load_recipe
    from app.graph.registry import load_registry

    reg = load_registry()
    recipe = tiny_recipe(tmp_path)
    graph, _ = load_recipe(recipe, reg)
    variants = expand(graph, reg, ["LoRAInject.rank=2,4"])
    variants[0].graph.set_param("3", "folder", str(tmp_path / "gone"))  # the first variant is invalid
    logs: dict[str, list] = {}
    results = run_sweep(reg, variants, recipe=str(recipe), recipe_dir=str(tmp_path), root=tmp_path / "ws",
                        emit_for=lambda v: logs.setdefault(v.name, []).append)
    assert [r.status for _, r in results] == ["invalid", "done"]
    assert "2" in results[1][1].executed  # "Sample before" runs in the variant that really runs
    assert not any("not repeated" in e.get("message", "") for e in logs["rank=4"])
