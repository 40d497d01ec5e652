"""One test per kind of validation problem; each message names the node id and its title."""

import pytest

from app.graph.validate import validate


def only(problems):
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def check(problem, node_id, title, *words):
    text = str(problem)
    assert problem.node_id == node_id and text.startswith(f"node {node_id} ({title}): "), text
    for w in words:
        assert w in text, text


def test_valid_graph_has_no_problems(registry, build):
    g = build(("1", "TestConst", {"value": 2}), ("2", "TestAdd", {}), links=[("1", "out", "2", "items")])
    assert validate(g, registry) == []


def test_unknown_node_type(registry, build):
    g = build(("1", "TestConst", {}))
    g.add_node("NoSuchNode", 1, {}, node_id="2", title="Mystery")
    check(only(validate(g, registry)), "2", "Mystery", "unknown node type 'NoSuchNode'")


def test_missing_required_input(registry, build):
    g = build(("5", "TestAdd", {}))
    check(only(validate(g, registry)), "5", "TestAdd", "required input 'items' (DATASET) is not connected")


def test_optional_input_may_stay_unconnected(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestPair", {}), links=[("1", "out", "2", "a")])
    assert validate(g, registry) == []


def test_incompatible_socket_types(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestUse", {}), links=[("1", "out", "2", "buckets")])
    check(only(validate(g, registry)), "2", "TestUse", "cannot link TestConst.out (DATASET)", "'buckets' (BUCKETS)")


def test_too_many_links_into_a_single_input(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestConst", {}), ("3", "TestPair", {}),
              links=[("1", "out", "3", "a"), ("2", "out", "3", "a")])
    check(only(validate(g, registry)), "3", "TestPair", "takes one link but has 2")


@pytest.mark.parametrize("params,words", [
    ({"value": "3"}, ["'value'", "must be a whole number", "'3'"]),
    ({"value": 2.5}, ["must be a whole number"]),
    ({"value": True}, ["must be a whole number", "true"]),
    ({"tag": 5}, ["'tag'", "must be text"]),
    ({"value": [1]}, ["a list of 1 items"]),
])
def test_param_of_the_wrong_type(registry, build, params, words):
    check(only(validate(build(("1", "TestConst", params)), registry)), "1", "TestConst", *words)


@pytest.mark.parametrize("params,words", [
    ({"ratio": 1.5}, ["'ratio'", "1.5 is above the maximum 1.0"]),
    ({"ratio": -0.1}, ["below the minimum 0.0"]),
    ({"ratio": float("nan")}, ["must be a finite number"]),
    ({"ratio": 10 ** 400}, ["above the maximum"]),
    ({"flag": "yes"}, ["'flag'", "must be true or false"]),
])
def test_param_out_of_range_or_wrong_kind(registry, build, params, words):
    g = build(("1", "TestFlag", {"folder": "/data", **params}))
    check(only(validate(g, registry)), "1", "TestFlag", *words)


def test_param_not_among_the_choices(registry, build):
    g = build(("1", "TestFlag", {"folder": "/data", "mode": "c"}))
    check(only(validate(g, registry)), "1", "TestFlag", "'mode'", "must be one of a, b", "'c'")


def test_unknown_param(registry, build):
    g = build(("1", "TestConst", {"valeu": 3}))
    check(only(validate(g, registry)), "1", "TestConst", "unknown param 'valeu'")


def test_unset_required_path(registry, build):
    g = build(("1", "TestFlag", {}))
    check(only(validate(g, registry)), "1", "TestFlag", "choose a folder for 'folder'")


def test_unset_required_path_on_a_real_node_explains_what_to_choose(registry, build):
    g = build(("2", "Concept", {}))
    check(only(validate(g, registry)), "2", "Concept", "choose a folder for 'folder'", "the folder of images")


def test_link_from_a_missing_node(registry, build):
    g = build(("2", "TestAdd", {}))
    g.add_link("9", "out", "2", "items")
    check(only(validate(g, registry)), "2", "TestAdd", "comes from a missing node '9'")


def test_link_to_a_missing_node(registry, build):
    g = build(("1", "TestConst", {}))
    g.add_link("1", "out", "8", "items")
    check(only(validate(g, registry)), "1", "TestConst", "goes to a missing node '8'")


def test_link_from_a_missing_output(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}), links=[("1", "nope", "2", "items")])
    check(only(validate(g, registry)), "2", "TestAdd", "output 'nope', which does not exist")


def test_link_to_a_missing_input(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}),
              links=[("1", "out", "2", "items"), ("1", "out", "2", "nope")])
    check(only(validate(g, registry)), "2", "TestAdd", "input 'nope', which TestAdd does not have")


def test_link_into_a_param(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}),
              links=[("1", "out", "2", "items"), ("1", "out", "2", "bias")])
    check(only(validate(g, registry)), "2", "TestAdd", "'bias', which is a param")


def test_cycle_names_its_nodes(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}), ("3", "TestAdd", {}), ("4", "TestAdd", {}),
              links=[("1", "out", "2", "items"), ("2", "out", "3", "items"), ("3", "out", "4", "items"),
                     ("4", "out", "2", "items")])
    check(only(validate(g, registry)), "2", "TestAdd", "cycle", "2 (TestAdd) -> 3 (TestAdd) -> 4 (TestAdd)")


def test_self_loop_is_a_cycle(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}), links=[("1", "out", "2", "items"),
                                                                   ("2", "out", "2", "items")])
    check(only(validate(g, registry)), "2", "TestAdd", "cycle")


def test_every_problem_is_reported_not_just_the_first(registry, build):
    g = build(("1", "TestConst", {"value": 5000}), ("2", "TestAdd", {}), ("3", "TestFlag", {"mode": "z"}))
    g.add_node("Nope", 1, {}, node_id="4")
    nodes = sorted(p.node_id for p in validate(g, registry))
    assert nodes == ["1", "2", "3", "3", "4"]


def test_deep_graph_does_not_recurse(registry, build):
    n = 5000
    nodes = [("1", "TestConst", {})] + [(str(i), "TestAdd", {}) for i in range(2, n + 1)]
    links = [(str(i), "out", str(i + 1), "items") for i in range(1, n)]
    assert validate(build(*nodes, links=links), registry) == []


@pytest.mark.parametrize("node_type, value, ok", [("Bucketer", "512", True), ("Bucketer", "512,768", True),
                                                   ("Bucketer", "1024x768", True), ("Bucketer", "abc", False),
                                                   ("Bucketer", "", False), ("Augment", "", True),
                                                   ("Augment", "768", True), ("Augment", "7x", False)])
def test_a_param_check_catches_bad_text_before_anything_runs(registry, build, node_type, value, ok):
    g = build(("1", node_type, {"resolution": value}))
    problems = [p for p in validate(g, registry) if "resolution" in str(p)]
    if ok:
        assert problems == []
    else:
        check(only(problems), "1", node_type, "param 'resolution'", "not understood")
