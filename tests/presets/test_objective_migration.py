"""TrainLoop 1 -> 2: the noise objective's params moved into a NoiseObjective node. Every shipped preset
migrates to the same training (the settings the Trainer gets, and the loss sequence of a short run)."""

import json
from pathlib import Path

import pytest

from app.graph.recipe import dumps_recipe, loads_recipe
from app.graph.registry import load_registry
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted(p.stem for p in (ROOT / "presets").glob("*.json"))
# presets that existed with TrainLoop version 1 (flux_lora was written with its FlowObjective from the start)
SD_PRESETS = [n for n in PRESETS if '"FlowObjective"' not in (ROOT / "presets" / f"{n}.json").read_text()]
V1 = ("prediction", "zero_terminal_snr", "offset_noise", "perturbation_noise", "timesteps", "timestep_bias",
      "timestep_scale", "min_noising", "max_noising", "loss", "huber_delta", "weighting", "min_snr_gamma")


def _v1_objective(params: dict, prediction: str):
    """What TrainLoop version 1 built from its own params (its code, kept here as the reference)."""
    from app.ml.train.objective import ObjectiveSettings

    reg = load_registry(include_user=False)
    d = {i.name: i.default for i in reg.get("NoiseObjective").params}
    p = {**d, **{k: v for k, v in params.items() if k in V1}}
    masked = params.get("masked_training", False)
    return ObjectiveSettings(
        prediction=prediction if p["prediction"] == "auto" else p["prediction"], offset_noise=p["offset_noise"],
        perturbation_noise=p["perturbation_noise"], timesteps=p["timesteps"], timestep_bias=p["timestep_bias"],
        timestep_scale=p["timestep_scale"], min_noising=p["min_noising"], max_noising=p["max_noising"], loss=p["loss"],
        huber_delta=p["huber_delta"], weighting=p["weighting"], min_snr_gamma=p["min_snr_gamma"],
        unmasked_probability=params.get("unmasked_probability", 0.1) if masked else 1.0,
        unmasked_weight=params.get("unmasked_weight", 0.1),
        normalize_masked_area=params.get("normalize_masked_area", False)), p["zero_terminal_snr"]


class _Ctx:
    def __init__(self, node):
        self.node_id, self.node_type, self.title = node.id, node.type, node.title


def _as_version_1(data: dict) -> dict:
    """A shipped (version 2) recipe as it was saved before the objective left TrainLoop: the linked
    NoiseObjective's params back on TrainLoop, the node, its link and its position gone."""
    data = json.loads(json.dumps(data))
    for nid, entry in list(data["nodes"].items()):
        if entry["type"] != "TrainLoop":
            continue
        entry["version"] = 1
        for link in [lk for lk in data["links"] if lk["to_node"] == nid and lk["to_input"] == "objective"]:
            obj = data["nodes"].pop(link["from_node"])
            assert obj["type"] == "NoiseObjective"
            entry["params"].update(obj["params"])
            data["links"].remove(link)
            data.get("ui", {}).get("nodes", {}).pop(link["from_node"], None)
    return data


def test_the_sd_presets_are_the_version_1_presets():
    assert {"sd15_lora", "sdxl_lora", "sd15_finetune", "tiny_demo"} <= set(SD_PRESETS)


