"""Embedding and LoadEmbedding through the real executor: the base model never changes and re-runs do not
stack, bad placeholders and foreign files are named, captions reach the embedding (placeholder, prepend,
report), TrainLoop trains the embedding alone or with a LoRA (two learning rates, a stop), only the new
rows change, Save writes standalone and bundled files that load again, and loaded embeddings serve prompts."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from app.engine.executor import Executor
from app.graph.recipe import loads_recipe
from app.graph.registry import load_registry
from app.ml.models import load_model

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "presets" / "demo_data" / "shapes"


def recipe(nodes: dict, links: list) -> dict:
    return {"format_version": 1,
            "nodes": {nid: {"type": t, "version": 2 if t in ("Bucketer", "TrainLoop") else 1, "params": p}
                      for nid, (t, p) in nodes.items()},
            "links": [{"id": i + 1, "from_node": a, "from_output": b, "to_node": c, "to_input": d}
                      for i, (a, b, c, d) in enumerate(links)]}


def run(data: dict, workspace: Path, targets=None, executor=None):
    reg = load_registry(include_user=False)
    graph, problems = loads_recipe(json.dumps(data), registry=reg)
    assert not problems, problems
    events = []
    targets = targets or list(graph.nodes)  # every node's outputs, not only the sinks'
    result = (executor or Executor(reg)).run(graph, targets=targets, workspace=workspace, emit=events.append)
    result.error = result.error or "; ".join(map(str, result.problems)) or None
    return result, events


def messages(events, kind=None) -> list[str]:
    return [e.get("message", "") for e in events if e["event"] in ("log", "node_error")
            and (kind is None or e.get("level", "info") == kind or e["event"] == kind)]


def train_recipe(folder=DEMO, *, embedding=None, lora=False, train=None, optimizer=None, saves=(), model="builtin:tiny-sd",
                 load_embedding=None):
    """LoadModel -> [LoadEmbedding] -> [Embedding] -> [LoRAInject] -> TrainLoop -> Save(s)."""
    nodes = {
        "1": ("LoadModel", {"source": model}),
        "2": ("Concept", {"folder": str(folder), "name": "shapes"}),
        "3": ("Bucketer", {"resolution": "16", "quantization": 8, "batch_size": 4, "bucketing": "off",
                           "leftovers": "repeat"}),
        "4": ("Optimizer", {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, **(optimizer or {})}),
        "6": ("TrainLoop", {"max_steps": 2, "train_dtype": "fp32", "gradient_checkpointing": False, "seed": 3,
                            **(train or {})}),
    }
    links = [("2", "dataset", "3", "datasets"), ("3", "buckets", "6", "buckets"), ("4", "optimizer", "6", "optimizer")]
    last = "1"
    if load_embedding is not None:
        nodes["10"] = ("LoadEmbedding", load_embedding)
        links.append((last, "model", "10", "model"))
        last = "10"
    if embedding is not None:
        nodes["5"] = ("Embedding", {"token": "<ohwx>", **embedding})
        links.append((last, "model", "5", "model"))
        last = "5"
    if lora:
        nodes["8"] = ("LoRAInject", {"rank": 2, "alpha": 2.0, "unet_layers": "attn-only"})
        links.append((last, "model", "8", "model"))
        last = "8"
    links.append((last, "model", "6", "model"))
    for i, params in enumerate(saves):
        nid = str(20 + i)
        nodes[nid] = ("Save", {"dtype": "fp32", "if_exists": "overwrite", **params})
        links.append(("6", "model", nid, "model"))
    return recipe(nodes, links)


def embedding_only(params: dict, model="builtin:tiny-sd") -> dict:
    return recipe({"1": ("LoadModel", {"source": model}), "5": ("Embedding", {"token": "<ohwx>", **params})},
                  [("1", "model", "5", "model")])


def the_embedding(handle):
    return next(a for a in handle.adapters if getattr(a, "is_embedding_set", False))


def token_rows(bundle) -> list[torch.Tensor]:
    return [te.get_input_embeddings().weight.detach().clone() for te in bundle.text_encoders]


@pytest.fixture(scope="module")
def fresh_rows():
    return token_rows(load_model("builtin:tiny-sd"))


# ---- the node: never changes the base, re-runs do not stack, bad input named ---------------------------

def test_embedding_node_leaves_the_base_alone_and_reruns_do_not_stack(tmp_path, fresh_rows):
    from app.ml.adapters import attached

    reg = load_registry(include_user=False)
    ex = Executor(reg)
    first, _ = run(embedding_only({"num_vectors": 2, "init_text": "red"}), tmp_path, executor=ex)
    again, _ = run(embedding_only({"num_vectors": 5, "init_text": "red"}), tmp_path, executor=ex)
    a, b = first.outputs["5"]["model"], again.outputs["5"]["model"]
    assert a.base is b.base  # LoadModel was cached: one shared base
    assert len(a.adapters) == len(b.adapters) == 1  # the second run replaced the first, it did not stack
    assert the_embedding(a).num_vectors == 2 and the_embedding(b).num_vectors == 5
    bundle = b.base
    vocab = len(bundle.tokenizers[0])
    with attached(bundle, b.adapter_pairs()):
        ids = bundle.tokenize(["<ohwx> circle"])[0][0].tolist()
        assert sum(i >= vocab for i in ids) == 5  # five slots, not 2 + 5
    with attached(bundle, a.adapter_pairs()):
        assert sum(i >= vocab for i in bundle.tokenize(["<ohwx> circle"])[0][0].tolist()) == 2
    assert len(bundle.tokenizers[0]) == vocab and all(torch.equal(x, y) for x, y in zip(token_rows(bundle), fresh_rows))
    # the vectors start as the initial text's ("red"), padded with "*" as OneTrainer does
    table, tok = bundle.text_encoders[0].get_input_embeddings().weight.detach(), bundle.tokenizers[0]
    vectors = the_embedding(b).vectors["text_encoder"].detach()
    assert torch.equal(vectors[0], table[tok("red").input_ids[1]])
    assert torch.equal(vectors[4], table[tok("*").input_ids[1]])


def test_a_known_word_as_placeholder_is_warned_by_name(tmp_path):
    result, events = run(embedding_only({"token": "red"}), tmp_path)
    assert result.status == "done"
    warned = [m for m in messages(events, "warning") if "'red'" in m]
    assert warned and "already knows" in warned[0], messages(events)
    _, quiet = run(embedding_only({"token": "<ohwx>"}), tmp_path / "b")
    assert not [m for m in messages(quiet, "warning") if "already knows" in m]


@pytest.mark.parametrize("node", ["Embedding", "LoadEmbedding"])
def test_a_file_for_another_family_is_refused_naming_node_and_file(tmp_path, node):
    from app.ml.embeddings import create_embedding, save_embedding

    sdxl = load_model("builtin:tiny-sdxl")
    path = save_embedding(create_embedding(sdxl, "<xl>", 2, "red"), tmp_path / "xl_face.safetensors", dtype="fp32")
    params = {"init_from": str(path)} if node == "Embedding" else {"path": str(path)}
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}), "5": (node, params)},
                  [("1", "model", "5", "model")])
    result, _ = run(data, tmp_path / "ws")
    assert result.status == "error" and result.error_node == "5"
    assert result.error.startswith(f"node 5 ({node})") and "xl_face.safetensors" in result.error, result.error
    assert "Stable Diffusion XL" in result.error


# ---- captions ---------------------------------------------------------------------------------------------

def captioned(folder: Path, captions: list[str]) -> Path:
    from app.ml.data.demo import make_shapes_dataset

    paths = make_shapes_dataset(folder, n_per_class=2, size=16, colours=("red",), shapes=("circle", "square"),
                                aspects=((1, 1),))
    for p, c in zip(paths, captions):
        p.with_suffix(".txt").write_text(c)
    return folder


@pytest.mark.parametrize("prepend", [True, False])
def test_captions_lacking_the_token_are_counted_and_prepended_when_asked(tmp_path, prepend):
    from app.ml.train.data_source import BucketSource
    from nodes.embedding import caption_expander

    folder = captioned(tmp_path / "d", ["a <embedding> circle", "red <ohwx>", "red circle", "square"])
    data = train_recipe(folder, embedding={"num_vectors": 2, "prepend_missing": prepend})
    result, events = run(data, tmp_path / "ws")
    assert result.status == "done", result.error
    log = messages(events)
    said = [m for m in log if "captions lack <ohwx>" in m]
    assert said and said[0].startswith("2 of 4 captions lack"), log
    assert ("put in front" in said[0]) == prepend
    assert ("train without the embedding" in said[0]) == (not prepend)
    shown = [m for m in log if m.startswith("caption as encoded:")]
    assert shown and "<ohwx> <ohwx>" in "".join(shown)  # the token pieces: one per vector
    # what the text encoder reads
    handle = result.outputs["5"]["model"]
    expand = caption_expander(list(handle.adapters))
    assert expand("a <embedding> circle") == "a <ohwx> circle"
    assert expand("red <ohwx>") == "red <ohwx>"
    assert expand("red circle") == ("<ohwx> red circle" if prepend else "red circle")
    buckets = result.outputs["3"]["buckets"]
    source = BucketSource(buckets, 3, bundle=handle.base, captions=expand)
    try:
        seen = {c for i in range(source.iterations(0)) for c in source.batch(0, i).captions}
    finally:
        source.close()
    assert "a <ohwx> circle" in seen and "a <embedding> circle" not in seen
    assert ("<ohwx> square" in seen) == prepend


# ---- training: alone, with a LoRA, only the new rows -------------------------------------------------------

def test_embedding_alone_trains_only_its_own_vectors(tmp_path, fresh_rows):
    data = train_recipe(embedding={"num_vectors": 2, "init_text": "red"}, train={"max_steps": 3},
                        optimizer={"embedding_lr": 5e-2})
    result, events = run(data, tmp_path)
    assert result.status == "done", result.error
    before = the_embedding(result.outputs["5"]["model"])
    after = the_embedding(result.outputs["6"]["model"])
    assert before is not after  # the cached Embedding output keeps its untrained vectors
    moved = (after.vectors["text_encoder"] - before.vectors["text_encoder"]).abs().amax(dim=1)
    assert (moved > 1e-3).all()  # both vectors learned
    bundle = result.outputs["6"]["model"].base
    assert all(torch.equal(x, y) for x, y in zip(token_rows(bundle), fresh_rows))  # every other row bit-identical
    fresh = load_model("builtin:tiny-sd")
    for mine, theirs in ((bundle.unet, fresh.unet), (bundle.text_encoders[0], fresh.text_encoders[0])):
        sd = theirs.state_dict()
        assert all(torch.equal(v, sd[k]) for k, v in mine.state_dict().items())
    lrs = [e["values"]["lrs"] for e in events if e["event"] == "metric" and "lrs" in e["values"]]
    assert lrs and set(lrs[0]) == {"embedding"} and lrs[0]["embedding"] == pytest.approx(5e-2)
    assert any("training the embedding <ohwx>" in m for m in messages(events))


def test_pivotal_tuning_trains_both_with_two_rates_and_stops_the_embedding(tmp_path):
    def trained(stop, steps, ws):
        data = train_recipe(embedding={"num_vectors": 1}, lora=True, train={"max_steps": steps},
                            optimizer={"lr": 1e-3, "embedding_lr": 5e-3, "stop_embedding_after": stop,
                                       "stop_embedding_unit": "steps"})
        result, events = run(data, ws)
        assert result.status == "done", result.error
        handle = result.outputs["6"]["model"]
        lora = next(a for a in handle.adapters if not getattr(a, "is_embedding_set", False))
        return the_embedding(handle), {k: v.clone() for k, v in lora.state_dict().items()}, events

    emb2, lora2, events = trained(0, 2, tmp_path / "a")
    lrs = [e["values"]["lrs"] for e in events if e["event"] == "metric" and "lrs" in e["values"]][0]
    assert lrs["embedding"] == pytest.approx(5e-3) and lrs["unet"] == pytest.approx(1e-3)
    emb4, lora4, events4 = trained(2, 4, tmp_path / "b")
    assert torch.equal(emb2.vectors["text_encoder"], emb4.vectors["text_encoder"])  # frozen after step 2
    assert any(not torch.equal(lora2[k], lora4[k]) for k in lora2)  # the LoRA trained on
    assert any("embedding training stopped" in m for m in messages(events4))
    assert emb4.trainable  # a later TrainLoop would train it again


def test_loaded_embedding_is_frozen_and_a_frozen_lora_stays_frozen(tmp_path):
    from app.ml.embeddings import create_embedding, save_embedding

    bundle = load_model("builtin:tiny-sd")
    path = save_embedding(create_embedding(bundle, "<style>", 2, "blue"), tmp_path / "style.safetensors", dtype="fp32")
    data = train_recipe(embedding={"num_vectors": 1}, load_embedding={"path": str(path)},
                        optimizer={"embedding_lr": 5e-2})
    result, _ = run(data, tmp_path / "ws")
    assert result.status == "done", result.error
    handle = result.outputs["6"]["model"]
    tokens = {a.token: a for a in handle.adapters}
    assert set(tokens) == {"<style>", "<ohwx>"}  # two embeddings with different tokens coexist
    loaded = result.outputs["10"]["model"].adapters[0]
    assert torch.equal(tokens["<style>"].vectors["text_encoder"], loaded.vectors["text_encoder"])
    assert not tokens["<style>"].trainable and tokens["<ohwx>"].trainable
    # only frozen embeddings and nothing to train: said by name, not a full fine-tune by surprise
    data = train_recipe(load_embedding={"path": str(path)})
    result, _ = run(data, tmp_path / "ws2")
    assert result.status == "error" and "nothing to train" in result.error


# ---- saving and continuing ---------------------------------------------------------------------------------

def test_save_writes_standalone_and_bundled_files_that_load_again(tmp_path):
    from app.ml.embeddings import load_bundled_embeddings, load_embedding_file

    saves = [{"path": "lora.safetensors", "what": "adapter", "bundle_embeddings": True},
             {"path": "plain_lora.safetensors", "what": "adapter"},
             {"path": "ohwx.safetensors", "what": "embedding", "title": "my face"}]
    data = train_recipe(embedding={"num_vectors": 3, "init_text": "red"}, lora=True, saves=saves)
    result, events = run(data, tmp_path)
    assert result.status == "done", result.error
    trained = the_embedding(result.outputs["6"]["model"])
    bundle = result.outputs["6"]["model"].base
    with safe_open(str(tmp_path / "ohwx.safetensors"), "pt") as f:
        assert list(f.keys()) == ["emb_params"] and f.get_tensor("emb_params").shape == (3, 32)
        meta = f.metadata()
        assert json.loads(meta["nodetrainer_recipe"])["nodes"]["5"]["type"] == "Embedding"
        assert meta["modelspec.title"] == "my face" and meta["nodetrainer_step"] == "2"
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert "bundle_emb.<ohwx>.string_to_param.*" in keys and any(k.startswith("lora_unet_") for k in keys)
        assert "nodetrainer_recipe" in f.metadata()
    with safe_open(str(tmp_path / "plain_lora.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("bundle_emb.")]
    assert any("not in this LoRA file" in m for m in messages(events, "warning"))
    standalone = load_embedding_file(tmp_path / "ohwx.safetensors", bundle)
    bundled = load_bundled_embeddings(tmp_path / "lora.safetensors", bundle)
    assert standalone.token == "<ohwx>" and [e.token for e in bundled] == ["<ohwx>"]
    for e in (standalone, bundled[0]):
        assert torch.equal(e.vectors["text_encoder"], trained.vectors["text_encoder"])
    # LoadEmbedding reads the bundled one from the LoRA file, under its own token or a new one
    for token, want in (("", "<ohwx>"), ("face", "face")):
        data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}),
                       "2": ("LoadEmbedding", {"path": str(tmp_path / "lora.safetensors"), "token": token})},
                      [("1", "model", "2", "model")])
        loaded, _ = run(data, tmp_path / f"load{token}")
        assert loaded.status == "done", loaded.error
        emb = the_embedding(loaded.outputs["2"]["model"])
        assert emb.token == want and not emb.trainable
        assert torch.equal(emb.vectors["text_encoder"], trained.vectors["text_encoder"])


def test_continue_training_from_a_saved_embedding(tmp_path):
    data = train_recipe(embedding={"num_vectors": 2}, saves=[{"path": "e.safetensors", "what": "embedding"}],
                        optimizer={"embedding_lr": 5e-2})
    first, _ = run(data, tmp_path / "a")
    assert first.status == "done", first.error
    saved = the_embedding(first.outputs["6"]["model"]).vectors["text_encoder"]
    data = train_recipe(embedding={"num_vectors": 7, "init_from": str(tmp_path / "a" / "e.safetensors")},
                        optimizer={"embedding_lr": 5e-2})
    second, events = run(data, tmp_path / "b")
    assert second.status == "done", second.error
    start = the_embedding(second.outputs["5"]["model"])
    assert start.num_vectors == 2 and torch.equal(start.vectors["text_encoder"], saved)
    assert any("continuing <ohwx>" in m and "file's count" in m for m in messages(events))
    assert not torch.equal(the_embedding(second.outputs["6"]["model"]).vectors["text_encoder"], saved)


def test_sdxl_embedding_saves_both_encoders(tmp_path):
    data = train_recipe(embedding={"num_vectors": 2}, model="builtin:tiny-sdxl",
                        saves=[{"path": "xl.safetensors", "what": "embedding"}])
    data["nodes"]["3"]["params"]["resolution"] = "64"
    data["nodes"]["3"]["params"]["quantization"] = 64
    result, _ = run(data, tmp_path)
    assert result.status == "done", result.error
    with safe_open(str(tmp_path / "xl.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_g", "clip_l"]
    trained = the_embedding(result.outputs["6"]["model"])
    before = the_embedding(result.outputs["5"]["model"])
    for name in ("text_encoder", "text_encoder_2"):
        assert not torch.equal(trained.vectors[name], before.vectors[name])  # both encoders' vectors train


# ---- additional embeddings in prompts -----------------------------------------------------------------------

def test_loaded_embedding_serves_sample_prompts(tmp_path):
    from app.ml.embeddings import create_embedding, save_embedding

    bundle = load_model("builtin:tiny-sd")
    path = save_embedding(create_embedding(bundle, "<style>", 2, "red square"), tmp_path / "style.safetensors",
                          dtype="fp32")
    sample = {"prompt": "a <style> circle", "width": 64, "height": 64, "steps": 2, "seed": 1, "sampler": "euler"}
    data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}), "2": ("LoadEmbedding", {"path": str(path)}),
                   "3": ("Sample", sample), "4": ("Sample", sample),
                   "5": ("Sample", {**sample, "prompt": "a red square circle"})},
                  [("1", "model", "2", "model"), ("2", "model", "3", "model"), ("1", "model", "4", "model"),
                   ("1", "model", "5", "model")])
    result, _ = run(data, tmp_path / "ws")
    assert result.status == "done", result.error
    with_emb = result.outputs["3"]["images"]["paths"][0]
    without = result.outputs["4"]["images"]["paths"][0]
    words = result.outputs["5"]["images"]["paths"][0]
    from PIL import Image
    import numpy as np

    px = [np.asarray(Image.open(p), dtype=np.int16) for p in (with_emb, without, words)]
    assert np.abs(px[0] - px[1]).max() > 0  # the placeholder means something only with the embedding
    assert np.abs(px[0] - px[2]).max() <= 1  # ... the words its vectors came from


def test_validation_names_a_missing_or_wrong_embedding_file(tmp_path):
    from safetensors.torch import save_file

    from app.graph.validate import validate

    checkpoint = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.conv_in.weight": torch.zeros(1)}, str(checkpoint))
    reg = load_registry(include_user=False)
    for node, param in (("Embedding", "init_from"), ("LoadEmbedding", "path")):
        for path, why in ((tmp_path / "gone.safetensors", "no such file"), (checkpoint, "not an embedding")):
            data = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}), "2": (node, {param: str(path)})},
                          [("1", "model", "2", "model")])
            graph, problems = loads_recipe(json.dumps(data), registry=reg)
            found = [str(p) for p in problems + validate(graph, reg, recipe_dir=tmp_path)]
            assert len(found) == 1 and found[0].startswith(f"node 2 ({node}): '{param}'") and why in found[0], found


def test_cached_text_is_not_used_with_embeddings_on_the_model(tmp_path):
    """The Cache node encodes captions with the base model alone: with an embedding on the wire (trained or
    loaded) TrainLoop encodes them itself, with the embedding patched in."""
    from app.ml.embeddings import create_embedding, save_embedding

    bundle = load_model("builtin:tiny-sd")
    path = save_embedding(create_embedding(bundle, "<style>", 1, "blue"), tmp_path / "style.safetensors", dtype="fp32")
    data = train_recipe(load_embedding={"path": str(path)}, lora=True)
    data["nodes"]["9"] = {"type": "Cache", "version": 1, "params": {"cache_text": True}}
    data["links"] = [l for l in data["links"] if l["to_input"] != "buckets"]
    data["links"] += [{"from_node": "3", "from_output": "buckets", "to_node": "9", "to_input": "buckets"},
                      {"from_node": "1", "from_output": "model", "to_node": "9", "to_input": "model"},
                      {"from_node": "9", "from_output": "buckets", "to_node": "6", "to_input": "buckets"}]
    for i, link in enumerate(data["links"]):
        link["id"] = i + 1
    result, events = run(data, tmp_path / "ws")
    assert result.status == "done", result.error
    assert any("encoded on the fly" in m and "without the model's embeddings" in m for m in messages(events))


def test_flux_embedding_covers_clip_l_and_t5(tmp_path):
    data = train_recipe(embedding={"num_vectors": 2}, model="builtin:tiny-flux", lora=True,
                        saves=[{"path": "flux_emb.safetensors", "what": "embedding"},
                               {"path": "flux_lora.safetensors", "bundle_embeddings": True}])
    data["nodes"]["3"]["params"].update(resolution="32", quantization=16)
    result, _ = run(data, tmp_path)
    assert result.status == "done", result.error
    before, after = the_embedding(result.outputs["5"]["model"]), the_embedding(result.outputs["6"]["model"])
    for name in ("text_encoder", "text_encoder_2"):  # CLIP-L (its pooled output) and T5 both read it
        assert not torch.equal(before.vectors[name], after.vectors[name]), name
    with safe_open(str(tmp_path / "flux_emb.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["clip_l", "t5"]
    with safe_open(str(tmp_path / "flux_lora.safetensors"), "pt") as f:
        assert {"bundle_emb.<ohwx>.clip_l", "bundle_emb.<ohwx>.t5"} <= set(f.keys())


def test_save_refuses_or_warns_where_an_embedding_cannot_go(tmp_path):
    no_lora = train_recipe(embedding={"num_vectors": 1}, saves=[{"path": "x.safetensors", "what": "adapter"}])
    result, _ = run(no_lora, tmp_path / "a")
    assert result.status == "error" and "choose what = embedding" in result.error
    full = train_recipe(embedding={"num_vectors": 1}, lora=True,
                        saves=[{"path": "m.safetensors", "what": "full_model", "layout": "single_file"}])
    result, events = run(full, tmp_path / "b")
    assert result.status == "done", result.error
    assert any("not part of a full model file" in m for m in messages(events, "warning"))
    nothing = recipe({"1": ("LoadModel", {"source": "builtin:tiny-sd"}),
                      "2": ("Save", {"path": "e.safetensors", "what": "embedding"})}, [("1", "model", "2", "model")])
    result, _ = run(nothing, tmp_path / "c")
    assert result.status == "error" and "no embedding to save" in result.error


def test_loaded_embedding_serves_trainloop_sample_prompts(tmp_path):
    """OneTrainer's additional embeddings: TrainLoop's sample prompts read a LoadEmbedding's token. Before
    training (the LoRA starts at zero) "a <style> circle" is exactly the words its vectors came from."""
    from app.ml.embeddings import create_embedding, save_embedding

    bundle = load_model("builtin:tiny-sd")
    path = save_embedding(create_embedding(bundle, "<style>", 2, "red square"), tmp_path / "style.safetensors",
                          dtype="fp32")
    settings = {"steps": 2, "cfg": 7.0, "seed": 1, "sampler": "euler"}
    data = train_recipe(load_embedding={"path": str(path)}, lora=True,
                        train={"max_steps": 1, "sample_prompts": "a <style> circle",
                               **{f"sample_{k}": v for k, v in settings.items()}})
    data["nodes"]["3"]["params"]["resolution"] = "64"
    data["nodes"]["30"] = {"type": "Sample", "version": 1,
                           "params": {"prompt": "a red square circle", "width": 64, "height": 64, **settings}}
    data["links"].append({"id": len(data["links"]) + 1, "from_node": "1", "from_output": "model", "to_node": "30",
                          "to_input": "model"})
    result, _ = run(data, tmp_path / "ws")
    assert result.status == "done", result.error
    from PIL import Image
    import numpy as np

    before = sorted((tmp_path / "ws" / "TrainLoop_6" / "samples").glob("step_0000000*.png"))
    words = result.outputs["30"]["images"]["paths"]
    assert len(before) == 1 and len(words) == 1
    a, b = (np.asarray(Image.open(p), dtype=np.int16) for p in (before[0], words[0]))
    assert np.abs(a - b).max() <= 1


def test_periodic_saves_keep_the_embedding_beside_and_inside_the_lora(tmp_path):
    data = train_recipe(embedding={"num_vectors": 1}, lora=True,
                        train={"max_steps": 3, "save_every": 2, "save_unit": "steps"})
    result, _ = run(data, tmp_path)
    assert result.status == "done", result.error
    saves = tmp_path / "TrainLoop_6" / "saves"
    assert sorted(p.name for p in saves.iterdir()) == ["step_0000002", "step_0000002.safetensors"]
    with safe_open(str(saves / "step_0000002.safetensors"), "pt") as f:
        bundled = f.get_tensor("bundle_emb.<ohwx>.string_to_param.*")
    with safe_open(str(saves / "step_0000002" / "ohwx.safetensors"), "pt") as f:  # A1111 calls it by its file name
        standalone = f.get_tensor("emb_params")
    assert standalone.dtype == torch.float32  # exact vectors to continue from; the LoRA file is fp16 as usual
    torch.testing.assert_close(standalone, bundled.float(), rtol=1e-3, atol=1e-4)
