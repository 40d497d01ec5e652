"""kohya settings that have a NodeTrainer param: Flux's split files, the caching switches as sd-scripts reads
them (cache_latents_to_disk implies cache_latents), prior_loss_weight on the regularisation concept."""

import tomllib
from pathlib import Path

from app.importers import import_config

FIX = Path(__file__).resolve().parent / "fixtures" / "import"


def _nodes(result, type_):
    return [n["params"] for n in result.recipe["nodes"].values() if n["type"] == type_]


def _kohya(tmp_path, fixture="kohya_sd15_lora.toml", drop=(), dataset=None, **changes):
    """A fixture with keys dropped or changed, written as TOML beside the prompt file it names."""
    cfg = {k: v for k, v in tomllib.loads((FIX / fixture).read_text()).items() if k not in drop}
    cfg.update(changes)
    lines = []
    for k, v in cfg.items():
        text = repr(v).lower() if isinstance(v, bool) else repr(v).replace("'", '"') if not isinstance(v, str) \
            else '"""' + v + '"""' if "\n" in v else '"' + v.replace("\\", "\\\\") + '"'
        lines.append(f"{k} = {text}")
    path = tmp_path / fixture
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "prompts.txt").write_text((FIX / "prompts.txt").read_text())
    return import_config("kohya", path, dataset=dataset)


def test_flux_split_files_go_to_loadmodel(tmp_path):
    r = import_config("kohya", FIX / "kohya_flux_lora.toml")
    load, = _nodes(r, "LoadModel")
    assert {k: load.get(k) for k in ("ae", "clip_l", "t5xxl")} == {
        "ae": "/models/ae.safetensors", "clip_l": "/models/clip_l.safetensors", "t5xxl": "/models/t5xxl_fp16.safetensors"}
    assert not load.get("vae")
    assert not [n for n in r.not_imported if n.split(" ")[0] in ("ae", "clip_l", "t5xxl")], r.not_imported
    assert {"ae -> LoadModel.ae", "clip_l -> LoadModel.clip_l", "t5xxl -> LoadModel.t5xxl"} <= set(r.mapped)


def test_cache_latents_to_disk_alone_caches_and_maps_text_caching(tmp_path):
    r = import_config("kohya", FIX / "kohya_flux_lora.toml")  # cache_latents_to_disk, no cache_latents
    cache, = _nodes(r, "Cache")
    assert cache.get("cache_text", True) is True
    assert not [n for n in r.not_imported if n.startswith("cache_")], r.not_imported
    assert "cache_text_encoder_outputs -> Cache.cache_text" in r.mapped
    r = _kohya(tmp_path, drop=("cache_latents",), cache_text_encoder_outputs=False)
    cache, = _nodes(r, "Cache")
    assert cache["cache_text"] is False
    r = _kohya(tmp_path, drop=("cache_latents",), cache_text_encoder_outputs_to_disk=True)
    cache, = _nodes(r, "Cache")
    assert cache.get("cache_text", True) is True
    assert any(m.startswith("cache_text_encoder_outputs_to_disk -> Cache.cache_text") for m in r.mapped), r.mapped


def test_text_caching_without_latent_caching_says_how(tmp_path):
    r = _kohya(tmp_path, drop=("cache_latents", "cache_latents_to_disk"), cache_text_encoder_outputs=True)
    assert not _nodes(r, "Cache")
    line, = [n for n in r.not_imported if n.startswith("cache_text_encoder_outputs")]
    assert "no NodeTrainer equivalent" not in line and "set cache_latents" in line


def test_prior_loss_weight_goes_to_the_regularisation_concept_with_or_without_a_dataset_config(tmp_path):
    def weights(r):
        return [(c.get("concept_type", "standard"), c.get("loss_weight", 1.0)) for c in _nodes(r, "Concept")]

    r = _kohya(tmp_path, prior_loss_weight=0.5)  # reg_data_dir
    assert weights(r) == [("standard", 1.0), ("prior", 0.5)]
    assert "prior_loss_weight -> Regularisation.loss_weight" in r.mapped
    r = _kohya(tmp_path, prior_loss_weight=0.5, dataset=FIX / "kohya_sdxl_dataset.toml")  # an is_reg subset
    assert ("prior", 0.5) in weights(r) and all(w == 1.0 for t, w in weights(r) if t != "prior")
    assert not [n for n in r.not_imported if n.startswith("prior_loss_weight")], r.not_imported
    plain = tmp_path / "plain_dataset.toml"
    plain.write_text('[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "/data/train"\n')
    for dataset in (None, plain):  # no regularisation images: the same advice either way
        r = _kohya(tmp_path, drop=("reg_data_dir",), prior_loss_weight=0.5, dataset=dataset)
        line, = [n for n in r.not_imported if n.startswith("prior_loss_weight")]
        assert "set Concept.loss_weight of the regularisation concept" in line, line


def test_a_multi_line_value_is_reported_on_one_line(tmp_path, capsys):
    import json

    from app.cli import main

    note = "first line\nsecond line\n" + "x" * 200
    _kohya(tmp_path, my_notes=note)
    config = tmp_path / "kohya_sd15_lora.toml"
    ot = tmp_path / "ot.json"
    ot.write_text(json.dumps({**json.loads((FIX / "onetrainer_sd15_lora.json").read_text()), "my_notes": note}))
    for kind, path in (("kohya", config), ("onetrainer", ot)):
        capsys.readouterr()
        assert main(["import", kind, str(path), "-o", str(tmp_path / "r.json")]) == 0
        out = capsys.readouterr().out.splitlines()
        assert all(line.startswith("not imported: ") for line in out[:-1]) and out[-1].endswith("not imported)"), out
        line, = [line for line in out if line.startswith("not imported: my_notes = ")]
        assert line.startswith("not imported: my_notes = 'first line\\nsecond line\\nxxx")
        value = line[len("not imported: my_notes = "):line.index(" (no NodeTrainer")]
        assert value.endswith("...") and len(value) == 80