@pytest.mark.parametrize("name", SD_PRESETS)
def test_every_preset_migrates_to_the_same_objective(name):
    """Each shipped preset, written as version 1, loads into exactly the shipped file, and TrainLoop gets the
    objective version 1 built from its own params."""
    from types import SimpleNamespace

    from nodes.training import _objective_settings

    reg = load_registry(include_user=False)
    shipped = json.loads((ROOT / "presets" / f"{name}.json").read_text())
    old = _as_version_1(shipped)
    graph, problems = loads_recipe(json.dumps(old), registry=reg)
    assert not problems, problems
    migrated = json.loads(dumps_recipe(graph))
    added = set(migrated["nodes"]) - set(old["nodes"])
    for nid in added:  # where the added node stands is layout: a preset may have moved it since
        migrated.get("ui", {}).get("nodes", {}).pop(nid, None)
        shipped.get("ui", {}).get("nodes", {}).pop(nid, None)
    assert migrated == shipped  # the migration made the shipped file
    for nid, entry in old["nodes"].items():
        if entry["type"] != "TrainLoop":
            continue
        node = graph.nodes[nid]
        assert node.version == 2 and not set(V1) & set(node.params)
        links = graph.links_into(nid, "objective")
        choice = None
        if links:
            obj = graph.nodes[links[0].from_node]
            assert obj.type == "NoiseObjective"
            choice = {"kind": "noise", "node": obj.label(),
                      "params": {**reg.get("NoiseObjective").default_params(), **obj.params}}
        else:  # nothing but defaults: the family default is the same objective
            assert all(entry["params"].get(i.name, i.default) == i.default for i in reg.get("NoiseObjective").params)
        p = {**reg.get("TrainLoop").default_params(), **node.params}
        for prediction in ("epsilon", "v_prediction"):
            bundle = SimpleNamespace(family=SimpleNamespace(objective="noise", display_name="SD"),
                                     prediction_type=prediction)
            got, _, zts = _objective_settings(p, bundle, choice, _Ctx(node))
            assert (got, zts) == _v1_objective(entry["params"], prediction)
        assert not validate(graph, reg) or all("objective" not in str(q).lower() for q in validate(graph, reg))


def test_a_non_default_objective_becomes_a_linked_node_placed_below_trainloop():
    reg = load_registry(include_user=False)
    data = {"format_version": 1,
            "nodes": {"6": {"type": "TrainLoop", "version": 1,
                            "params": {"epochs": 3, "prediction": "v_prediction", "offset_noise": 0.05,
                                       "weighting": "constant", "zero_terminal_snr": True}}},
            "links": [], "ui": {"nodes": {"6": {"pos": [100, 40]}}}}
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems
    assert graph.nodes["6"].params == {"epochs": 3}
    (link,) = graph.links_into("6", "objective")
    obj = graph.nodes[link.from_node]
    assert obj.type == "NoiseObjective" and obj.version == 1
    assert obj.params == {"prediction": "v_prediction", "offset_noise": 0.05, "zero_terminal_snr": True}
    assert graph.ui["nodes"][obj.id]["pos"] == [100, 560]
    # all defaults: nothing to keep, no node added
    data["nodes"]["6"]["params"] = {"epochs": 3, "weighting": "constant", "loss": "mse"}
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems and not graph.links_into("6") and list(graph.nodes) == ["6"]


def test_the_objective_must_suit_the_model(tmp_path):
    """A FlowObjective on an SD model (and a NoiseObjective on Flux) is refused naming both nodes."""
    import sys

    sys.path.insert(0, str(ROOT / "tests" / "nodes"))
    from test_training_nodes import DEMO, lora_recipe

    from app.engine.executor import Executor

    reg = load_registry(include_user=False)
    for source, objective in (("builtin:tiny-sd", "FlowObjective"), ("builtin:tiny-flux", "NoiseObjective")):
        data = lora_recipe(DEMO, {"max_steps": 1}, res="32", save=None)
        data["nodes"]["6"]["version"] = 2
        data["nodes"]["1"]["params"]["source"] = source
        data["nodes"]["3"]["params"]["quantization"] = 16
        data["nodes"]["9"] = {"type": objective, "version": 1, "params": {}}
        data["links"].append({"id": 99, "from_node": "9", "from_output": "objective", "to_node": "6",
                              "to_input": "objective"})
        graph, problems = loads_recipe(json.dumps(data), registry=reg)
        assert not problems
        result = Executor(reg).run(graph, workspace=tmp_path / objective)
        assert result.status != "done"
        text = json.dumps(result.errors if hasattr(result, "errors") else str(result))
        assert f"{objective} (node 9)" in text and "TrainLoop (node 6)" in text, text
