"""`launch.py validate RECIPE --plan / --fit SIZE / --json`: the memory plan of every shipped preset
before anything loads, the changes that fit a target, and validate staying torch-free without it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.json"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_prints_its_plan(preset, capsys):
    main(["validate", str(preset), "--plan"])  # the presets waiting for a model or data are invalid: still planned
    out = capsys.readouterr().out
    assert "predicted peak device memory:" in out, out
    for part in ("weights ", "activations"):
        assert part in out, (part, out)
    types = {n["type"] for n in json.loads(preset.read_text())["nodes"].values()}
    if "LoRAInject" in types:
        assert "adapter weights (fp32)" in out and "adapter gradients (fp32)" in out and "optimizer state" in out
    if preset.stem == "sd15_finetune":
        assert "full fine-tune" in out and "gradients (" in out


def test_flux_preset_fits_12gb_with_named_changes(capsys):
    rc = main(["validate", str(ROOT / "presets" / "flux_lora.json"), "--fit", "12GB"])
    out = capsys.readouterr().out
    assert rc == 2  # the preset has no model or data set yet; the plan is printed all the same
    line = next(l for l in out.splitlines() if "to fit 12.00 GB" in l)
    assert " -> " in line and ("nf4 transformer" in line or "block swap" in line), line
    after = float(line.rsplit("-> ", 1)[1].split()[0])
    assert after <= 12.0
    assert "Flux.1 dev" in out and "4320 image + 512 text tokens" in out  # the largest bucket at 1024: 1920x576


def test_fit_says_when_nothing_fits_and_accepts_units(capsys):
    main(["validate", str(ROOT / "presets" / "flux_lora.json"), "--fit", "500MiB"])
    assert "to fit 524.3 MB: nothing fits" in capsys.readouterr().out
    assert main(["validate", str(ROOT / "presets" / "tiny_demo.json"), "--fit", "12 bananas"]) == 2
    assert "size '12 bananas' not understood" in capsys.readouterr().out


def test_plan_as_json_for_machines(capsys):
    rc = main(["validate", str(ROOT / "presets" / "tiny_demo.json"), "--plan", "--json", "--fit", "1GiB"])
    data = json.loads(capsys.readouterr().out)
    assert rc == 0 and data["valid"] is True
    plan = data["memory"]["plans"][0]
    assert plan["node"] == "7" and abs(plan["peak_bytes"] - sum(plan["parts"].values())) <= len(plan["parts"])
    assert plan["fit"] == {"target_bytes": 2**30, "fits": True, "changes": [], "peak_bytes": plan["peak_bytes"]}


def test_validate_without_plan_stays_torch_free():
    code = ("import sys; from app.cli import main; main(['validate', 'presets/tiny_demo.json']); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr


def test_a_tight_target_combines_quantization_and_a_few_swapped_blocks(capsys):
    main(["validate", str(ROOT / "presets" / "flux_lora.json"), "--fit", "8GB"])
    line = next(l for l in capsys.readouterr().out.splitlines() if "to fit 8.00 GB" in l)
    changes = line.split(": ", 1)[1].split(" -> ")[0].split(" + ")
    assert "nf4 transformer" in changes, line
    swapped = [int(c.rsplit(" ", 1)[1]) for c in changes if c.startswith("block swap")]
    assert swapped and swapped[0] < 57 / 2, line  # not most of Flux's 57 blocks
