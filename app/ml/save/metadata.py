"""Safetensors metadata for LoRA and checkpoint files (all values strings, as the format requires).

Three audiences: A1111/Forge and Civitai read kohya's ``ss_*`` keys (network dim/alpha, base model
version, v2, v-parameterization); model browsers read ``modelspec.*`` (Stability's model-spec);
NodeTrainer itself reads ``nodetrainer_recipe`` to turn a dropped LoRA back into the graph that made it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping

_ARCH = {"sd15": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sd2-v": "stable-diffusion-v2-768-v",
         "sdxl": "stable-diffusion-xl-v1-base"}
IMPL_SAI = "https://github.com/Stability-AI/generative-models"


def _recipe_text(recipe: Any) -> str:
    if recipe is None:
        return ""
    return recipe if isinstance(recipe, str) else json.dumps(recipe, sort_keys=True, separators=(",", ":"))


def modelspec(family, *, kind: str, title: str, resolution: "int | tuple[int, int] | None" = None) -> dict[str, str]:
    """``resolution``: what was trained (see ``training_metadata``); the family's default only when unknown."""
    base = getattr(family, "modelspec_architecture", "") or _ARCH.get(family.id, family.id)
    arch = base + (f"/{kind}" if kind else "")
    width, height = _size(resolution or family.default_resolution)
    impl = getattr(family, "modelspec_implementation", "") or (IMPL_SAI if family.id == "sdxl" else "diffusers")
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": impl,
        "modelspec.title": title,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "modelspec.resolution": f"{width}x{height}",
    }
    if family.prediction_type in ("epsilon", "v_prediction"):  # flow models: kohya writes none
        meta["modelspec.prediction_type"] = "v" if family.prediction_type == "v_prediction" else "epsilon"
    return meta


def _size(resolution: "int | tuple[int, int]") -> tuple[int, int]:
    if isinstance(resolution, (tuple, list)):
        return int(resolution[0]), int(resolution[1])
    return int(resolution), int(resolution)


def training_metadata(info: Mapping[str, Any] | None) -> dict[str, str]:
    """Keys that describe the training itself, from what TrainLoop records on the model it returns
    (``resolution``: the width and height trained at). A 64-px run must not read as 512x512 in a model
    browser, nor in A1111's ``ss_resolution``. Empty when nothing is known (an untrained model)."""
    info = info or {}
    out: dict[str, str] = {}
    resolution = info.get("resolution")
    if resolution:
        width, height = _size(resolution)
        out.update({"modelspec.resolution": f"{width}x{height}", "ss_resolution": f"({width}, {height})"})
    for key, value in (info.get("kohya") or {}).items():  # recorded by ``run_facts``: kohya's keys and formats
        out[key] = value if isinstance(value, str) else json.dumps(value)
    return out


def _tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def _number(x: float) -> "int | float":
    return int(x) if float(x).is_integer() else float(x)


