"""Command-line interface: `launch.py [gui|nodes|validate|run] ...`.

`--help`, `nodes` and `validate` never import torch (nor the executor): they must answer at once
(`validate --plan`, which builds the models on torch's ``meta`` device, is the exception).
Exit codes of `run`: 0 done, 1 a node failed, 2 invalid recipe or usage, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130
ALLOW_OUTPUT_HELP = ("a folder outside the workspace that the recipe may write to (repeatable), e.g. ComfyUI's "
                     "models/loras; $NODETRAINER_ALLOW_OUTPUT lists more (separated by os.pathsep)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="launch.py",
        description="NodeTrainer: build diffusion-model training recipes as node graphs, validate and run them.",
        epilog="Without a command, the editor opens. Exit codes of 'run': 0 done, 1 a node failed, "
               "2 invalid recipe or usage, 130 interrupted.")
    ap.add_argument("--nodes-dir", action="append", default=[], metavar="DIR",
                    help="also load node plugins from DIR (repeatable); see README 'Writing a node'")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")

    g = sub.add_parser("gui", help="open the editor (the default)")
    g.add_argument("recipe", nargs="?", help="a recipe to open")
    g.add_argument("--screenshot", metavar="PNG", help="render, save a screenshot and exit")
    g.add_argument("--frames", type=int, default=5, help="frames to render before the screenshot")

    n = sub.add_parser("nodes", help="list every node type with its inputs and outputs")
    n.add_argument("--json", action="store_true", help="print the catalogue as JSON")
    n.add_argument("--category", help="only this category")

    v = sub.add_parser("validate", help="check a recipe; exit 0 if valid, 2 with every problem if not")
    v.add_argument("recipe")
    v.add_argument("--json", action="store_true", help="print problems as JSON")
    v.add_argument("--allow-output", action="append", default=[], metavar="DIR", help=ALLOW_OUTPUT_HELP)
    v.add_argument("--workspace", metavar="DIR", help="the workspace a run would use, for the check of written paths "
                                                      "(default: as for run)")
    v.add_argument("--plan", action="store_true",
                   help="also print each TrainLoop's predicted peak device memory, broken down (loads no weights; "
                        "imports torch)")
    v.add_argument("--fit", metavar="SIZE", help="with the plan, the cheapest changes that fit SIZE (e.g. 12GB, "
                                                 "11.5GiB, 8000MB; a bare 8 is 8 GB), or that nothing does")

    r = sub.add_parser("run", help="run a recipe (only what the targets need)")
    r.add_argument("recipe")
    r.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE",
                   help="override a param; NODE is a node id, title or type (repeatable)")
    r.add_argument("--target", action="append", default=[], metavar="NODE",
                   help="run only what this node needs (repeatable; default: every sink)")
    r.add_argument("--events", metavar="FILE.jsonl", help="write the event stream as JSON lines")
    r.add_argument("--workspace", metavar="DIR",
                   help="where outputs go (default: ./workspace/<recipe name>)")
    r.add_argument("--worker", action="store_true", help="run in a separate worker process")
    r.add_argument("--allow-output", action="append", default=[], metavar="DIR", help=ALLOW_OUTPUT_HELP)
    r.add_argument("-v", "--verbose", action="store_true", help="show tracebacks and debug logs")
    from app.cli_experiments import add_parsers, add_run_sweep

    add_run_sweep(r)
    add_parsers(sub, ALLOW_OUTPUT_HELP)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.as_program = argv is None  # launch.py itself, not a caller in the same process (tests)
    cmd = args.command or "gui"
    try:
        if cmd == "nodes":
            return cmd_nodes(args)
        if cmd == "validate":
            return cmd_validate(args)
        if cmd == "run":
            return cmd_run(args)
        if cmd in ("queue", "compare", "import"):
            from app import cli_experiments

            return getattr(cli_experiments, f"cmd_{cmd}")(args, lambda: _registry(args))
        return cmd_gui(args)
    except BrokenPipeError:
        return EXIT_OK
    except KeyboardInterrupt:  # Ctrl-C before a run could stop cooperatively (imports, start-up)
        print("\nInterrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED


def _registry(args):
    from app.graph.registry import load_registry

    reg = load_registry(args.nodes_dir)
    for p in reg.problems:
        print(f"warning: {p}", file=sys.stderr)
    return reg


# ---- nodes -----------------------------------------------------------------------------------

def cmd_nodes(args) -> int:
    reg = _registry(args)
    specs = [s for s in reg if not args.category or s.category == args.category]
    if args.json:
        print(json.dumps([s.to_dict() for s in specs], indent=2))
        return EXIT_OK
    category = None
    for spec in specs:
        if spec.category != category:
            category = spec.category
            print(f"\n== {category} ==")
        flags = "" if spec.pure else "  [writes files: always runs]"
        print(f"\n{spec.title}  (type {spec.type}, v{spec.version}){flags}")
        print(f"  {spec.description}")
        if spec.inputs:
            print("  inputs:")
            for inp in spec.inputs:
                print("    " + _describe_input(inp))
        if spec.outputs:
            print("  outputs:")
            for out in spec.outputs:
                tip = f"  - {out.tooltip}" if out.tooltip else ""
                print(f"    {out.name:<22} {out.type}{tip}")
    print()
    return EXIT_OK


def _describe_input(inp) -> str:
    parts = [f"{inp.name:<22}", inp.type]
    if inp.is_socket:
        parts.append("socket")
        if inp.multi:
            parts.append("(several links)")
    else:
        if inp.type == "PATH":
            parts.append(f"({inp.path_kind})")
        parts.append(f"= {json.dumps(inp.default)}")
        if inp.min is not None or inp.max is not None:
            parts.append(f"[{inp.min if inp.min is not None else ''} .. {inp.max if inp.max is not None else ''}]")
        if inp.choices:
            parts.append("{" + ", ".join(inp.choices) + "}")
    if inp.is_socket or inp.type == "PATH":
        parts.append("optional" if inp.optional else "required")
    text = " ".join(parts)
    return f"{text}  - {inp.tooltip}" if inp.tooltip else text


# ---- validate --------------------------------------------------------------------------------

def load_and_check(path: str, registry, **scope):
    """(graph, problems) or raise RecipeError; shared by validate and run. ``scope``: see write_scope."""
    from app.graph.recipe import load_recipe
    from app.graph.validate import validate

    graph, problems = load_recipe(path, registry)
    return graph, problems + validate(graph, registry, **scope)


def write_scope(args) -> dict:
    """Where a run of this recipe may write (its workspace and the allowed output folders): validate
    and run check every path the recipe writes against it."""
    recipe_path = Path(args.recipe)
    workspace = Path(getattr(args, "workspace", None) or os.environ.get("NODETRAINER_WORKSPACE")
                     or Path("workspace") / recipe_path.stem)
    return {"workspace": workspace, "recipe_dir": recipe_path.resolve().parent, "allow_output": args.allow_output}


def cmd_validate(args) -> int:
    from app.graph.problems import RecipeError

    reg = _registry(args)
    try:
        graph, problems = load_and_check(args.recipe, reg, **write_scope(args))
    except RecipeError as e:
        if args.json:
            print(json.dumps({"valid": False, "error": str(e), "problems": []}))
        else:
            print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    plans = _memory_plans(args, graph, reg) if (args.plan or args.fit) else None
    if args.json:
        out = {"valid": not problems, "problems": [p.to_dict() for p in problems]}
        if plans is not None:
            out["memory"] = {k: v for k, v in plans.items() if k != "text"}
        print(json.dumps(out, indent=2))
    else:
        if problems:
            for p in problems:
                print(p)
            print(f"{args.recipe}: {len(problems)} problem(s)", file=sys.stderr)
        else:
            print(f"{args.recipe}: valid ({len(graph.nodes)} nodes, {len(graph.links)} links)")
        if plans is not None:
            print("\n".join(plans["text"]))
    if plans is not None and plans.get("error"):
        return EXIT_INVALID
    return EXIT_INVALID if problems else EXIT_OK


def _memory_plans(args, graph, registry) -> dict:
    """``validate --plan / --fit``: {"plans": [...], "text": [...]} or {"error": ...} (see app/ml/memory/recipe_plan.py)."""
    from app.ml.memory.recipe_plan import PlanError, parse_size, plan_graph

    try:
        target = parse_size(args.fit) if args.fit else None
        plans = plan_graph(graph, registry, Path(args.recipe).resolve().parent)
    except (PlanError, ValueError) as e:
        return {"error": str(e), "text": [f"memory plan: {e}"]}
    text = [""] + [p.text(target) for p in plans]
    text.append("(device memory of a training step; the CUDA context, about 0.3-0.5 GB, comes on top)")
    return {"plans": [p.to_dict(target) for p in plans], "text": text}


# ---- run -------------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from app.graph.overrides import UsageError, apply_set, find_node
    from app.graph.problems import RecipeError
    from app.graph.recipe import load_recipe, to_data
    from app.graph.validate import validate

    reg = _registry(args)
    if getattr(args, "sweep", None):
        from app.cli_experiments import cmd_run_sweep

        return cmd_run_sweep(args, reg)
    recipe_path = Path(args.recipe)
    try:
        graph, problems = load_recipe(args.recipe, reg)
        for assignment in args.set:  # before validation: an override can fix or cause a problem
            apply_set(graph, reg, assignment)
        targets = [find_node(graph, t) for t in args.target]
    except (RecipeError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    problems += validate(graph, reg, **write_scope(args))
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.recipe}: {len(problems)} problem(s); nothing was run", file=sys.stderr)
        return EXIT_INVALID

    from app.engine.console import ConsoleReporter
    from app.engine.events import Fanout, JsonlWriter
    from app.ml import dist

    main_process = True
    if dist.launched_distributed() and args.worker:
        print("error: --worker cannot be combined with accelerate launch", file=sys.stderr)
        return EXIT_INVALID
    notes = None
    if getattr(args, "as_program", False) and not args.worker and not dist.launched_distributed():
        from app.engine import supervisor

        if supervisor.available():  # before torch: a child runs the recipe, this process reports its crash
            guarded = supervisor.fork_guarded(args.events)
            if isinstance(guarded, int):
                return guarded
            notes = guarded
    if not args.worker:  # the worker applies the same policy itself
        from app.engine import threads

        try:
            n_threads, why = threads.apply()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_INVALID
        if args.verbose:
            print(f"torch uses {n_threads} CPU thread(s) ({why})", file=sys.stderr)
    if dist.launched_distributed():  # `accelerate launch launch.py run ...`: one process per device
        dist.init()
        main_process = dist.is_main()
    workspace = Path(args.workspace or os.environ.get("NODETRAINER_WORKSPACE") or Path("workspace") / recipe_path.stem)
    events_file = open(args.events, "w", encoding="utf-8") if args.events and main_process else None
    resume = _ResumeHint()
    emit = Fanout(ConsoleReporter(verbose=args.verbose) if main_process else None,
                  JsonlWriter(events_file) if events_file else None, resume, notes)
    recipe_dir = str(recipe_path.resolve().parent)
    try:
        if args.worker:
            status = _run_in_worker(args, reg, to_data(graph), recipe_dir, targets, workspace, emit)
        else:
            status = _run_in_process(reg, graph, recipe_dir, targets, workspace, emit, args.allow_output)
    finally:
        if events_file:
            events_file.close()
    if status == "cancelled" and main_process:
        for command in resume.commands(args, graph):
            print(f"To resume: {command}", file=sys.stderr)
    if status == "done" and workspace.exists() and main_process:
        print(f"Outputs are in {workspace.resolve()}", file=sys.stderr)
    return {"done": EXIT_OK, "cancelled": EXIT_INTERRUPTED, "invalid": EXIT_INVALID}.get(status, EXIT_FAILED)


class _ResumeHint:
    """Remembers the backups that stopped nodes left (their ``resumable`` events), to print the
    command that continues from each: the same command line with the node's resume param set."""

    def __init__(self) -> None:
        self.backups: dict[str, tuple[str, str]] = {}  # node id -> (param, backup path)

    def __call__(self, event: dict) -> None:
        if event.get("event") == "resumable" and event.get("path"):
            self.backups[event.get("node")] = (event.get("param") or "resume_from", str(event["path"]))

    def commands(self, args, graph) -> list[str]:
        return [_resume_command(args, graph, nid, param, path) for nid, (param, path) in self.backups.items()
                if nid in graph.nodes]


