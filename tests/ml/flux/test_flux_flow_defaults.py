"""FlowSettings' defaults, the FlowObjective node's and TrainLoop's unlinked Flux default are one set of values
(where each comes from is written in FlowSettings' docstring), so a default node and no node train alike."""

import dataclasses
from types import SimpleNamespace

from app.graph.registry import load_registry
from app.ml.flux.flow import FlowSettings
from app.ml.models.families import FLUX_DEV
from nodes.training import _objective_settings

NODE_FIELDS = ("timesteps", "logit_mean", "logit_scale", "shift", "shift_value", "weighting", "guidance")


def test_flow_objective_node_defaults_are_flow_settings_defaults():
    spec = load_registry(include_user=False).get("FlowObjective")
    node = {i.name: i.default for i in spec.inputs}
    settings = FlowSettings()
    assert {k: node[k] for k in NODE_FIELDS} == {k: getattr(settings, k) for k in NODE_FIELDS}
    assert (node["loss"], node["huber_delta"]) == ("mse", 0.1)


def test_unlinked_trainloop_on_flux_uses_the_same_defaults():
    p = {"masked_training": False, "unmasked_probability": 0.0, "unmasked_weight": 0.0, "normalize_masked_area": False}
    ctx = SimpleNamespace(title="", node_type="TrainLoop", node_id="t")
    bundle = SimpleNamespace(family=FLUX_DEV)
    spec = load_registry(include_user=False).get("FlowObjective")
    linked = {"kind": "flow", "node": "FlowObjective (node f)", "params": {i.name: i.default for i in spec.inputs}}
    unlinked_settings, unlinked_flow, _ = _objective_settings(p, bundle, None, ctx)
    node_settings, node_flow, _ = _objective_settings(p, bundle, linked, ctx)
    assert unlinked_flow == node_flow == FlowSettings()
    assert dataclasses.asdict(unlinked_settings) == dataclasses.asdict(node_settings)
