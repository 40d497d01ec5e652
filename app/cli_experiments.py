"""Command-line experiments: `run --sweep`, `queue ...`, `compare ...` and `import ...`.

Kept apart from app/cli.py so that the plain commands stay small; the parsers are added to the same
`launch.py` and the exit codes are the same (0 done, 1 a run failed, 2 invalid input, 130 interrupted).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# the same exit codes, and the one Ctrl-C rule (first: stop at the next check; second: stop now)
from app.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_INVALID, EXIT_OK, _InterruptHandler

SWEEP_HELP = ("run the recipe once per value (repeatable: the cartesian product), each in its own sub-workspace "
              "named after the values, e.g. --sweep Optimizer.lr=1e-4,5e-5 --sweep LoRAInject.rank=8,16; nodes "
              "upstream of every swept param run once for all")


def add_parsers(sub, allow_output_help: str) -> None:
    q = sub.add_parser("queue", help="the run queue: add, list, cancel, move, resume, run",
                       description="Runs wait in a queue file ($NODETRAINER_QUEUE, default ./workspace/.queue/"
                                   "queue.json) that survives restarts; 'queue run' works through it in order.")
    q.add_argument("--file", metavar="QUEUE.json", help="the queue file (default: $NODETRAINER_QUEUE or "
                                                        "./workspace/.queue/queue.json)")
    qs = q.add_subparsers(dest="queue_command", metavar="ACTION")
    a = qs.add_parser("add", help="queue a recipe (with --sweep: one run per combination)")
    a.add_argument("recipe")
    a.add_argument("--set", action="append", default=[], metavar="NODE.PARAM=VALUE", help="override a param")
    a.add_argument("--sweep", action="append", default=[], metavar="NODE.PARAM=V1,V2", help=SWEEP_HELP)
    a.add_argument("--workspace", metavar="DIR", help="where outputs go (default: ./workspace/<recipe name>; "
                                                       "a sweep's runs go into sub-folders of it)")
    a.add_argument("--allow-output", action="append", default=[], metavar="DIR", help=allow_output_help)
    qs.add_parser("list", help="show the queue (state, progress, ETA, last loss)").add_argument(
        "--json", action="store_true", help="print the entries as JSON (without the recipe snapshots)")
    c = qs.add_parser("cancel", help="cancel a queued run, or stop a running one (it leaves a backup)")
    c.add_argument("id")
    m = qs.add_parser("move", help="move an entry to a position (1 = first)")
    m.add_argument("id")
    m.add_argument("position", type=int)
    r = qs.add_parser("resume", help="queue an interrupted run again, first, from the newest backup in its workspace")
    r.add_argument("id")
    rm = qs.add_parser("remove", help="remove a finished or queued entry from the list (its outputs stay)")
    rm.add_argument("id")
    run = qs.add_parser("run", help="run queued entries in order until none is left")
    run.add_argument("--once", action="store_true", help="run only the next entry")
    run.add_argument("-v", "--verbose", action="store_true", help="show debug logs")

    cmp_ = sub.add_parser("compare", help="compare finished runs: sample grid, loss curves, settings table")
    cmp_.add_argument("workspaces", nargs="+", metavar="WORKSPACE", help="the runs' workspaces (two or more)")
    cmp_.add_argument("--out", metavar="DIR", help="where to write (default: ./workspace/compare-<time>)")
    cmp_.add_argument("--prompts", metavar="TEXT", help="prompts, one per line or separated by '|' "
                                                        "(default: the first run's sample prompts)")
    cmp_.add_argument("--step", type=int, help="use the periodic save of this step instead of the final output")
    cmp_.add_argument("--seed", type=int, default=1, help="sampling seed (the same for every run)")
    cmp_.add_argument("--steps", type=int, default=20, help="sampler steps")
    cmp_.add_argument("--size", type=int, help="image width and height (default: the run's training resolution)")
    cmp_.add_argument("--no-images", action="store_true", help="only curves and the table (no sampling)")

    imp = sub.add_parser("import", help="write a recipe from a OneTrainer or kohya config")
    imps = imp.add_subparsers(dest="import_kind", metavar="TOOL")
    o = imps.add_parser("onetrainer", help="a OneTrainer config or training preset (.json)")
    o.add_argument("config")
    o.add_argument("-o", "--output", required=True, metavar="RECIPE.json")
    k = imps.add_parser("kohya", help="a kohya sd-scripts config (.toml) or a kohya_ss GUI config (.json)")
    k.add_argument("config")
    k.add_argument("--dataset", metavar="DATASET.toml", help="the dataset config (--dataset_config)")
    k.add_argument("-o", "--output", required=True, metavar="RECIPE.json")


def add_run_sweep(run_parser) -> None:
    run_parser.add_argument("--sweep", action="append", default=[], metavar="NODE.PARAM=V1,V2", help=SWEEP_HELP)


# ---- shared --------------------------------------------------------------------------------------

def _prepare(args, reg, sets, sweeps, workspace_arg):
    """(variants or [(None, graph)], recipe_dir, root workspace) or raise UsageError/RecipeError."""
    from app.engine.sweep import expand
    from app.graph.overrides import apply_set
    from app.graph.recipe import load_recipe

    recipe_path = Path(args.recipe)
    graph, problems = load_recipe(args.recipe, reg)
    if problems:
        from app.graph.problems import RecipeError

        raise RecipeError("; ".join(map(str, problems)))
    root = Path(workspace_arg or os.environ.get("NODETRAINER_WORKSPACE") or Path("workspace") / recipe_path.stem)
    if sweeps:
        return expand(graph, reg, sweeps, sets), str(recipe_path.resolve().parent), root
    for s in sets:
        apply_set(graph, reg, s)
    return [(None, graph)], str(recipe_path.resolve().parent), root


def _check(graph, reg, workspace, recipe_dir, allow_output, name="") -> list:
    from app.graph.validate import validate

    return [f"{name + ': ' if name else ''}{p}" for p in
            validate(graph, reg, workspace=Path(workspace), recipe_dir=Path(recipe_dir), allow_output=allow_output)]


# ---- run --sweep ---------------------------------------------------------------------------------

def cmd_run_sweep(args, reg) -> int:
    """All variants in this process, in one executor that keeps outputs (see app/engine/sweep.py)."""
    from app.engine import threads
    from app.engine.console import ConsoleReporter
    from app.engine.events import Fanout, JsonlWriter
    from app.engine.executor import Executor
    from app.engine.sweep import run_sweep
    from app.graph.overrides import UsageError, find_node
    from app.graph.problems import RecipeError

    if args.worker:
        print("error: --sweep runs in this process (one executor shares the upstream work); drop --worker",
              file=sys.stderr)
        return EXIT_INVALID
    try:
        variants, recipe_dir, root = _prepare(args, reg, args.set, args.sweep, args.workspace)
        targets = [find_node(variants[0].graph, t) for t in args.target]
    except (RecipeError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    problems = [p for v in variants for p in _check(v.graph, reg, root / v.name, recipe_dir, args.allow_output, v.name)]
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.recipe}: {len(problems)} problem(s); nothing was run", file=sys.stderr)
        return EXIT_INVALID
    try:
        threads.apply()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"Sweep: {len(variants)} run(s) in {root}: " + ", ".join(v.name for v in variants), file=sys.stderr)
    executor = Executor(reg, keep_outputs=True, allow_output=args.allow_output)
    previous = signal.signal(signal.SIGINT, _InterruptHandler(executor.cancel))
    all_events = open(args.events, "w", encoding="utf-8") if args.events else None
    files = []

    def emit_for(v):
        print(f"\n== {v.name} ==", file=sys.stderr)
        f = open(root / v.name / "events.jsonl", "w", encoding="utf-8")
        files.append(f)
        tag = lambda e: e.setdefault("variant", v.name)  # noqa: E731
        return Fanout(tag, ConsoleReporter(verbose=args.verbose), JsonlWriter(f),
                      JsonlWriter(all_events) if all_events else None)

    try:
        results = run_sweep(reg, variants, recipe=args.recipe, recipe_dir=recipe_dir, root=root, sets=args.set,
                            sweeps=args.sweep, emit_for=emit_for, targets=targets, executor=executor)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
        for f in files + [all_events]:
            if f:
                f.close()
    print("\nSweep results:", file=sys.stderr)
    for v, r in results:
        print(f"  {v.name:<30} {r.status:<10} {root / v.name}", file=sys.stderr)
    statuses = [r.status for _, r in results]
    if "cancelled" in statuses:
        return EXIT_INTERRUPTED
    if len(results) < len(variants) or any(s != "done" for s in statuses):
        return EXIT_FAILED
    return EXIT_OK


# ---- queue ---------------------------------------------------------------------------------------

def cmd_queue(args, registry_factory) -> int:
    from app.engine.queue import QueueError, RunQueue, table

    queue = RunQueue(args.file)
    action = args.queue_command or "list"
    try:
        if action == "add":
            return _queue_add(args, registry_factory(), queue)
        if action == "list":
            entries = queue.entries()
            if getattr(args, "json", False):
                print(json.dumps([{k: v for k, v in e.items() if k != "recipe"} for e in entries], indent=2))
            elif not entries:
                print(f"The queue is empty ({queue.path}).")
            else:
                print(table(entries))
            return EXIT_OK
        if action == "cancel":
            e = queue.cancel(args.id)
            print(f"entry {e['id']}: {'stopping' if e['state'] == 'running' else e['state']}")
            return EXIT_OK
        if action == "move":
            queue.move(args.id, args.position)
            print(table(queue.entries()))
            return EXIT_OK
        if action == "remove":
            queue.remove(args.id)
            return EXIT_OK
        if action == "resume":
            e = queue.resume(args.id)
            print(f"entry {e['id']} queued again: {e['message']} (run it with 'launch.py queue run')")
            return EXIT_OK
        if action == "run":
            return _queue_run(args, registry_factory(), queue)
    except QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_INVALID


def _queue_add(args, reg, queue) -> int:
    from app.engine.sweep import complete_recipe, sweep_meta
    from app.graph.overrides import UsageError
    from app.graph.problems import RecipeError

    try:
        variants, recipe_dir, root = _prepare(args, reg, args.set, args.sweep, args.workspace)
    except (RecipeError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    planned = []
    for item in variants:
        if isinstance(item, tuple):
            graph, ws, meta, sets, name = item[1], root, None, list(args.set), None
        else:
            graph, ws, name = item.graph, root / item.name, item.name
            meta, sets = sweep_meta(args.recipe, item, args.set, args.sweep), list(args.set) + item.sets
        planned.append((graph, ws, meta, sets, name))
    problems = [p for graph, ws, _, _, name in planned for p in _check(graph, reg, ws, recipe_dir, args.allow_output,
                                                                       name or "")]
    if problems:
        for p in problems:
            print(p, file=sys.stderr)
        print(f"{args.recipe}: {len(problems)} problem(s); nothing was queued", file=sys.stderr)
        return EXIT_INVALID
    stem = Path(args.recipe).stem
    for graph, ws, meta, sets, name in planned:
        data = complete_recipe(graph, reg, recipe_dir, meta)
        e = queue.add(data, source=str(Path(args.recipe).resolve()), recipe_dir=recipe_dir, workspace=str(ws),
                      sets=sets, sweep=name, allow_output=args.allow_output, title=f"{stem} {name}" if name else stem)
        print(f"queued {e['id']}: {e['title']} -> {e['workspace']}")
    print(f"{len(planned)} run(s) added to {queue.path}; 'launch.py queue run' runs them")
    return EXIT_OK


def _queue_run(args, reg, queue) -> int:
    import threading

    from app.engine import threads
    from app.engine.console import ConsoleReporter
    from app.engine.queue import run_queue

    try:
        threads.apply()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    stop = threading.Event()
    previous = signal.signal(signal.SIGINT, _InterruptHandler(stop.set))

    def reporter(entry):
        print(f"\n== queue entry {entry['id']}: {entry['title']} ({entry['workspace']}) ==", file=sys.stderr)
        return ConsoleReporter(verbose=args.verbose)

    try:
        ran = run_queue(queue, reg, reporter=reporter, once=args.once, stop=stop)
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
    print(f"\nRan {ran} entr{'y' if ran == 1 else 'ies'}.", file=sys.stderr)
    from app.engine.queue import table

    entries = queue.entries()
    if entries:
        print(table(entries))
    return EXIT_INTERRUPTED if stop.is_set() else EXIT_OK


# ---- compare and import --------------------------------------------------------------------------

def cmd_compare(args, registry_factory) -> int:
    from app.ml.compare import CompareError, compare_runs

    if len(args.workspaces) < 2:
        print("error: compare needs two or more workspaces", file=sys.stderr)
        return EXIT_INVALID
    prompts = None
    if args.prompts:
        prompts = [p.strip() for p in args.prompts.replace("|", "\n").splitlines() if p.strip()]
    try:
        out = compare_runs(args.workspaces, out=args.out, prompts=prompts, step=args.step, seed=args.seed,
                           steps=args.steps, size=args.size, images=not args.no_images, registry=registry_factory(),
                           log=lambda m: print(m, file=sys.stderr))
    except CompareError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"Comparison written to {out}")
    return EXIT_OK


def cmd_import(args, registry_factory) -> int:
    from app.importers import ImportError_, import_config

    if not args.import_kind:
        print("error: say what to import: 'import onetrainer CONFIG.json' or 'import kohya CONFIG.toml'",
              file=sys.stderr)
        return EXIT_INVALID
    try:
        result = import_config(args.import_kind, args.config, dataset=getattr(args, "dataset", None),
                               output=args.output, registry=registry_factory())
    except ImportError_ as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_INVALID
    for line in result.not_imported:
        print(f"not imported: {line}")
    for p in result.problems:
        print(f"warning: {p}", file=sys.stderr)
    print(f"{args.output}: written ({len(result.mapped)} setting(s) mapped, {len(result.not_imported)} not imported)")
    return EXIT_OK