def _node_ref(graph, nid: str) -> str:
    """How --set names this node: its title or type when that finds exactly this node, else its id."""
    from app.graph.overrides import UsageError, find_node

    node = graph.nodes[nid]
    for ref in (node.title, node.type):
        try:
            if ref and "=" not in ref and find_node(graph, ref) == nid:
                return ref
        except UsageError:
            continue
    return nid


def _resume_command(args, graph, nid: str, param: str, path: str) -> str:
    import shlex
    import shutil

    from app.graph.overrides import UsageError, find_node

    def same_param(assignment: str) -> bool:  # an earlier --set of this param gives way to the new one
        lhs = assignment.split("=", 1)[0]
        ref, _, name = lhs.rpartition(".")
        try:
            return name == param and find_node(graph, ref) == nid
        except UsageError:
            return False

    prog = sys.argv[0] if Path(sys.argv[0]).name == "launch.py" else "launch.py"
    python = "python" if shutil.which("python") and Path(shutil.which("python")).resolve() == Path(sys.executable).resolve() \
        else sys.executable
    parts = [python, prog]
    for d in args.nodes_dir:
        parts += ["--nodes-dir", d]
    parts += ["run", args.recipe]
    for assignment in args.set:
        if not same_param(assignment):
            parts += ["--set", assignment]
    for t in args.target:
        parts += ["--target", t]
    if args.workspace:
        parts += ["--workspace", args.workspace]
    for d in getattr(args, "allow_output", None) or []:
        parts += ["--allow-output", d]
    if args.worker:
        parts.append("--worker")
    parts += ["--set", f"{_node_ref(graph, nid)}.{param}={path}"]
    return shlex.join(parts)


