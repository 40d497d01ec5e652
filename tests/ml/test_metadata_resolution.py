"""Saved LoRA metadata names the resolution that was trained, not the family's default."""

from types import SimpleNamespace

from app.ml.models.families import get_family
from app.ml.save.metadata import modelspec, training_metadata


def test_training_metadata_from_what_trainloop_records():
    assert training_metadata({"step": 3, "resolution": (64, 64)}) == {
        "modelspec.resolution": "64x64", "ss_resolution": "(64, 64)"}
    assert training_metadata({"resolution": [1024, 768]})["modelspec.resolution"] == "1024x768"
    assert training_metadata({"step": 3}) == {} and training_metadata(None) == {}


def test_modelspec_takes_a_width_and_height():
    fam = get_family("sd15")
    assert modelspec(fam, kind="lora", title="t")["modelspec.resolution"] == "512x512"  # unknown: the default
    assert modelspec(fam, kind="lora", title="t", resolution=(768, 512))["modelspec.resolution"] == "768x512"


def _ctx(nodes, links, node_id="7"):
    return SimpleNamespace(node_id=node_id, recipe={"nodes": nodes, "links": [
        {"from_node": a, "from_output": o, "to_node": b, "to_input": i} for a, o, b, i in links]})


def test_trainloop_leaves_the_leftover_report_to_its_bucketer():
    from nodes.training import _bucketer_reported

    nodes = {"4": {"type": "Bucketer", "params": {}}, "5": {"type": "Cache", "params": {}},
             "7": {"type": "TrainLoop", "params": {"seed": 42}}}
    through_cache = [("4", "buckets", "5", "buckets"), ("5", "buckets", "7", "buckets")]
    assert _bucketer_reported(_ctx(nodes, through_cache), 42, world=1)
    assert not _bucketer_reported(_ctx(nodes, through_cache), 42, world=2)  # global batches differ
    # two TrainLoops with other seeds: the Bucketer planned with the lowest, not with this one
    nodes2 = {**nodes, "8": {"type": "TrainLoop", "params": {"seed": 1}}}
    links2 = through_cache + [("4", "buckets", "8", "buckets")]
    assert not _bucketer_reported(_ctx(nodes2, links2), 42, world=1)
    assert not _bucketer_reported(_ctx(nodes, []), 42, world=1)  # nothing upstream to rely on
