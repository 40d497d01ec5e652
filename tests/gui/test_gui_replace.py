"""Replacing the open recipe deletes every node on the canvas. Dear PyGui segfaults when a node
with two or more links is deleted before its links, so these run the editor in a subprocess: a
crash is a failed test with its exit status, not a dead test run."""

import json
import subprocess
import sys
import textwrap

from tests.gui.conftest import ROOT

PRESETS = ROOT / "presets"

SCRIPT = textwrap.dedent("""
    import json, sys
    import dearpygui.dearpygui as dpg
    from app.graph.registry import load_registry
    from app.gui.editor import Editor
    from tests.gui.conftest import FakeRunner

    dpg.create_context()
    ed = Editor(load_registry([]), runner=FakeRunner(), autosave=False)
    seen = []

    def canvas():
        kids = dpg.get_item_children(ed.node_editor)
        items = [i for slot in kids.values() for i in slot]
        kinds = [dpg.get_item_type(i).rsplit("::", 1)[-1] for i in items]
        return {"nodes": sorted(ed.canvas.nodes), "recipe": sorted(ed.doc.graph.nodes),
                "dpg_nodes": kinds.count("mvNode"), "dpg_links": kinds.count("mvNodeLink"),
                "links": len(ed.doc.graph.links)}

    for step in sys.argv[1].split(","):
        if step == "new":
            ed.new()
        elif step.startswith("del:"):  # Del on a node (here: the one with most links)
            nid = max(ed.doc.graph.nodes, key=lambda n: sum(n in (l.from_node, l.to_node) for l in ed.doc.graph.links))
            ed.doc.remove([nid])
            ed.after_edit()
        else:
            assert ed.open_path(step), ed.message
        seen.append(canvas())
    print(json.dumps(seen))
    dpg.destroy_context()
""")


def run_steps(steps):
    r = subprocess.run([sys.executable, "-c", SCRIPT, ",".join(steps)], cwd=str(ROOT), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, f"the editor died (exit {r.returncode}):\n{r.stderr[-3000:]}"
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_opening_recipes_over_each_other_and_new_never_crash_and_leave_only_the_new_recipe():
    p = lambda name: str(PRESETS / f"{name}.json")  # noqa: E731
    steps = [p("sd15_lora"), p("tiny_demo"), "new", p("sdxl_lora"), p("sd15_lora"), p("sd15_finetune"), "new",
             "new", p("tiny_demo"), p("sdxl_lora"), "del:", p("tiny_demo")]
    seen = run_steps(steps)
    assert len(seen) == len(steps)
    for step, c in zip(steps, seen):
        assert c["nodes"] == c["recipe"], (step, c)
        assert c["dpg_nodes"] == len(c["recipe"]) and c["dpg_links"] == c["links"], (step, c)
        if step not in ("new", "del:"):
            want = json.loads(open(step).read())
            assert c["recipe"] == sorted(want["nodes"]) and c["links"] == len(want["links"]), step
    assert seen[2]["nodes"] == [] and seen[2]["dpg_links"] == 0


def test_deleting_a_node_with_several_links_keeps_the_other_nodes_and_links():
    seen = run_steps([str(PRESETS / "sd15_lora.json"), "del:"])
    before, after = seen
    assert len(after["recipe"]) == len(before["recipe"]) - 1
    assert after["links"] <= before["links"] - 2  # the node had at least two links
    assert after["dpg_links"] == after["links"] and after["dpg_nodes"] == len(after["recipe"])
