"""Pivotal tuning (an embedding and a LoRA in one run) resumes exactly after kill -9: the embedding, the
LoRA and the optimizer state equal an uninterrupted run's, also when the embedding stopped training
before the backup; the bundled LoRA file and the standalone embedding are byte-for-byte the same tensors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "presets" / "demo_data" / "shapes"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def pivotal_recipe() -> dict:
    nodes = {
        "1": ("LoadModel", 1, {"source": "builtin:tiny-sd"}),
        "2": ("Concept", 1, {"folder": str(DEMO), "name": "shapes"}),
        "3": ("Bucketer", 2, {"resolution": "32", "quantization": 8, "batch_size": 2, "leftovers": "repeat",
                              "bucketing": "off"}),
        "4": ("Optimizer", 1, {"optimizer": "adamw", "lr": 2e-3, "embedding_lr": 5e-3, "weight_decay": 0.01,
                               "stop_embedding_after": 3, "stop_embedding_unit": "steps"}),
        "5": ("Embedding", 1, {"token": "<ohwx>", "num_vectors": 2, "init_text": "shape"}),
        "8": ("LoRAInject", 1, {"rank": 4, "alpha": 4.0, "unet_layers": "attn-mlp"}),
        "6": ("TrainLoop", 2, {"max_steps": 8, "backup_every": 2, "backup_unit": "steps", "backups_kept": 10,
                               "train_dtype": "fp32", "gradient_checkpointing": False, "seed": 3}),
        "7": ("Save", 1, {"path": "lora.safetensors", "layout": "kohya", "dtype": "fp32", "if_exists": "overwrite",
                          "bundle_embeddings": True}),
        "9": ("Save", 1, {"path": "ohwx.safetensors", "what": "embedding", "dtype": "fp32", "if_exists": "overwrite"}),
    }
    links = [("1", "model", "5", "model"), ("5", "model", "8", "model"), ("8", "model", "6", "model"),
             ("2", "dataset", "3", "datasets"), ("3", "buckets", "6", "buckets"), ("4", "optimizer", "6", "optimizer"),
             ("6", "model", "7", "model"), ("6", "model", "9", "model")]
    return {"format_version": 1,
            "nodes": {nid: {"type": t, "version": v, "params": p} for nid, (t, v, p) in nodes.items()},
            "links": [{"id": i + 1, "from_node": a, "from_output": b, "to_node": c, "to_input": d}
                      for i, (a, b, c, d) in enumerate(links)]}


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=600)


def losses(events: Path) -> dict[int, float]:
    out = {}
    for line in events.read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "metric" and "loss" in e["values"]:
            out[e["values"]["step"]] = e["values"]["loss"]
    return out


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def optimizer_state(backup: Path) -> dict:
    state = torch.load(backup / "state.pt", weights_only=True)["optimizer"]
    return {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if torch.is_tensor(v)}


def test_pivotal_resume_after_kill9_equals_an_uninterrupted_run(tmp_path):
    path = tmp_path / "pivotal.json"
    path.write_text(json.dumps(pivotal_recipe()))
    full = cli("run", path, "--workspace", tmp_path / "full", "--events", tmp_path / "full.jsonl")
    assert full.returncode == 0, full.stderr[-3000:]
    assert "embedding training stopped" in full.stderr
    ws = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), "run", str(path), "--workspace", str(ws)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    backups = ws / "TrainLoop_6" / "backups"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (backups / "step_0000004").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (backups / "step_0000004").exists()
    resumed = cli("run", path, "--workspace", ws, "--events", tmp_path / "resumed.jsonl",
                  "--set", f"TrainLoop.resume_from={backups / 'step_0000004'}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = losses(tmp_path / "full.jsonl"), losses(tmp_path / "resumed.jsonl")
    assert sorted(b) == [5, 6, 7, 8] and all(a[s] == b[s] for s in b), (a, b)
    # the backups hold both: the LoRA's tensors and the embedding's, and the optimizer state of both groups
    fb, rb = tmp_path / "full" / "TrainLoop_6" / "backups" / "step_0000006", backups / "step_0000006"
    weights = load_file(str(fb / "trainable.safetensors"))
    assert any(k.startswith("embeddings.0.") for k in weights) and any(not k.startswith("embeddings.") for k in weights)
    assert same_tensors(weights, load_file(str(rb / "trainable.safetensors")))
    assert same_tensors(optimizer_state(fb), optimizer_state(rb))
    # the saved files: the LoRA with the embedding bundled, and the embedding on its own
    for name in ("lora.safetensors", "ohwx.safetensors"):
        assert same_tensors(load_file(str(tmp_path / "full" / name)), load_file(str(ws / name))), name
    lora = load_file(str(ws / "lora.safetensors"))
    emb = load_file(str(ws / "ohwx.safetensors"))
    assert torch.equal(lora["bundle_emb.<ohwx>.string_to_param.*"], emb["emb_params"])
    # the embedding stopped after step 3: its vectors in the step-4 and step-6 backups are the same
    four = load_file(str(backups / "step_0000004" / "trainable.safetensors"))
    emb_keys = [k for k in four if k.startswith("embeddings.0.")]
    assert emb_keys and all(torch.equal(four[k], weights[k]) for k in emb_keys)
