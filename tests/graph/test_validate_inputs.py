"""validate reports input files that are missing, unreadable or the wrong kind, before anything loads.

Model files here are tiny .safetensors written with numpy: only their tensor names matter, because
validation reads nothing but the header.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from app.graph.inputs_check import MODEL_SUFFIXES, check_input_files
from app.graph.model import Graph
from app.graph.recipe import load_recipe
from app.graph.registry import load_registry
from app.graph.validate import validate

ROOT = Path(__file__).resolve().parents[2]
TINY_DEMO = ROOT / "presets" / "tiny_demo.json"
SHAPES = ROOT / "presets" / "demo_data" / "shapes"

SD15_KEYS = ["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
             "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"]
SD2_KEYS = ["cond_stage_model.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"]
SDXL_KEYS = ["conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
             "conditioner.embedders.1.model.token_embedding.weight", "model.diffusion_model.input_blocks.0.0.weight"]
LORA_KEYS = ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
             "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]


@pytest.fixture(scope="module")
def reg():
    return load_registry(include_user=False)


def tensors_file(path: Path, keys) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.zeros(2, dtype=np.float16) for k in keys}, str(path))
    return path


def diffusers_folder(folder: Path, *, xl: bool) -> Path:
    (folder / "unet").mkdir(parents=True)
    unet = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 2048 if xl else 768}
    if xl:
        unet["addition_embed_type"] = "text_time"
    (folder / "unet" / "config.json").write_text(json.dumps(unet))
    pipeline = "StableDiffusionXLPipeline" if xl else "StableDiffusionPipeline"
    (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    return folder


def one_node(reg, type_: str, params: dict) -> Graph:
    g = Graph()
    g.add_node(type_, reg.get(type_).version, params, node_id="1")
    return g


def messages(reg, type_: str, params: dict, recipe_dir=ROOT) -> list[str]:
    return [str(p) for p in check_input_files(one_node(reg, type_, params), reg, recipe_dir=recipe_dir)]


def only(msgs: list[str]) -> str:
    assert len(msgs) == 1, msgs
    return msgs[0]


# --------------------------------------------------------------------------------------------- missing

def test_a_missing_model_file_is_reported_by_node_and_param(reg, tmp_path):
    missing = tmp_path / "models" / "sd15.safetensors"
    msg = only(messages(reg, "LoadModel", {"source": str(missing)}))
    assert msg.startswith("node 1 (LoadModel): 'source'") and str(missing) in msg and "no such file or folder" in msg


def test_relative_paths_are_read_from_the_recipe_folder(reg, tmp_path):
    params = {"folder": "data/10_cat"}
    msg = only(messages(reg, "Concept", params, recipe_dir=tmp_path))
    assert "'folder' = data/10_cat" in msg and str(tmp_path / "data" / "10_cat") in msg and "no such folder" in msg
    (tmp_path / "data" / "10_cat").mkdir(parents=True)
    assert messages(reg, "Concept", params, recipe_dir=tmp_path) == []
    # no recipe folder (an unsaved recipe in the editor, a graph checked on its own): left to the run
    assert messages(reg, "Concept", {"folder": str(tmp_path / "nowhere")}, recipe_dir=None) == []
    assert [str(p) for p in validate(one_node(reg, "Concept", {"folder": str(tmp_path / "nowhere")}), reg)] == []


@pytest.mark.parametrize("type_, param", [("LoRAInject", "init_from"), ("TrainLoop", "resume_from"),
                                          ("LoadModel", "vae"), ("LoadModel", "tokenizer")])
def test_every_input_path_is_checked(reg, tmp_path, type_, param):
    msg = only(messages(reg, type_, {param: str(tmp_path / "gone")}))
    assert f"'{param}'" in msg and "no such" in msg and type_ in msg


def test_builtin_sources_and_unset_optional_paths_are_fine(reg):
    assert messages(reg, "LoadModel", {"source": "builtin:tiny-sdxl", "vae": "", "tokenizer": ""}) == []


def test_the_unset_required_path_error_is_kept(reg):
    msgs = [str(p) for p in validate(one_node(reg, "Concept", {"folder": ""}), reg)]
    assert any("choose a folder for 'folder'" in m for m in msgs)


def test_inputs_a_node_creates_or_does_not_read_are_not_required(reg, tmp_path):
    assert messages(reg, "Cache", {"folder": str(tmp_path / "new-cache")}) == []
    concept = {"folder": str(SHAPES), "caption_file": str(tmp_path / "captions.txt")}
    assert messages(reg, "Concept", {**concept, "prompt_source": "per_image"}) == []
    assert "'caption_file'" in only(messages(reg, "Concept", {**concept, "prompt_source": "concept_file"}))


# --------------------------------------------------------------------------------------------- wrong kind

def test_a_folder_where_a_file_is_expected_and_vice_versa(reg, tmp_path):
    (tmp_path / "a-folder").mkdir()
    a_file = tensors_file(tmp_path / "lora.safetensors", LORA_KEYS)
    assert "is a folder, but a file is expected" in only(messages(reg, "LoRAInject", {"init_from": str(tmp_path / "a-folder")}))
    assert "is a file, but a folder is expected" in only(messages(reg, "Concept", {"folder": str(a_file)}))
    assert "is a file, but a folder is expected" in only(messages(reg, "TrainLoop", {"resume_from": str(a_file)}))
    assert "is a file, but a folder is expected" in only(messages(reg, "LoadModel", {"tokenizer": str(a_file)}))
    assert messages(reg, "LoRAInject", {"init_from": str(a_file)}) == []


def test_a_damaged_or_fake_safetensors_file_is_unreadable(reg, tmp_path):
    html = tmp_path / "model.safetensors"
    html.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    assert "not a safetensors file" in only(messages(reg, "LoadModel", {"source": str(html)}))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x05\x00")
    assert "not a safetensors file" in only(messages(reg, "LoRAInject", {"init_from": str(short)}))
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes((4).to_bytes(8, "little") + b"{{{{")
    assert "not valid JSON" in only(messages(reg, "LoadModel", {"source": str(bad_json)}))


def test_not_a_model_file_or_folder(reg, tmp_path):
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    assert "not a model file" in only(messages(reg, "LoadModel", {"source": str(txt)}))
    folder = tmp_path / "downloads"
    tensors_file(folder / "model.safetensors", SD15_KEYS)
    msg = only(messages(reg, "LoadModel", {"source": str(folder)}))
    assert "not a diffusers model folder" in msg and "choose one of those" in msg


def test_a_lora_given_as_the_base_model_and_a_model_given_as_a_lora(reg, tmp_path):
    lora = tensors_file(tmp_path / "style.safetensors", LORA_KEYS)
    assert "a LoRA in kohya layout, not a base model" in only(messages(reg, "LoadModel", {"source": str(lora)}))
    model = tensors_file(tmp_path / "sd15.safetensors", SD15_KEYS)
    assert "not a LoRA" in only(messages(reg, "LoRAInject", {"init_from": str(model)}))


def test_a_tokenizer_folder_must_hold_a_tokenizer(reg, tmp_path):
    from app.ml.models.tiny import TINY_TOKENIZER_DIR

    (tmp_path / "empty").mkdir()
    assert "holds no tokenizer" in only(messages(reg, "LoadModel", {"tokenizer": str(tmp_path / "empty")}))
    assert messages(reg, "LoadModel", {"tokenizer": str(TINY_TOKENIZER_DIR)}) == []
    (tmp_path / "both" / "tokenizer").mkdir(parents=True)
    for f in TINY_TOKENIZER_DIR.iterdir():
        (tmp_path / "both" / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert messages(reg, "LoadModel", {"tokenizer": str(tmp_path / "both")}) == []


# --------------------------------------------------------------------------------------------- family

@pytest.mark.parametrize("keys, family, expected", [
    (SDXL_KEYS, "sd15", "is Stable Diffusion XL (sdxl), but 'family' says sd15"),
    (SD15_KEYS, "sdxl", "is Stable Diffusion 1.5 (sd15), but 'family' says sdxl"),
    (SD2_KEYS, "sd15", "(sd2), but 'family' says sd15"),
    (SDXL_KEYS, "auto", None),
    (SDXL_KEYS, "sdxl", None),
    (SD15_KEYS, "sd15", None),
    (SD2_KEYS, "sd2-v", None),  # sd2 and sd2-v weights look the same; the recipe decides
])
def test_a_single_file_whose_family_contradicts_the_recipe(reg, tmp_path, keys, family, expected):
    path = tensors_file(tmp_path / "model.safetensors", keys)
    msgs = messages(reg, "LoadModel", {"source": str(path), "family": family})
    if expected is None:
        assert msgs == []
    else:
        assert expected in only(msgs) and "set family to auto" in msgs[0]


def test_a_diffusers_folder_whose_family_contradicts_the_recipe(reg, tmp_path):
    xl = diffusers_folder(tmp_path / "sdxl-base", xl=True)
    assert "(sdxl), but 'family' says sd15" in only(messages(reg, "LoadModel", {"source": str(xl), "family": "sd15"}))
    assert messages(reg, "LoadModel", {"source": str(xl), "family": "sdxl"}) == []
    sd15 = diffusers_folder(tmp_path / "sd15", xl=False)
    assert "(sd15), but 'family' says sdxl" in only(messages(reg, "LoadModel", {"source": str(sd15), "family": "sdxl"}))


def test_model_suffixes_match_the_loader():
    from app.ml.models.load import SINGLE_FILE_SUFFIXES

    assert MODEL_SUFFIXES == SINGLE_FILE_SUFFIXES


# --------------------------------------------------------------------------------------------- CLI

def recipe_with(tmp_path: Path, **params) -> Path:
    """The tiny demo with its dataset path made absolute and some params changed (node id -> params)."""
    data = json.loads(TINY_DEMO.read_text())
    data["nodes"]["3"]["params"]["folder"] = str(SHAPES)
    for nid, p in params.items():
        data["nodes"][nid.lstrip("n")]["params"].update(p)
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(data))
    return path


def test_validate_and_run_report_a_missing_model_before_loading_anything(tmp_path, capsys):
    from app.cli import main

    missing = tmp_path / "models" / "sd15.safetensors"
    recipe = recipe_with(tmp_path, n1={"source": str(missing)}, n3={"folder": str(tmp_path / "no-images")})
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert f"node 1 (LoadModel): 'source' = {missing}: no such file or folder" in out
    assert "node 3 (Concept): 'folder'" in out and "no such folder" in out
    assert main(["run", str(recipe), "--workspace", str(tmp_path / "ws")]) == 2
    err = capsys.readouterr().err
    assert "'source'" in err and "nothing was run" in err and not (tmp_path / "ws").exists()


def test_validate_reads_headers_without_importing_torch(tmp_path):
    model = tensors_file(tmp_path / "xl.safetensors", SDXL_KEYS)
    folder = diffusers_folder(tmp_path / "folder", xl=False)
    code = (
        "import sys\n"
        "from app.graph.registry import load_registry\n"
        "from app.graph.inputs_check import check_input_files\n"
        "from app.graph.model import Graph\n"
        "reg = load_registry(include_user=False)\n"
        "g = Graph()\n"
        f"g.add_node('LoadModel', reg.get('LoadModel').version, {{'source': {str(model)!r}, 'family': 'sd15'}}, node_id='1')\n"
        f"g.add_node('LoadModel', reg.get('LoadModel').version, {{'source': {str(folder)!r}, 'family': 'sdxl'}}, node_id='2')\n"
        "print(len(check_input_files(g, reg, recipe_dir='.')))\n"
        "print(','.join(m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["2", ""]


def test_the_shipped_demo_stays_valid(reg):
    graph, problems = load_recipe(TINY_DEMO, reg)
    assert problems + validate(graph, reg, recipe_dir=TINY_DEMO.parent) == []


def test_every_built_in_input_path_is_checked(reg):
    """A new built-in node param that reads a path joins READ_INPUTS (plugins' paths are not checked)."""
    from app.graph.inputs_check import READ_INPUTS

    read = {(spec.type, inp.name) for spec in reg for inp in spec.params
            if inp.type == "PATH" and not inp.path_kind.startswith("output")}
    assert read == READ_INPUTS


def test_the_editor_marks_missing_inputs_once_the_recipe_has_a_folder(reg, tmp_path):
    from app.gui.document import Document

    recipe = recipe_with(tmp_path, n3={"folder": "my-images"})
    doc = Document.open(reg, recipe)
    assert [(p.node_id, "'folder' = my-images" in p.message) for p in doc.problems()] == [("3", True)]
    (tmp_path / "my-images").mkdir()
    assert doc.problems() == []
    unsaved = Document(reg, doc.graph)  # not saved anywhere yet: relative paths mean nothing
    (tmp_path / "my-images").rmdir()
    assert unsaved.problems() == []


def test_a_relative_model_path_is_read_from_the_recipe_folder_by_the_cli(tmp_path, capsys):
    from app.cli import main

    recipe = recipe_with(tmp_path, n1={"source": "models/sd15.safetensors"})
    assert main(["validate", str(recipe)]) == 2
    assert str(tmp_path / "models" / "sd15.safetensors") in capsys.readouterr().out
    tensors_file(tmp_path / "models" / "sd15.safetensors", SD15_KEYS)
    assert main(["validate", str(recipe)]) == 0


def test_an_unreadable_input_is_reported(reg, tmp_path, monkeypatch):
    """Permissions are simulated: the tests may run as root, who can read everything."""
    import app.graph.inputs_check as inputs_check

    images = tmp_path / "images"
    images.mkdir()
    denied = {images}
    real_access = inputs_check.os.access
    monkeypatch.setattr(inputs_check.os, "access", lambda p, mode: Path(p) not in denied and real_access(p, mode))
    msg = only(messages(reg, "Concept", {"folder": str(images)}))
    assert "'folder'" in msg and "not readable (permission denied)" in msg


def test_load_lora_reports_a_missing_file_and_a_full_model(reg, tmp_path):
    missing = messages(reg, "LoadLoRA", {"path": "loras/nowhere.safetensors"}, tmp_path)
    assert len(missing) == 1 and "'path' = loras/nowhere.safetensors" in missing[0], missing
    model = tensors_file(tmp_path / "model.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    full = messages(reg, "LoadLoRA", {"path": str(model)}, tmp_path)
    assert len(full) == 1 and "full model checkpoint, not a LoRA" in full[0], full
    lora = tensors_file(tmp_path / "lora.safetensors", ["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"])
    assert messages(reg, "LoadLoRA", {"path": str(lora)}, tmp_path) == []