class _InterruptHandler:
    """First Ctrl-C: stop at the next check. Second: stop now."""

    def __init__(self, cancel) -> None:
        self.cancel = cancel
        self.count = 0

    def __call__(self, signum, frame) -> None:
        self.count += 1
        if self.count == 1:
            print("\nStopping at the next check... (Ctrl-C again to stop immediately)", file=sys.stderr)
            self.cancel()
        else:
            raise KeyboardInterrupt


def _run_in_process(reg, graph, recipe_dir, targets, workspace, emit, allow_output=()) -> str:
    from app.engine.executor import Executor

    executor = Executor(reg, keep_outputs=False, allow_output=allow_output)  # one run: nothing to keep for a next one
    previous = signal.signal(signal.SIGINT, _InterruptHandler(executor.cancel))
    try:
        result = executor.run(graph, targets or None, emit=emit, recipe_dir=recipe_dir, workspace=workspace)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return "cancelled"
    finally:
        signal.signal(signal.SIGINT, previous)
    return result.status


def _run_in_worker(args, reg, data, recipe_dir, targets, workspace, emit) -> str:
    from app.engine.client import WorkerClient

    env = None
    if args.allow_output:  # the worker checks writes against the same allowed folders
        from app.graph.confine import ALLOW_ENV

        env = dict(os.environ)
        env[ALLOW_ENV] = os.pathsep.join([*filter(None, [env.get(ALLOW_ENV)]), *map(os.path.abspath, args.allow_output)])
    client = WorkerClient(nodes_dirs=args.nodes_dir, one_shot=True, env=env)
    previous = signal.signal(signal.SIGINT, _InterruptHandler(client.cancel))
    try:
        ready = client.start()
        if args.verbose and ready.get("threads"):
            print(f"the worker's torch uses {ready['threads']} CPU thread(s) ({ready.get('threads_why')})", file=sys.stderr)
        run_id = client.run(data, source=args.recipe, recipe_dir=recipe_dir, targets=targets,
                            workspace=str(workspace.resolve()))
        done = client.wait_run(run_id, on_event=emit)
        return done.get("status", "error")
    except KeyboardInterrupt:
        client.kill()
        print("Interrupted.", file=sys.stderr)
        return "cancelled"
    finally:
        signal.signal(signal.SIGINT, previous)
        client.shutdown()


# ---- gui -------------------------------------------------------------------------------------

def cmd_gui(args) -> int:
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        # without a display the windowing library aborts the whole process: say why instead
        print("The editor needs a display, and DISPLAY is not set. Run recipes with 'launch.py run RECIPE', "
              "or start the editor under a virtual display: xvfb-run python launch.py gui RECIPE", file=sys.stderr)
        return EXIT_INVALID
    try:
        from app.gui.main import run_editor
    except ImportError as e:
        print(f"The editor cannot start: {e}. Install the dependencies (pip install -e .), or use "
              "'launch.py run RECIPE' and 'launch.py validate RECIPE'.", file=sys.stderr)
        return EXIT_INVALID
    return run_editor(args)
