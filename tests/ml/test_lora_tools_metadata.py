"""LoRA file metadata other tools read: kohya's precomputed hashes, modelspec architecture, SD 2.x v name,
user-set title/author/description/trigger phrase, the base model name."""

import hashlib
import json
from io import BytesIO

import safetensors.torch
import torch
from safetensors import safe_open

from app.ml.adapters import AdapterConfig, create_adapter_set
from app.ml.save import save_adapter


def kohya_hashes(tensors, metadata):
    """sd-scripts library/train_util.py precalculate_safetensors_hashes + addnet_hash_* (written out again here)."""
    b = BytesIO(safetensors.torch.save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")}))
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    new = hashlib.sha256(b.read()).hexdigest()
    b.seek(0x100000)
    legacy = hashlib.sha256(b.read(0x10000)).hexdigest()[0:8]
    return new, legacy


def modelspec_hash(tensors):
    """sd-scripts library/sai_model_spec.py precalculate_safetensors_hashes (per tensor, in order)."""
    h = hashlib.sha256()
    for t in tensors.values():
        blob = safetensors.torch.save({"tensor": t})
        h.update(blob[8 + int.from_bytes(blob[:8], "little"):])
    return "0x" + h.hexdigest()


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _lora(bundle, algorithm="lora", rank=64):
    aset = create_adapter_set(bundle, AdapterConfig(algorithm=algorithm, rank=rank, alpha=1.0,
                                                    targets={"unet": "full", "text_encoder": "attn-mlp"}))
    with torch.no_grad():
        for p in aset.parameters():
            p.normal_(0, 0.1)
    return aset


def test_saved_lora_carries_kohyas_hashes(sd, tmp_path):
    path = save_adapter(_lora(sd), tmp_path / "h.safetensors", dtype="fp32")
    assert path.stat().st_size > 0x110000  # the legacy hash reads past 1 MiB
    tensors, meta = _read(path)
    with safe_open(str(path), "pt") as f:
        order = list(f.keys())
    # The file's own tensor data: what A1111's additional-networks index hashes.
    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little"):]).hexdigest()
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(tensors, meta)
    assert meta["modelspec.hash_sha256"] == modelspec_hash({k: tensors[k] for k in order})


def test_architecture_and_version_names_follow_sd_scripts(sd, tmp_path):
    from app.ml.models.families import get_family

    for algo in ("locon", "loha", "lokr"):
        _, meta = _read(save_adapter(_lora(sd, algo, rank=2), tmp_path / f"{algo}.safetensors"))
        assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora", algo
    assert get_family("sd2-v").kohya_metadata["ss_base_model_version"] == "sd_v2_v"
    assert get_family("sd2").kohya_metadata["ss_base_model_version"] == "sd_v2"


def test_save_lora_node_sets_user_fields_and_base_model_name(sd, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
    from app.engine.executor import Executor
    from app.graph.recipe import load_recipe
    from app.graph.registry import load_registry

    trained = _lora(sd, rank=2)
    trained.base_precision = {"unet": "nf4", "text_encoder": "fp32", "vae": "fp32"}  # as trained on an nf4 base
    src = save_adapter(trained, tmp_path / "src.safetensors", dtype="fp32",
                       extra_metadata={"ss_tag_frequency": json.dumps({"c": {"cross": 2}})})
    reg = load_registry(include_user=False)
    g, problems = load_recipe(Path(__file__).resolve().parents[2] / "graphs" / "lora_convert.json", reg)
    assert not problems
    for key, value in (("path", "out.safetensors"), ("layout", "kohya"), ("title", "crosses v2"),
                       ("author", "me"), ("description", "tiny crosses"), ("trigger_phrase", "xcross")):
        g.set_param("save", key, value)
    g.set_param("lora", "path", str(src))
    events = []
    result = Executor(reg).run(g, emit=events.append, workspace=tmp_path / "ws")
    assert result.status == "done", [e.get("message") for e in events if e["event"] == "node_error"]
    _, meta = _read(tmp_path / "ws" / "out.safetensors")
    assert meta["modelspec.title"] == meta["ss_output_name"] == "crosses v2"
    assert (meta["modelspec.author"], meta["modelspec.description"], meta["modelspec.trigger_phrase"]) == \
        ("me", "tiny crosses", "xcross")
    assert meta["ss_sd_model_name"] == "builtin:tiny-sd"
    assert "cross" in meta["ss_tag_frequency"]  # carried from the source file
    from app.ml.save.metadata import read_base_precision

    assert read_base_precision(meta)["unet"] == "nf4"  # converted on a plain base: still trained against nf4
