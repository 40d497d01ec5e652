"""The executor matrix: ordering, partial targets, caching and invalidation, side effects, errors,
cycles, cancellation and the immutability of cached outputs (stub nodes only)."""

import threading
import time

import pytest

from app.engine.executor import Executor


def events_of(ex, graph, **kw):
    got = []
    result = ex.run(graph, emit=got.append, **kw)
    return result, got


def kinds(events, kind):
    return [e["node"] for e in events if e["event"] == kind]


def diamond(build):
    #   1 ─┐
    #      ├─ 3 ── 4
    #   2 ─┘        \
    #   5 (independent)
    return build(("1", "TestConst", {"value": 1}), ("2", "TestConst", {"value": 10}),
                 ("3", "TestAdd", {}), ("4", "TestAdd", {"bias": 100}), ("5", "TestConst", {"value": 7}),
                 links=[("1", "out", "3", "items"), ("2", "out", "3", "items"), ("3", "out", "4", "items")])


def test_runs_every_sink_in_topological_order(registry, build):
    ex = Executor(registry)
    result, ev = events_of(ex, diamond(build))
    assert result.status == "done"
    order = kinds(ev, "node_start")
    assert order.index("1") < order.index("3") and order.index("2") < order.index("3") < order.index("4")
    assert set(order) == {"1", "2", "3", "4", "5"}
    assert result.outputs["4"]["out"]["value"] == 111
    assert result.outputs["5"]["out"]["value"] == 7
    assert ev[0]["event"] == "run_start" and ev[-1]["event"] == "run_done" and ev[-1]["status"] == "done"


def test_multi_input_keeps_link_order(registry, build):
    g = build(("1", "TestConst", {"value": 1}), ("2", "TestConst", {"value": 2}), ("3", "TestAdd", {}),
              links=[("2", "out", "3", "items"), ("1", "out", "3", "items")])
    result = Executor(registry).run(g)
    assert result.outputs["3"]["out"]["items"] == (2, 1)


def test_partial_target_runs_only_its_ancestors(registry, build):
    ex = Executor(registry)
    result, ev = events_of(ex, diamond(build), targets=["3"])
    assert sorted(kinds(ev, "node_start")) == ["1", "2", "3"]
    assert set(result.outputs) == {"3"}


def test_rerun_is_fully_cached(registry, build):
    ex = Executor(registry)
    g = diamond(build)
    ex.run(g)
    result, ev = events_of(ex, g)
    assert kinds(ev, "node_start") == []
    assert sorted(kinds(ev, "node_cached")) == ["1", "2", "3", "4", "5"]
    assert result.outputs["4"]["out"]["value"] == 111


def test_param_change_invalidates_only_downstream(registry, build):
    ex = Executor(registry)
    g = diamond(build)
    ex.run(g)
    g.set_param("2", "value", 20)
    result, ev = events_of(ex, g)
    assert sorted(kinds(ev, "node_start")) == ["2", "3", "4"]
    assert sorted(kinds(ev, "node_cached")) == ["1", "5"]
    assert result.outputs["4"]["out"]["value"] == 121
    # a change to a leaf param re-runs the leaf only
    g.set_param("4", "bias", 0)
    _, ev = events_of(ex, g)
    assert kinds(ev, "node_start") == ["4"]


def test_relinking_invalidates(registry, build):
    ex = Executor(registry)
    g = diamond(build)
    ex.run(g)
    link = g.links_into("3")[1]
    g.remove_link(link.id)
    _, ev = events_of(ex, g)
    assert sorted(kinds(ev, "node_start")) == ["3", "4"]


def test_cache_holds_only_latest_outputs_per_node(registry, build):
    ex = Executor(registry)
    g = diamond(build)
    ex.run(g)
    n = len(ex.cache)
    for v in range(5):
        g.set_param("1", "value", v + 50)
        ex.run(g)
    assert len(ex.cache) == n


def test_side_effect_nodes_always_run(registry, build, tmp_path):
    out = tmp_path / "out.txt"
    g = build(("1", "TestConst", {"value": 3}), ("2", "TestWrite", {"path": str(out)}),
              links=[("1", "out", "2", "data")])
    ex = Executor(registry)
    ex.run(g)
    _, ev = events_of(ex, g)
    assert kinds(ev, "node_cached") == ["1"] and kinds(ev, "node_start") == ["2"]
    assert out.read_text() == "3\n3\n"


