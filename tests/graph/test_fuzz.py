"""Fuzz: thousands of mutated recipes through load + validate. Only clean outcomes may come out:
a RecipeError (one line) or a list of Problems, each a line naming a node or the recipe."""

import json
import random
from pathlib import Path

from app.graph.problems import Problem, RecipeError
from app.graph.recipe import dumps_recipe, loads_recipe
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[2]
CASES = 3000

WEIRD = [None, True, False, 0, -1, 1.5, 1e308, -1e308, 10 ** 40, -(10 ** 40), float("nan"), float("inf"),
         "", "x", "\x00", "é" * 3, "../../etc/passwd", "builtin:tiny-sd", [], [1, 2], {}, {"a": 1},
         {"type": "Concept"}, [[[[[]]]]], "9" * 300]


def seeds():
    texts = [p.read_text() for p in sorted((ROOT / "presets").glob("*.json"))]
    chain = {"format_version": 1, "nodes": {
        "1": {"type": "TestConst", "version": 1, "params": {"value": 2, "tag": "a"}},
        "2": {"type": "TestAdd", "version": 1, "params": {"bias": 1}},
        "3": {"type": "TestPair", "version": 1, "params": {}},
        "4": {"type": "TestFlag", "version": 1, "params": {"folder": "d", "mode": "a", "ratio": 0.2}},
        "5": {"type": "Bucketer", "version": 1, "params": {"resolution": 512, "enable_bucketing": True}}},
        "links": [{"id": 1, "from_node": "1", "from_output": "out", "to_node": "2", "to_input": "items"},
                  {"id": 2, "from_node": "2", "from_output": "out", "to_node": "3", "to_input": "a"}],
        "ui": {"nodes": {"1": {"pos": [0, 0]}}}}
    return [json.loads(t) for t in texts] + [chain]


def paths(obj, max_depth=12):
    """Every (container, key) location in a JSON value, down to max_depth."""
    out, todo = [], [(obj, 0)]
    while todo:
        value, depth = todo.pop()
        if depth > max_depth:
            continue
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            out.append((value, k))
            todo.append((v, depth + 1))
    return out


def nest(depth):
    v = 1
    for _ in range(depth):
        v = [v]
    return v


def mutate(rng: random.Random, data):
    data = json.loads(json.dumps(data))  # a deep copy that the seeds' shallow depth always allows
    for _ in range(rng.randint(1, 4)):
        locs = paths(data)
        if not locs:
            return data
        container, key = rng.choice(locs)
        op = rng.randrange(7)
        if op == 0:
            container[key] = rng.choice(WEIRD)
        elif op == 1 and isinstance(container, dict):
            del container[key]
        elif op == 2:
            container[key] = nest(rng.choice([5, 50, 500, 900]))
        elif op == 3 and isinstance(container, dict):
            container[rng.choice(["nodes", "links", "type", "version", "params", "from_node", "to_input",
                                  "id", "format_version", "title", "ui", "zz"])] = rng.choice(WEIRD)
        elif op == 4:
            v = container[key]
            container[key] = {"x": v} if rng.random() < 0.5 else [v, v]
        elif op == 5 and isinstance(container, list):
            container.extend(container[: rng.randint(0, 3)])
        elif op == 6 and isinstance(container[key], (int, float)) and not isinstance(container[key], bool):
            container[key] = rng.choice([container[key] * 10 ** 30, -container[key], 2 ** 63, 1e-320])
    return data


def check_clean(text):
    try:
        graph, problems = loads_recipe(text, "fuzz.json", registry=REG)
    except RecipeError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz.json: ")
        return "file"
    problems = problems + validate(graph, REG)
    for p in problems:
        assert isinstance(p, Problem)
        line = str(p)
        assert "\n" not in line and len(line) < 2000, line
        assert line.startswith("node ") or line.startswith("recipe: "), line
    dumps_recipe(graph)  # whatever loaded can be saved again
    return "problems" if problems else "valid"


REG = None


def test_fuzzed_recipes_give_only_clean_errors(registry):
    global REG
    REG = registry
    rng = random.Random(1234)
    base = seeds()
    outcomes = {"file": 0, "problems": 0, "valid": 0}
    for i in range(CASES):
        data = mutate(rng, rng.choice(base))
        try:
            text = json.dumps(data, ensure_ascii=rng.random() < 0.5)
        except (RecursionError, ValueError):
            continue
        kind = rng.randrange(10)
        if kind == 0:  # truncation
            text = text[: rng.randrange(len(text) + 1)]
        elif kind == 1:  # byte noise
            pos = rng.randrange(len(text) + 1)
            text = text[:pos] + rng.choice(["}", "]", ",", "\"", "\\", "\x00", "NaN", "-", "ÿ"]) + text[pos:]
        outcomes[check_clean(text)] += 1
    # a deep nesting bomb, as text
    outcomes[check_clean('{"format_version": 1, "nodes": ' + "[" * 200000 + "]" * 200000 + "}")] += 1
    print(f"fuzz cases: {sum(outcomes.values())} {outcomes}")
    assert sum(outcomes.values()) >= CASES * 0.95
    assert outcomes["file"] > 100 and outcomes["problems"] > 1000