def run_facts(buckets, plan, optimizer: Mapping[str, Any], params: Mapping[str, Any], *, started_at: float,
              steps_per_epoch: int) -> dict[str, str]:
    """The ``ss_*`` keys kohya's train_network.py writes about a run, as A1111's metadata viewer shows them:
    the data (per folder: repeats, image count and tag frequency, kohya counting each comma-separated tag of
    every caption line once per image, not per repeat), the buckets of the first epoch's ``plan`` (image
    count with repeats, mean aspect-ratio error without), the optimizer settings and the loop's own. NodeTrainer
    skips no CLIP layer, so ``ss_clip_skip`` is ``None`` as kohya writes for the last layer."""
    concepts = buckets.dataset.training_concepts
    dirs, tags = {}, {}
    for c in concepts:
        name = Path(str(c.settings.folder)).name or c.settings.name
        repeats = c.samples[0].repeats if c.samples else c.settings.repeats
        dirs[name] = {"n_repeats": _number(repeats), "img_count": len(c.samples)}
        freq: dict[str, int] = tags.setdefault(name, {})
        for s in c.samples:
            for line in s.caption_lines:
                for tag in _tags(line):
                    freq[tag] = freq.get(tag, 0) + 1
    counts: dict[tuple[int, int], int] = {}
    errors = {}  # kohya's mean aspect-ratio error is over images, without repeats
    for it in plan.items:
        counts[it.bucket] = counts.get(it.bucket, 0) + 1
        w, h = buckets.dataset.sample(it.concept_index, it.sample_index).size
        errors[(it.concept_index, it.sample_index)] = abs(it.bucket[0] / it.bucket[1] - w / h)
    errors = list(errors.values())
    bucket_info = {"buckets": {i: {"resolution": list(r), "count": counts[r]} for i, r in enumerate(sorted(counts))},
                   "mean_img_ar_error": sum(errors) / len(errors) if errors else 0.0}
    epochs = int(params["epochs"])
    max_steps = int(params["max_steps"]) or epochs * max(1, steps_per_epoch)
    if int(params["max_steps"]) and steps_per_epoch:
        epochs = -(-max_steps // steps_per_epoch)  # kohya recomputes the epochs from max_train_steps
    return {
        "ss_training_started_at": str(started_at),
        "ss_clip_skip": "None",
        "ss_num_train_images": str(round(sum(s.repeats for c in concepts for s in c.samples))),
        "ss_dataset_dirs": json.dumps(dirs),
        "ss_tag_frequency": json.dumps(tags),
        "ss_bucket_info": json.dumps(bucket_info),
        "ss_learning_rate": str(optimizer.get("lr")),
        "ss_unet_lr": str(optimizer.get("lr")),
        "ss_text_encoder_lr": str(optimizer.get("text_encoder_lr")),
        "ss_optimizer": str(optimizer.get("optimizer")),
        "ss_seed": str(params["seed"]),
        "ss_max_train_steps": str(max_steps),
        "ss_num_epochs": str(epochs),
        "ss_batch_size_per_device": str(buckets.batch_size),
    }


def _network_module_and_args(aset) -> tuple[str, dict[str, str]]:
    cfg = aset.config
    if cfg.algorithm in ("lora", "locon"):
        args = {}
        if cfg.algorithm == "locon":
            args = {"conv_dim": str(cfg.effective_conv_rank), "conv_alpha": str(cfg.effective_conv_alpha)}
        return getattr(aset.family, "kohya_network_module", "networks.lora") if aset.family else "networks.lora", args
    args = {"algo": "lora" if cfg.algorithm == "dora" else cfg.algorithm,
            "conv_dim": str(cfg.effective_conv_rank), "conv_alpha": str(cfg.effective_conv_alpha)}
    if cfg.algorithm == "dora":
        args["dora_wd"] = "True"
        args["wd_on_out"] = "False"  # the magnitude is per input channel (see app/ml/adapters/modules.py)
    if cfg.algorithm == "lokr":
        args["factor"] = str(cfg.factor)
    return "lycoris.kohya", args


def lora_metadata(
    aset,
    *,
    layout: str,
    title: str,
    recipe: Any = None,
    base_model_hash: str = "",
    base_model_name: str = "",
    step: int | None = None,
    epoch: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    fam, cfg = aset.family, aset.config
    module, args = _network_module_and_args(aset)
    meta: dict[str, str] = {
        "ss_network_module": module,
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.alpha),
        "ss_network_args": json.dumps(args),
        "ss_output_name": title,
        "ss_sd_model_name": base_model_name,
        "ss_training_comment": "trained with NodeTrainer",
    }
    meta.update(fam.kohya_metadata)  # ss_base_model_version, ss_v2, ss_v_parameterization
    if step is not None:
        meta["ss_steps"] = str(int(step))
    if epoch is not None:
        meta["ss_epoch"] = str(int(epoch))
    meta.update(modelspec(fam, kind="lora", title=title))  # sd-scripts writes ".../lora" for LyCORIS networks too
    meta.update({
        "nodetrainer_recipe": _recipe_text(recipe),
        "nodetrainer_base_family": fam.id,
        "nodetrainer_base_model_hash": base_model_hash or getattr(aset, "base_identity", ""),
        "nodetrainer_layout": layout,
        "nodetrainer_adapter_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "nodetrainer_step": "" if step is None else str(int(step)),
        "nodetrainer_epoch": "" if epoch is None else str(int(epoch)),
    })
    meta.update(base_precision_metadata(getattr(aset, "base_precision", None), fam))
    for k, v in (extra or {}).items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    return meta


BASE_PRECISION_KEY = "nodetrainer_base_precision"


def base_precision_metadata(precisions: Mapping[str, str] | None, family) -> dict[str, str]:
    """The weight storage of the base a LoRA was trained on: ``nodetrainer_base_precision`` as JSON
    (``{"transformer": "nf4", "text_encoder": "bf16", ...}``, the VAE left out: adapters never touch it)
    and kohya's ``ss_fp8_base`` (the denoiser in fp8) / ``ss_fp8_base_unet`` (only the denoiser in fp8).
    Nothing when the base is unknown (a LoRA read from a file and saved again)."""
    if not precisions:
        return {}
    shown = {k: v for k, v in precisions.items() if k != "vae"}
    den = precisions.get(family.denoiser) if family is not None else None
    te_fp8 = any(v == "fp8" for k, v in shown.items() if k.startswith("text_encoder"))
    return {BASE_PRECISION_KEY: json.dumps(shown, sort_keys=True),
            "ss_fp8_base": str(den == "fp8"), "ss_fp8_base_unet": str(den == "fp8" and not te_fp8)}


def precision_mismatch(file_name: str, metadata: Mapping[str, str], components, precisions: Mapping[str, str]) -> str | None:
    """A warning when a LoRA trained on a base of one precision (a QLoRA on nf4, say) meets a base of another,
    naming the file and the components that differ; None when they match or the file does not say."""
    trained = read_base_precision(metadata)
    differ = [c for c in components if c in trained and c in precisions and trained[c] != precisions[c]]
    if not differ:
        return None
    return (f"{file_name} was trained on a base with " + ", ".join(f"{c} {trained[c]}" for c in differ)
            + "; this model has " + ", ".join(f"{c} {precisions[c]}" for c in differ) + ". It applies, but it learned "
            "against its base's rounding: results can differ slightly from its samples")


def read_base_precision(metadata: Mapping[str, str]) -> dict[str, str]:
    """``nodetrainer_base_precision`` of a LoRA file's metadata; {} when absent or unreadable."""
    try:
        value = json.loads(metadata.get(BASE_PRECISION_KEY) or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def checkpoint_metadata(bundle, *, title: str, recipe: Any = None, step: int | None = None, epoch: int | None = None) -> dict[str, str]:
    meta = modelspec(bundle.family, kind="", title=title)
    meta.update({
        "nodetrainer_recipe": _recipe_text(recipe),
        "nodetrainer_base_family": bundle.family.id,
        "nodetrainer_base_model_hash": bundle.identity,
        "nodetrainer_step": "" if step is None else str(int(step)),
        "nodetrainer_epoch": "" if epoch is None else str(int(epoch)),
    })
    return meta


def file_hashes(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> dict[str, str]:
    """The hashes kohya's sd-scripts precompute so A1111 and model browsers need not read the file:
    ``sshs_model_hash`` (sha256 of the tensor data as saved with only the ``ss_*`` keys, what A1111's
    additional-networks index calls the new hash), ``sshs_legacy_hash`` (sha256 of the 64 KiB at
    1 MiB, 8 hex digits) and ``modelspec.hash_sha256`` (0x + sha256 of each tensor's bytes in turn, by name)."""
    import hashlib

    from safetensors.torch import save

    def data(blob: bytes) -> bytes:
        return blob[8 + int.from_bytes(blob[:8], "little"):]

    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    spec = hashlib.sha256()
    for k in sorted(tensors):  # name order, so the hash can be checked from the file alone
        spec.update(data(save({"tensor": tensors[k]})))
    return {
        "sshs_model_hash": hashlib.sha256(data(blob)).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8],
        "modelspec.hash_sha256": "0x" + spec.hexdigest(),
    }