def test_relative_paths_resolve_against_the_recipe(registry, build, tmp_path):
    g = build(("1", "TestConst", {"value": 4}), ("2", "TestWrite", {"path": "sub/out.txt"}),
              links=[("1", "out", "2", "data")])
    (tmp_path / "sub").mkdir()
    Executor(registry).run(g, recipe_dir=tmp_path)
    assert (tmp_path / "sub" / "out.txt").read_text() == "4\n"


def test_error_names_the_node_and_stops_downstream(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestFail", {"message": "bad caption file x.txt"}), ("3", "TestAdd", {}),
              links=[("1", "out", "2", "data"), ("2", "out", "3", "items")])
    ex = Executor(registry)
    result, ev = events_of(ex, g)
    assert result.status == "error" and result.error_node == "2"
    err = [e for e in ev if e["event"] == "node_error"][0]
    assert err["node"] == "2" and err["message"] == "bad caption file x.txt"
    assert "ValueError" in err["traceback"] and "stubs.py" in err["traceback"]
    assert "3" not in kinds(ev, "node_start")
    assert ev[-1]["status"] == "error" and "node 2 (TestFail)" in ev[-1]["message"]
    # what succeeded before the error is cached for the next run
    g.set_param("2", "message", "still bad")
    _, ev = events_of(ex, g)
    assert kinds(ev, "node_cached") == ["1"]


def test_not_yet_implemented_node_says_so(registry, build):
    g = build(("1", "TestPending", {}))
    result, ev = events_of(Executor(registry), g)
    assert result.status == "error"
    assert "not implemented yet" in [e for e in ev if e["event"] == "node_error"][0]["message"]


def test_cycle_is_refused_before_anything_runs(registry, build):
    g = build(("1", "TestConst", {}), ("2", "TestAdd", {}), ("3", "TestAdd", {}),
              links=[("1", "out", "2", "items"), ("2", "out", "3", "items"), ("3", "out", "2", "items")])
    result, ev = events_of(Executor(registry), g)
    assert result.status == "invalid"
    assert kinds(ev, "node_start") == []
    assert any("cycle" in p.message and "2 (TestAdd) -> 3 (TestAdd)" in p.message for p in result.problems)


def test_cancellation_mid_node(registry, build):
    g = build(("1", "TestSlow", {"steps": 1000, "step_s": 0.005}), ("2", "TestAdd", {}),
              links=[("1", "out", "2", "items")])
    ex = Executor(registry)
    got = []

    def emit(e):
        got.append(e)
        if e["event"] == "progress" and e["value"] >= 5:
            ex.cancel()

    t0 = time.perf_counter()
    result = ex.run(g, emit=emit)
    assert result.status == "cancelled"
    assert time.perf_counter() - t0 < 3
    assert kinds(got, "node_cancelled") == ["1"] and "2" not in kinds(got, "node_start")
    # a cancelled node is not cached: the next run starts it again
    g.set_param("1", "steps", 2)
    result = ex.run(g)
    assert result.status == "done"


def test_cancel_from_another_thread(registry, build):
    g = build(("1", "TestSlow", {"steps": 10000, "step_s": 0.001}))
    ex = Executor(registry)
    threading.Timer(0.2, ex.cancel).start()
    assert ex.run(g).status == "cancelled"


@pytest.mark.parametrize("how", ["setitem", "append"])
def test_consumer_cannot_change_a_cached_output(registry, build, how):
    g = build(("1", "TestConst", {"value": 5}), ("2", "TestMutate", {"how": how}),
              links=[("1", "out", "2", "data")])
    ex = Executor(registry)
    result, ev = events_of(ex, g)
    assert result.status == "error" and result.error_node == "2"
    assert "read-only" in result.error or "tuple" in result.error
    g2 = build(("1", "TestConst", {"value": 5}))
    again = ex.run(g2)
    assert again.cached == ["1"]
    assert again.outputs["1"]["out"]["value"] == 5 and again.outputs["1"]["out"]["items"] == (5,)


def test_numpy_outputs_are_read_only(registry, build):
    g = build(("1", "TestArray", {}), ("2", "TestMutate", {"how": "array"}), links=[("1", "out", "2", "data")])
    ex = Executor(registry)
    result = ex.run(g)
    assert result.status == "error" and "read-only" in result.error
    assert ex.run(build(("1", "TestArray", {}))).outputs["1"]["out"]["array"].tolist() == [0, 0, 0, 0]


def test_two_outputs_feed_different_types(registry, build):
    g = build(("1", "TestConst", {"value": 4}), ("2", "TestPair", {}), ("3", "TestUse", {}),
              links=[("1", "out", "2", "a"), ("2", "second", "3", "buckets")])
    assert Executor(registry).run(g).outputs["3"]["out"]["value"] == 8


def test_unknown_target_is_a_problem(registry, build):
    result = Executor(registry).run(build(("1", "TestConst", {})), targets=["9"])
    assert result.status == "invalid" and "target '9'" in str(result.problems[0])


def test_progress_events_are_throttled(registry, build):
    g = build(("1", "TestSlow", {"steps": 2000, "step_s": 0.0}))
    _, ev = events_of(Executor(registry), g)
    progress = [e for e in ev if e["event"] == "progress"]
    assert 1 <= len(progress) < 100 and progress[-1]["value"] == 2000


def _own_result(registry, build, *, keep, links, targets=None):
    kinds = {"1": ("TestConst", {"value": 3}), "2": ("TestPair", {}), "3": ("TestOwn", {}), "4": ("TestAdd", {})}
    used = sorted({n for src, _, dst, _ in links for n in (src, dst)})
    g = build(*[(n, *kinds[n]) for n in used], links=links)
    result = Executor(registry, keep_outputs=keep).run(g, targets)
    assert result.status == "done", result.problems
    return result.outputs


def test_one_shot_run_lets_the_last_reader_own_its_input(registry, build):
    # 1 -> 2 (pass-through) -> 3 owns it: nothing after 3 reads 1's or 2's output
    links = [("1", "out", "2", "a"), ("2", "first", "3", "data")]
    assert _own_result(registry, build, keep=False, links=links)["3"]["out"]["exclusive"] is True
    # an editor session keeps every output for the next run: never exclusive
    assert _own_result(registry, build, keep=True, links=links)["3"]["out"]["exclusive"] is False


def test_not_exclusive_while_a_later_node_or_the_result_holds_the_object(registry, build):
    # 2 passes 1's dict through; node 4 reads 1's output after node 3: the same object is still live
    later = [("1", "out", "2", "a"), ("2", "first", "3", "data"), ("1", "out", "4", "items")]
    assert _own_result(registry, build, keep=False, links=later)["3"]["out"]["exclusive"] is False
    # the run returns node 1's output (a target): not exclusive either
    direct = [("1", "out", "3", "data")]
    outputs = _own_result(registry, build, keep=False, links=direct, targets=["1", "3"])
    assert outputs["3"]["out"]["exclusive"] is False
    assert _own_result(registry, build, keep=False, links=direct, targets=["3"])["3"]["out"]["exclusive"] is True


def test_one_shot_run_frees_outputs_once_read(registry, build):
    # 1 -> 3 -> 4: while node 4 runs, node 1's output (read only by node 3) is gone in a one-shot
    # run and still held (cached) in an editor session
    seen = registry.get("TestOwn").fn.__globals__["SEEN"]
    g = build(("1", "TestConst", {"value": 3}), ("3", "TestOwn", {}), ("4", "TestOwn", {}),
              links=[("1", "out", "3", "data"), ("3", "out", "4", "data")])
    for keep in (False, True):
        seen.clear()
        events = []
        ex = Executor(registry, keep_outputs=keep)
        assert ex.run(g, emit=events.append).status == "done"
        logs = [e["message"] for e in events if e["event"] == "log" and e["node"] == "4"]
        assert f"earlier inputs alive={[keep]}" in logs, (keep, logs)
        assert bool(ex.cache) is keep
