"""OneTrainer configs (the JSON its UI saves, and its training presets) -> a NodeTrainer recipe.

Nested settings are read by dotted key (``unet.learning_rate``, ``optimizer.beta1``); concepts and
samples come inline (``concepts``, ``samples``) or from the files the config names
(``concept_file_name``, ``sample_definition_file_name``), read relative to the config's folder.

Embeddings follow OneTrainer's rules: the config's ``embedding`` trains only with training_method
EMBEDDING (an Embedding node, no adapter); ``additional_embeddings`` that train become Embedding nodes
(beside a LoRA: pivotal tuning) and those that do not, LoadEmbedding nodes of their files.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.importers import ImportError_, ImportResult
from app.importers.common import FUSED_OPTIMIZERS, Builder, Settings, flatten, local_path, show, unit

MODEL_TYPES = {"STABLE_DIFFUSION_15": "sd15", "STABLE_DIFFUSION_15_INPAINTING": None, "STABLE_DIFFUSION_20": "sd2-v",
               "STABLE_DIFFUSION_20_BASE": "sd2", "STABLE_DIFFUSION_21": "sd2-v", "STABLE_DIFFUSION_21_BASE": "sd2",
               "STABLE_DIFFUSION_XL_10_BASE": "sdxl", "FLUX_DEV_1": "flux-dev", "FLUX_FILL_DEV_1": None}
DTYPES = {"FLOAT_32": "fp32", "FLOAT_16": "fp16", "BFLOAT_16": "bf16"}
QUANT = {"FLOAT_8": "fp8", "INT_8": "int8", "NFLOAT_4": "nf4"}  # OneTrainer's quantized weight dtypes
# the denoiser's blocks TrainLoop's blocks_to_swap counts, at the families' full size (its tooltip):
# OneTrainer's layer offload fraction becomes a number of them
SWAP_BLOCKS = {"sd15": 8, "sd2": 8, "sd2-v": 8, "sdxl": 6, "flux-dev": 57}
TEXT_ENCODERS = {"sd15": ("text_encoder",), "sd2": ("text_encoder",), "sd2-v": ("text_encoder",),
                 "sdxl": ("text_encoder", "text_encoder_2"), "flux-dev": ("text_encoder", "text_encoder_2")}
OPTIMIZERS = {"ADAMW": "adamw", "ADAMW_8BIT": "adamw8bit", "ADAFACTOR": "adafactor", "PRODIGY": "prodigy",
              "LION": "lion", "LION_8BIT": "lion8bit", "SGD_NESTEROV": "sgd_nesterov", "DADAPT_ADAM": "dadapt_adam",
              "SCHEDULE_FREE_ADAMW": "schedulefree_adamw"}
SCHEDULES = {"CONSTANT": "constant", "LINEAR": "linear", "COSINE": "cosine", "COSINE_WITH_RESTARTS": "cosine_restarts",
             "COSINE_WITH_HARD_RESTARTS": "cosine_restarts"}
SAMPLERS = {"DDIM": "ddim", "EULER": "euler", "EULER_A": "euler_a", "DPMPP": "dpmpp_2m",
            "DPMPP_KARRAS": "dpmpp_2m_karras",
            "DPMPP_SDE_KARRAS": "dpmpp_sde_karras", "UNIPC": "unipc"}
LAYER_PRESETS = {"full": "full", "attn-mlp": "attn-mlp", "attn-only": "attn-only"}
# settings of the OneTrainer program itself, not of the training: why each is left out
PROGRAM_KEYS = {
    "debug_mode": "debug output of OneTrainer", "debug_dir": "debug output of OneTrainer",
    "workspace_dir": "the workspace is chosen when running (launch.py run --workspace)",
    "cache_dir": "the Cache node writes into the run's workspace",
    "tensorboard": "TrainLoop always writes TensorBoard logs into the workspace",
    "tensorboard_expose": "TensorBoard server setting", "tensorboard_always_on": "TensorBoard server setting",
    "tensorboard_port": "TensorBoard server setting", "train_device": "the device is chosen automatically",
    "temp_device": "the device is chosen automatically",
    "attention_mechanism": "the attention kernel is chosen automatically",
    "continue_last_backup": "resume explicitly: TrainLoop.resume_from or 'launch.py queue resume'",
    "clear_cache_before_training": "the Cache node is keyed by content: stale entries are never used",
    "only_cache": "run with --target on the Cache node instead", "caching_threads": "chosen automatically",
    "latent_caching_epochs": "Cache.variations is the number of cached augmentations",
    "multi_gpu": "use 'accelerate launch'",
    "device_indexes": "use 'accelerate launch'",
    "prevent_overwrites": "Save never overwrites unless if_exists=overwrite",
}
_TIMESTEP_WHY = "the timestep distribution's own parameters differ: set TrainLoop.timestep_bias/timestep_scale by hand"
# left-over keys (by their last part) that need a word more than "no equivalent"
REASONS = {
    "__version": "OneTrainer's config format version (read by this importer)",
    "include": "every part of the model is loaded", "model_name": "the parts come from base_model_name",
    "loss_scaler": "the loss is not scaled by batch size",
    "learning_rate_scaler": "the learning rate is not scaled by batch size",
    "lora_weight_dtype": "adapters train in fp32",
    "sample_image_format": "samples are PNGs with the recipe in their text",
    "samples_to_tensorboard": "samples are written to the workspace and shown in the editor",
    "non_ema_sampling": "with EMA, samples use the EMA weights",
    "rolling_backup": "TrainLoop.backups_kept keeps the newest backups",
    "backup_before_save": "a backup is made when a run is stopped",
    "save_skip_first": "periodic saves start at the first interval",
    "save_filename_prefix": "periodic saves are named by step", "fused": "chosen by NodeTrainer",
    "foreach": "chosen by NodeTrainer",
    "stochastic_rounding": "not available", "text_encoder_layer_skip": "no clip-skip setting",
    "text_encoder_2_layer_skip": "no clip-skip setting",
    "noising_weight": _TIMESTEP_WHY,
    "noising_bias": _TIMESTEP_WHY,
    "validation": "validation loss is computed for validation concepts (TrainLoop.validate_every)",
    "validate_after": "validation loss is computed for validation concepts (TrainLoop.validate_every)",
    "validate_after_unit": "validation loss is computed for validation concepts (TrainLoop.validate_every)",
    "unet.stop_training_after": "the UNet trains to the end",
    "unet.stop_training_after_unit": "the UNet trains to the end",
    "vae.train": "the VAE is never trained",
    "preserve_embedding_norm": "not available: the embedding's vectors train freely",
    "embedding_weight_dtype": "embeddings train in fp32",
    "async_offloading": "TrainLoop's block swap decides how blocks travel",
    "enable_async_offloading": "TrainLoop's block swap decides how blocks travel",
}
_FT_QUANT = ("LoadModel's quantized weights are frozen, and this full fine-tune trains them: the part is loaded in "
             "full precision")
_TE_OFFLOAD = "TrainLoop's block swap and activation offloading apply to the denoiser"


def convert(data: dict, path: Path, registry) -> ImportResult:
    base = path.resolve().parent
    b = Builder(registry, "OneTrainer", path)
    s = b.track(Settings(flatten(data, keep=("concepts", "samples", "optimizer_defaults", "scheduler_params",
                                             "additional_embeddings", "secrets", "cloud", "quantization",
                                             "embedding"))))
    method = str(s.get("training_method", "FINE_TUNE")).upper()
    if method not in ("LORA", "FINE_TUNE", "EMBEDDING"):
        raise ImportError_(f"{path}: training_method {method} is not supported (NodeTrainer trains LoRAs, "
                           f"embeddings and full fine-tunes); choose LORA, EMBEDDING or FINE_TUNE in OneTrainer and "
                           f"save the config again")
    model_type = str(s.get("model_type", "STABLE_DIFFUSION_15")).upper()
    if MODEL_TYPES.get(model_type) is None:
        raise ImportError_(f"{path}: model_type {model_type} is not supported here (supported: "
                           f"{', '.join(k for k, v in MODEL_TYPES.items() if v)})")
    lora, embedding = method == "LORA", method == "EMBEDDING"
    flux = MODEL_TYPES[model_type].startswith("flux")
    b.mapped.append(f"training_method -> {'a LoRAInject node' if lora else 'an Embedding node' if embedding else 'a full fine-tune (no adapter)'}")

    # ---- model -----------------------------------------------------------------------------------
    load = b.node("LoadModel", 0)
    b.set(load, "source", local_path(str(s.get("base_model_name", "")), base, model=True), "base_model_name")
    b.set(load, "family", MODEL_TYPES[model_type], "model_type")
    # Flux's denoiser settings: "transformer" since config version 8, "prior" before
    denoiser = ("transformer" if any(k.startswith("transformer.") for k in s.values) else "prior") if flux else "unet"
    for part, param in ((denoiser, "unet_dtype"), ("text_encoder", "text_encoder_dtype"), ("vae", "vae_dtype")):
        _dtype(b, s, load, f"{part}.weight_dtype", param)
    full_ft = not (lora or embedding)
    _quant(b, s, load, denoiser, MODEL_TYPES[model_type],
           denoiser_trained=full_ft and bool(s.peek(f"{denoiser}.train", s.peek("train_unet", True))),
           text_encoder_trained=full_ft and bool(s.peek("text_encoder.train", s.peek("train_text_encoder", False))))
    if s.peek("vae.model_name"):
        b.set(load, "vae", local_path(s.get("vae.model_name"), base), "vae.model_name")
    weight_dtype = s.peek("weight_dtype")
    if weight_dtype is not None:  # before config version 9: one dtype for all parts, NONE in the parts
        s.get("weight_dtype")
        for part, param in (("unet", "unet_dtype"), ("text_encoder", "text_encoder_dtype")):
            if str(s.peek(f"{part}.weight_dtype", "NONE")).upper() == "NONE" and weight_dtype in DTYPES:
                b.set(load, param, DTYPES[weight_dtype], "weight_dtype")
    for old, part in (("unet_weight_dtype", "unet_dtype"), ("text_encoder_weight_dtype", "text_encoder_dtype"),
                      ("vae_weight_dtype", "vae_dtype")):
        if s.has(old):
            v = s.get(old)
            if str(v).upper() in DTYPES:
                b.set(load, part, DTYPES[str(v).upper()], old)
            elif str(v).upper() != "NONE":
                b.skip(old, v, "no such precision in LoadModel")

    model, trained_embeddings = _embeddings(b, s, load, method, MODEL_TYPES[model_type], base)
    if s.peek("preserve_embedding_norm") is False:
        s.get("preserve_embedding_norm")  # off: as NodeTrainer trains
    if str(s.peek("embedding_weight_dtype", "")).upper() == "FLOAT_32":
        s.get("embedding_weight_dtype")  # as NodeTrainer trains embeddings
    if lora:
        inject = b.node("LoRAInject", 1)
        b.link(model, "model", inject, "model")
        model = inject
        peft = str(s.get("peft_type", "LORA")).upper()
        algo = {"LORA": "lora", "LOHA": "loha", "LOKR": "lokr"}.get(peft)
        if algo is None:
            b.skip("peft_type", peft, "this adapter type is not available (lora, loha, lokr, locon, dora are)")
        else:
            if s.get("lora_decompose", False) and algo == "lora":
                algo = "dora"
                b.mapped.append("lora_decompose -> LoRAInject.algorithm (dora)")
            b.set(inject, "algorithm", algo, "peft_type")
        b.set(inject, "rank", s.get("lora_rank", 16), "lora_rank")
        b.set(inject, "alpha", s.get("lora_alpha", 1.0), "lora_alpha")
        if s.has("dropout_probability"):
            b.set(inject, "dropout", s.get("dropout_probability"), "dropout_probability")
        if s.peek("lora_model_name"):
            b.set(inject, "init_from", local_path(s.get("lora_model_name"), base), "lora_model_name")
        else:
            s.get("lora_model_name")
        if s.has("lokr_decompose_factor"):
            b.set(inject, "lokr_factor", s.get("lokr_decompose_factor"), "lokr_decompose_factor")
        preset = s.get("layer_filter_preset", s.get("lora_layer_preset"))
        custom = s.get("layer_filter", s.get("lora_layers", ""))
        if preset in LAYER_PRESETS:
            b.set(inject, "unet_layers", LAYER_PRESETS[preset], "layer_filter_preset")
        elif custom:
            b.set(inject, "unet_layers", "custom", "layer_filter_preset")
            b.set(inject, "unet_custom", custom, "layer_filter")
        elif preset is not None:
            b.skip("layer_filter_preset", preset, "unknown preset: full, attn-mlp and attn-only are mapped")
        if not s.get(f"{denoiser}.train", True):
            b.set(inject, "unet_layers", "none", f"{denoiser}.train")
        te_train = s.get("text_encoder.train", s.get("train_text_encoder", False))
        b.set(inject, "text_encoder_layers", "attn-mlp" if te_train else "none", "text_encoder.train")
        if s.has("text_encoder_2.train"):
            te2 = s.get("text_encoder_2.train")
            b.set(inject, "text_encoder_2_layers", "same" if te2 == te_train else ("attn-mlp" if te2 else "none"),
                  "text_encoder_2.train")

    # ---- data --------------------------------------------------------------------------------------
    bucketer = b.node("Bucketer", 1)
    concepts = _inline_or_file(b, s, base, "concepts", "concept_file_name", "Concept nodes")
    if not concepts:
        b.note("the config has no concepts: add a Concept node with your images")
    for i, c in enumerate(concepts or []):
        dataset = _concept(b, c, i, base)
        if dataset:
            b.link(dataset, "dataset", bucketer, "datasets")
    b.set(bucketer, "resolution", str(s.get("resolution", "512")).replace(" ", ""), "resolution")
    b.set(bucketer, "bucketing", "on" if s.get("aspect_ratio_bucketing", True) else "off", "aspect_ratio_bucketing")
    b.set(bucketer, "batch_size", s.get("batch_size", 1), "batch_size")
    b.link(model, "model", bucketer, "model")
    buckets = bucketer
    caching = s.get("latent_caching", s.get("image_caching", False))
    for k in ("latent_caching", "image_caching"):
        s.get(k)
    if caching:
        cache = b.node("Cache", 2)
        b.link(load, "model", cache, "model")
        b.link(bucketer, "buckets", cache, "buckets")
        b.set(cache, "cache_text", bool(s.get("text_caching", True)), "text_caching")
        b.mapped.append("latent_caching -> Cache node")
        buckets = cache
    elif s.has("text_caching"):
        b.mapped.append(f"text_caching = {show(s.get('text_caching'))} -> (no Cache node: nothing is cached)")

    # ---- optimizer ---------------------------------------------------------------------------------
    opt = b.node("Optimizer", 2)
    name = str(s.get("optimizer.optimizer", s.get("optimizer", "ADAMW")) or "ADAMW").upper()
    if name in OPTIMIZERS:
        b.set(opt, "optimizer", OPTIMIZERS[name], "optimizer.optimizer")
    else:
        b.skip("optimizer.optimizer", name, f"not available; AdamW is used (available: {', '.join(OPTIMIZERS)})")
    for key, param in (("weight_decay", "weight_decay"), ("beta1", "beta1"), ("beta2", "beta2"), ("eps", "eps"),
                       ("d_coef", "d_coef"), ("safeguard_warmup", "safeguard_warmup"),
                       ("use_bias_correction", "bias_correction"), ("relative_step", "relative_step")):
        v = s.get(f"optimizer.{key}")
        if v is not None:
            b.set(opt, param, v, f"optimizer.{key}")
    lr = s.get(f"{denoiser}.learning_rate")
    base_lr = s.get("learning_rate", 0.0001)
    b.set(opt, "lr", base_lr if lr is None else lr, f"{denoiser}.learning_rate" if lr is not None else "learning_rate")
    te_lr = s.get("text_encoder.learning_rate", s.get("text_encoder_learning_rate"))
    b.set(opt, "text_encoder_lr", base_lr if te_lr is None else te_lr, "text_encoder.learning_rate")
    sched = str(s.get("learning_rate_scheduler", "CONSTANT")).upper()
    if sched in SCHEDULES:
        b.set(opt, "schedule", SCHEDULES[sched], "learning_rate_scheduler")
    else:
        b.skip("learning_rate_scheduler", sched, "not available; constant is used")
    b.set(opt, "warmup", s.get("learning_rate_warmup_steps", 0.0), "learning_rate_warmup_steps")
    if s.has("learning_rate_cycles"):
        b.set(opt, "cycles", max(1, int(round(float(s.get("learning_rate_cycles"))))), "learning_rate_cycles")
    if s.has("learning_rate_min_factor"):
        b.set(opt, "min_factor", s.get("learning_rate_min_factor"), "learning_rate_min_factor")
    if trained_embeddings:
        elr = s.get("embedding_learning_rate")
        b.set(opt, "embedding_lr", base_lr if elr is None else elr,
              "embedding_learning_rate" if elr is not None else "learning_rate")
        _embedding_stop(b, opt, trained_embeddings)
    elif s.peek("embedding_learning_rate") is not None:
        b.skip("embedding_learning_rate", s.get("embedding_learning_rate"), "no embedding is trained")
    else:
        s.get("embedding_learning_rate")  # null: the learning rate, for no embedding
    stop = s.get("text_encoder.stop_training_after")
    stop_unit = unit(s.get("text_encoder.stop_training_after_unit", "NEVER"))
    if stop and stop_unit in ("epochs", "steps") and stop < 10_000_000:
        b.set(opt, "stop_text_encoder_after", stop, "text_encoder.stop_training_after")
        b.set(opt, "stop_text_encoder_unit", stop_unit, "text_encoder.stop_training_after_unit")
    elif stop:
        b.skip("text_encoder.stop_training_after", stop,
               "only epochs or steps are mapped; the text encoder trains to the end")

    # ---- training ----------------------------------------------------------------------------------
    train = b.node("TrainLoop", 3)
    b.link(model, "model", train, "model")
    b.link(buckets, "buckets", train, "buckets")
    b.link(opt, "optimizer", train, "optimizer")
    b.set(train, "epochs", s.get("epochs", 10), "epochs")
    b.set(train, "grad_accumulation", s.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps")
    if s.has("clip_grad_norm"):
        b.set(train, "clip_grad_norm", s.get("clip_grad_norm") or 0.0, "clip_grad_norm")
    dt = str(s.get("train_dtype", "BFLOAT_16")).upper()
    if dt in DTYPES:
        b.set(train, "train_dtype", DTYPES[dt], "train_dtype")
    else:
        b.skip("train_dtype", dt, "fp32, fp16 and bf16 are available")
    gc = s.get("gradient_checkpointing")
    if gc is not None:
        b.set(train, "gradient_checkpointing", str(gc).upper() not in ("OFF", "FALSE"), "gradient_checkpointing")
    _offloading(b, s, train, denoiser, MODEL_TYPES[model_type], full_ft)
    if s.get("optimizer.fused_back_pass", False):
        chosen = b.graph.nodes[opt].params.get("optimizer", "adamw")
        if chosen in FUSED_OPTIMIZERS:
            b.set(train, "fused_backward", True, "optimizer.fused_back_pass")
        else:
            b.skip("optimizer.fused_back_pass", True, f"TrainLoop.fused_backward steps the optimizer per weight, "
                                                      f"which {chosen} does not allow ({' and '.join(FUSED_OPTIMIZERS)} do)")
    if not (lora or embedding):
        b.set(train, "train_unet", bool(s.get(f"{denoiser}.train", s.get("train_unet", True))), f"{denoiser}.train")
        b.set(train, "train_text_encoder", bool(s.get("text_encoder.train", s.get("train_text_encoder", False))),
              "text_encoder.train")
    # SDXL's second text encoder: NodeTrainer sets both encoders together
    te = {"train": s.peek("text_encoder.train"), "learning_rate": s.peek("text_encoder.learning_rate"),
          "weight_dtype": s.peek("text_encoder.weight_dtype")}
    for k in ("train", "learning_rate", "weight_dtype"):
        key = f"text_encoder_2.{k}"
        if s.has(key) and not ((lora or embedding) and k == "train"):
            if k == "weight_dtype" and (str(s.peek(key)).upper() in QUANT or str(te[k]).upper() in QUANT):
                continue  # quantized encoders: LoadModel.text_encoder_quant (_quant)
            v = s.get(key)
            if v == te[k] or v is None or (k == "weight_dtype" and str(v).upper() == "NONE"):
                b.mapped.append(f"{key} -> as text_encoder.{k} (both encoders share the setting)")
            else:
                b.skip(key, v, f"both text encoders share one setting: text_encoder.{k} = {show(te[k])} is used")
    ema = str(s.get("ema", "OFF")).upper()
    b.set(train, "ema", ema != "OFF", "ema")
    if ema != "OFF":
        b.set(train, "ema_on_cpu", ema == "CPU", "ema")
    for key, param in (("ema_decay", "ema_decay"), ("ema_update_step_interval", "ema_every"),
                       ("masked_training", "masked_training"), ("unmasked_probability", "unmasked_probability"),
                       ("unmasked_weight", "unmasked_weight"), ("normalize_masked_area_loss", "normalize_masked_area")):
        if s.has(key):
            b.set(train, param, s.get(key), key)
    obj = b.objective(train, flow=flux)  # noise and loss
    if flux:
        _flow_objective(b, s, obj)
    for key, param in (("offset_noise_weight", "offset_noise"), ("perturbation_noise_weight", "perturbation_noise"),
                       ("rescale_noise_scheduler_to_zero_terminal_snr", "zero_terminal_snr"),
                       ("min_noising_strength", "min_noising"), ("max_noising_strength", "max_noising"),
                       ("huber_delta", "huber_delta")):
        if s.has(key):
            b.set(obj, param, s.get(key), key)
    if s.get("force_v_prediction", False):
        b.set(obj, "prediction", "v_prediction", "force_v_prediction")
    elif s.get("force_epsilon_prediction", False):
        b.set(obj, "prediction", "epsilon", "force_epsilon_prediction")
    td = str(s.get("timestep_distribution", "UNIFORM")).upper()
    if td in ("UNIFORM", "LOGIT_NORMAL", "SIGMOID"):
        (b.set_flow if flux else b.set)(obj, "timesteps", td.lower(), "timestep_distribution")
    else:
        b.skip("timestep_distribution", td, "uniform, logit_normal and sigmoid are available")
    _loss(b, s, obj)

    # ---- sampling, saving, backups -------------------------------------------------------------------
    samples = _inline_or_file(b, s, base, "samples", "sample_definition_file_name", "TrainLoop.sample_prompts")
    _samples(b, samples or [], train)
    every, every_unit = s.get("sample_after", 0), unit(s.get("sample_after_unit", "NEVER"))
    if every_unit:
        b.set(train, "sample_every", every, "sample_after")
        b.set(train, "sample_unit", every_unit, "sample_after_unit")
    every, every_unit = s.get("backup_after", 0), unit(s.get("backup_after_unit", "NEVER"))
    if every_unit:
        b.set(train, "backup_every", every, "backup_after")
        b.set(train, "backup_unit", every_unit, "backup_after_unit")
    if s.has("rolling_backup_count"):
        b.set(train, "backups_kept", s.get("rolling_backup_count"), "rolling_backup_count")
    every, every_unit = s.get("save_every", 0), unit(s.get("save_every_unit", "NEVER"))
    if every_unit:
        b.set(train, "save_every", every, "save_every")
        b.set(train, "save_unit", every_unit, "save_every_unit")
    if s.has("validate_after") and s.peek("validation"):
        s.get("validation")
        v_unit = unit(s.get("validate_after_unit", "EPOCH"))
        if v_unit:
            b.set(train, "validate_every", s.get("validate_after"), "validate_after")
            b.set(train, "validate_unit", v_unit, "validate_after_unit")

    save = b.node("Save", 4)
    b.link(train, "model", save, "model")
    dest = str(s.get("output_model_destination", "") or "model.safetensors")
    fmt = str(s.get("output_model_format", "SAFETENSORS")).upper()
    b.set(save, "what", "adapter" if lora else "embedding" if embedding else "full_model")
    if lora and trained_embeddings:
        b.set(save, "bundle_embeddings", bool(s.get("bundle_additional_embeddings", True)),
              "bundle_additional_embeddings")
    elif s.has("bundle_additional_embeddings"):
        b.mapped.append(f"bundle_additional_embeddings = {show(s.get('bundle_additional_embeddings'))} -> "
                        "(no trained embedding to bundle)")
    if embedding:
        s.used.add("output_model_format")
        b.mapped.append("output_model_format -> Save (embedding files have one layout per family)")
        name = Path(dest).name if Path(dest).suffix else Path(dest).name + ".safetensors"
    elif fmt == "DIFFUSERS":
        b.set(save, "layout", "peft" if lora else "diffusers_folder", "output_model_format")
        name = Path(dest).name
    else:
        b.set(save, "layout", "kohya" if lora else "single_file", "output_model_format")
        name = Path(dest).name if Path(dest).suffix else Path(dest).name + ".safetensors"
    b.set(save, "path", name, "output_model_destination")
    b.set(save, "if_exists", "add_suffix")
    if Path(dest).parent != Path("."):
        b.note(f"output_model_destination {dest}: the file is written into the run's workspace as {name}; to write "
               f"into {Path(dest).parent}, set Save.path and run with --allow-output {Path(dest).parent}")
    out_dtype = str(s.get("output_dtype", "FLOAT_16")).upper()
    if out_dtype in DTYPES:
        b.set(save, "dtype", DTYPES[out_dtype], "output_dtype")
    else:
        b.skip("output_dtype", out_dtype, "fp16, bf16 and fp32 are available")

    for key, why in PROGRAM_KEYS.items():
        if s.has(key):
            b.skip(key, s.get(key), why)
    b.leftovers(s, reasons=REASONS)
    title = f"Imported from OneTrainer: {path.stem}"
    return b.result(title, f"{'LoRA' if lora else 'Embedding' if embedding else 'Fine-tune'} of {model_type} imported from {path.name}; "
                           f"{len(b.skipped)} setting(s) not imported are listed in meta.imported.")


def _flow_objective(b: Builder, s: Settings, obj: str) -> None:
    """Flux: the shift of the sigma schedule and the guidance value trained with."""
    if s.get("dynamic_timestep_shifting", False):
        b.set_flow(obj, "shift", "resolution", "dynamic_timestep_shifting")
    elif s.has("timestep_shift"):
        b.set_flow(obj, "shift", "fixed", "timestep_shift")
        b.set_flow(obj, "shift_value", float(s.get("timestep_shift")), "timestep_shift")
    if s.has("transformer.guidance_scale") or s.has("prior.guidance_scale"):
        key = "transformer.guidance_scale" if s.has("transformer.guidance_scale") else "prior.guidance_scale"
        b.set_flow(obj, "guidance", float(s.get(key)), key)


def _dtype(b: Builder, s: Settings, nid: str, key: str, param: str) -> None:
    if not s.has(key) or str(s.peek(key)).upper() in QUANT:  # quantized: see _quant
        return
    v = str(s.get(key)).upper()
    if v in DTYPES:
        b.set(nid, param, DTYPES[v], key)
    elif v != "NONE":
        b.skip(key, v, f"fp32, fp16 and bf16 weights, and {', '.join(QUANT)} quantized ones, are available")


def _quant(b: Builder, s: Settings, load: str, denoiser: str, family: str, *, denoiser_trained: bool,
           text_encoder_trained: bool) -> None:
    """OneTrainer's quantized weight dtypes (FLOAT_8, INT_8, NFLOAT_4) as LoadModel's denoiser_quant and
    text_encoder_quant: frozen storage under an adapter or an embedding (QLoRA); one format serves every
    text encoder, so the largest quantized encoder's format is used for all."""
    key = f"{denoiser}.weight_dtype"
    fmt = QUANT.get(str(s.peek(key, "")).upper())
    if fmt:
        if denoiser_trained:
            b.skip(key, s.get(key), _FT_QUANT)
        else:
            s.get(key)
            b.set(load, "denoiser_quant", fmt, key)
    encoders = TEXT_ENCODERS.get(family, ("text_encoder",))
    quantized = {part: QUANT[str(s.peek(f"{part}.weight_dtype", "")).upper()] for part in encoders
                 if str(s.peek(f"{part}.weight_dtype", "")).upper() in QUANT}
    if not quantized:
        return
    if text_encoder_trained:
        for part in quantized:
            b.skip(f"{part}.weight_dtype", s.get(f"{part}.weight_dtype"), _FT_QUANT)
        return
    chosen = encoders[-1]  # the larger encoder (SDXL: CLIP-G; Flux: T5), where memory matters most
    if chosen not in quantized:  # quantizing it too would change more than the config asks
        for part in quantized:
            b.skip(f"{part}.weight_dtype", s.get(f"{part}.weight_dtype"),
                   f"LoadModel.text_encoder_quant quantizes every text encoder, and {chosen} is not quantized here: "
                   "the encoders stay in full precision (set text_encoder_quant to quantize them all)")
        return
    fmt = quantized[chosen]
    for part, f in quantized.items():
        key = f"{part}.weight_dtype"
        if f == fmt:
            s.get(key)
            b.set(load, "text_encoder_quant", fmt, key)
        else:
            b.skip(key, s.get(key), f"LoadModel.text_encoder_quant is one format for every text encoder: "
                                    f"{fmt} from {chosen}.weight_dtype is used")
    others = [p for p in encoders if p not in quantized]
    if others:
        b.note(f"LoadModel.text_encoder_quant = {fmt} quantizes every text encoder, {', '.join(others)} too "
               f"(OneTrainer quantized only {', '.join(quantized)})")


def _offloading(b: Builder, s: Settings, train: str, denoiser: str, family: str, full_ft: bool) -> None:
    """OneTrainer's layer and activation offloading as TrainLoop's blocks_to_swap and offload_activations.
    Config version 11 keeps them per part ({denoiser}.offload_fraction, .activation_offloading,
    .gradient_checkpointing); before, layer_offload_fraction and enable_activation_offloading applied
    when gradient_checkpointing was CPU_OFFLOADED."""
    old = str(s.peek("gradient_checkpointing", "")).upper() == "CPU_OFFLOADED"
    fraction, fraction_key = 0.0, None
    if s.has(f"{denoiser}.offload_fraction"):
        fraction_key = f"{denoiser}.offload_fraction"
        fraction = float(s.get(fraction_key) or 0.0)
    elif s.has("layer_offload_fraction"):
        fraction_key = "layer_offload_fraction"
        value = float(s.get(fraction_key) or 0.0)
        if value and not old:
            b.skip(fraction_key, value, "OneTrainer offloads layers only with gradient_checkpointing CPU_OFFLOADED")
        fraction = value if old else 0.0
    if s.has(f"{denoiser}.activation_offloading"):
        if s.get(f"{denoiser}.activation_offloading"):
            b.set(train, "offload_activations", True, f"{denoiser}.activation_offloading")
    elif old:
        if s.get("enable_activation_offloading", True):
            b.set(train, "offload_activations", True, "gradient_checkpointing")
    if s.has(f"{denoiser}.gradient_checkpointing"):
        b.set(train, "gradient_checkpointing", bool(s.get(f"{denoiser}.gradient_checkpointing")),
              f"{denoiser}.gradient_checkpointing")
    if fraction and fraction_key:
        blocks = SWAP_BLOCKS.get(family)
        swap = min(round(fraction * blocks), blocks - 1) if blocks else 0
        if full_ft:
            b.skip(fraction_key, fraction, "TrainLoop's block swap streams frozen blocks, and this full fine-tune "
                                           "trains them; TrainLoop.fused_backward saves memory in a fine-tune")
        elif not blocks:
            b.skip(fraction_key, fraction, f"the {family} denoiser's block count is not known to this importer: "
                                           "set TrainLoop.blocks_to_swap by hand")
        elif swap < 1:
            b.skip(fraction_key, fraction, f"less than one of the {family} denoiser's {blocks} blocks: no block swap")
        else:
            b.set(train, "blocks_to_swap", swap, fraction_key)
            b.note(f"{fraction_key} {fraction}: {swap} of the {family} denoiser's {blocks} blocks are streamed from RAM "
                   f"(TrainLoop.blocks_to_swap; OneTrainer counts layers, NodeTrainer whole blocks)")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        for k in ("offload_fraction", "activation_offloading", "gradient_checkpointing"):
            key = f"{part}.{k}"
            if s.has(key):
                v = s.get(key)
                if v and k != "gradient_checkpointing":
                    b.skip(key, v, _TE_OFFLOAD)
                elif v and part != "vae":
                    b.mapped.append(f"{key} -> TrainLoop.gradient_checkpointing (one setting for the model)")


def _embeddings(b: Builder, s: Settings, load: str, method: str, family: str, base: Path) -> tuple[str, list]:
    """OneTrainer's embeddings on the MODEL wire, after LoadModel: additional embeddings that do not train
    as LoadEmbedding nodes, trained ones (and with training_method EMBEDDING the config's ``embedding``) as
    Embedding nodes; with a LoRA this is pivotal tuning. Returns the wire's last node and the trained
    embeddings' settings (for the Optimizer's stop)."""
    model, trained = load, []
    main = s.get("embedding")
    extra = s.get("additional_embeddings") or []
    if method != "EMBEDDING" and main:
        b.skip("embedding", {k: main.get(k) for k in ("placeholder", "token_count") if k in main},
               "OneTrainer trains this embedding only with training_method EMBEDDING; with a LoRA, trained embeddings "
               "are additional_embeddings (imported)")
    if method == "FINE_TUNE" and extra:
        b.skip("additional_embeddings", [e.get("placeholder") for e in extra if isinstance(e, dict)],
               "a full fine-tune trains a model without adapters, and an embedding on its wire would leave nothing "
               "to fine-tune: add LoadEmbedding nodes to the Sample nodes that use them")
        return model, trained
    items = [(f"additional_embeddings[{i}].", e) for i, e in enumerate(extra) if isinstance(e, dict)]
    if method == "EMBEDDING":
        items.append(("embedding.", main if isinstance(main, dict) else {}))
    for label, data in items:
        e = b.track(Settings(data, label))
        e.get("uuid")  # OneTrainer's own name for the embedding's files
        if e.get("is_output_embedding", False):
            b.skip(f"{label}is_output_embedding", True, "output embeddings (a T5 output vector) are not available; "
                                                         "an input embedding is made")
        train = bool(e.get("train", True)) or label == "embedding."
        token = str(e.get("placeholder", "<embedding>"))
        file = e.get("model_name") or ""
        if not train:
            if not file:
                b.skip(f"{label}placeholder", token, "an additional embedding that does not train needs its file "
                                                     "(model_name)")
                continue
            node = b.node("LoadEmbedding", 1)
            b.set(node, "path", local_path(str(file), base), f"{label}model_name")
            b.set(node, "token", token, f"{label}placeholder")
            for k in ("token_count", "initial_embedding_text", "stop_training_after", "stop_training_after_unit"):
                if e.has(k):
                    b.mapped.append(f"{label}{k} = {show(e.get(k))} -> (the file decides; it does not train)")
        else:
            node = b.node("Embedding", 1)
            b.set(node, "token", token, f"{label}placeholder")
            count = e.get("token_count")
            if count:
                b.set(node, "num_vectors", int(count), f"{label}token_count")
            text = str(e.get("initial_embedding_text", "*") or "")
            b.set(node, "init_text", "" if text.strip() == "*" else text, f"{label}initial_embedding_text")
            if file:
                b.set(node, "init_from", local_path(str(file), base), f"{label}model_name")
            else:
                e.get("model_name")
            encoders = _embedding_encoders(b, s, family)
            if encoders:
                b.set(node, "encoders", encoders)
            trained.append(e)  # its leftovers are listed after the Optimizer's stop is read
        b.link(model, "model", node, "model")
        model = node
        if not train:
            b.leftovers(e)
    if method == "EMBEDDING":  # OneTrainer trains only the embedding then: the parts' train switches are not read
        for key in ("unet.train", "prior.train", "transformer.train", "text_encoder.train", "text_encoder_2.train"):
            if s.has(key):
                b.mapped.append(f"{key} = {show(s.get(key))} -> (an embedding run trains only the embedding)")
    return model, trained


def _embedding_encoders(b: Builder, s: Settings, family: str) -> str | None:
    """Which text encoders get the vectors: OneTrainer's text_encoder(_2).train_embedding."""
    encoders = TEXT_ENCODERS.get(family, ("text_encoder",))
    if len(encoders) < 2:  # one encoder: OneTrainer trains the embedding on it whatever the switch says
        if s.has("text_encoder.train_embedding"):
            b.mapped.append(f"text_encoder.train_embedding = {show(s.get('text_encoder.train_embedding'))} -> "
                            "Embedding (the one text encoder)")
        return None
    flags = {p: s.get(f"{p}.train_embedding", True) for p in encoders}
    for p in encoders:
        if s.has(f"{p}.train_embedding"):
            b.mapped.append(f"{p}.train_embedding -> Embedding.encoders")
    if all(flags.values()) or not any(flags.values()):
        return "all"
    one = next(p for p, on in flags.items() if on)
    return {"sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
            "flux-dev": {"text_encoder": "clip_l", "text_encoder_2": "t5"}}[family][one]


def _embedding_stop(b: Builder, opt: str, trained: list) -> None:
    """The Optimizer's one embedding stop, from the first trained embedding that stops (they share it)."""
    chosen = None
    for e in trained:
        stop, stop_unit = e.get("stop_training_after"), unit(e.get("stop_training_after_unit", "NEVER"))
        key = f"{e.label}stop_training_after"
        if not stop or stop_unit is None:
            continue
        if stop_unit not in ("epochs", "steps"):
            b.skip(key, stop, "only epochs or steps are mapped; the embedding trains to the end")
        elif chosen is None:
            chosen = (stop, stop_unit)
            b.set(opt, "stop_embedding_after", stop, key)
            b.set(opt, "stop_embedding_unit", stop_unit, f"{e.label}stop_training_after_unit")
        elif (stop, stop_unit) != chosen:
            b.skip(key, stop, f"the embeddings share one stop (Optimizer.stop_embedding_after): {chosen[0]} "
                              f"{chosen[1]} is used")
    for e in trained:
        b.leftovers(e)


def _loss(b: Builder, s: Settings, train: str) -> None:
    strengths = {name: float(s.get(f"{name}_strength", default) or 0.0)
                 for name, default in (("mse", 1.0), ("mae", 0.0), ("log_cosh", 0.0), ("huber", 0.0), ("vb_loss", 0.0))}
    on = [n for n, v in strengths.items() if v]
    if on in (["mse"], ["mae"], ["huber"]):
        b.set(train, "loss", on[0], "/".join(f"{n}_strength" for n in strengths))
        if strengths[on[0]] != 1.0:
            b.skip(f"{on[0]}_strength", strengths[on[0]], "the loss is not scaled; scale the learning rate instead")
    else:
        b.skip("mse_strength/mae_strength/log_cosh_strength/huber_strength/vb_loss_strength",
               strengths, "one loss at a time (mse, mae or huber) is available; mse is used")
    fn = str(s.get("loss_weight_fn", "CONSTANT")).upper()
    strength = s.get("loss_weight_strength", 5.0)
    if fn == "CONSTANT":
        flow = b.graph.nodes[train].type == "FlowObjective"
        b.set(train, "weighting", "none" if flow else "constant", "loss_weight_fn")
    elif fn == "MIN_SNR_GAMMA":
        b.set(train, "weighting", "min_snr", "loss_weight_fn")
        b.set(train, "min_snr_gamma", strength, "loss_weight_strength")
    elif fn == "DEBIASED_ESTIMATION":
        b.set(train, "weighting", "debiased", "loss_weight_fn")
    else:
        b.skip("loss_weight_fn", fn, "constant, min-SNR-gamma and debiased estimation are available")
        b.skip("loss_weight_strength", strength, f"belongs to loss_weight_fn {fn}")
    if fn in ("CONSTANT", "DEBIASED_ESTIMATION") and s.has("loss_weight_strength"):
        b.mapped.append("loss_weight_strength -> (not used by this weighting)")


def _inline_or_file(b: Builder, s: Settings, base: Path, key: str, file_key: str, target: str):
    """The config's inline list `key` (concepts, samples), else the JSON list in the file `file_key` names
    (OneTrainer keeps them in either); a file named beside an inline list is reported as not used."""
    items = s.get(key)
    file_name = s.get(file_key)
    if not items and file_name:
        items = _read_list(base / file_name, b, file_key, file_name)
        if items:
            b.mapped.append(f"{file_key} -> {target}")
    elif file_name:
        b.skip(file_key, file_name, f"the config holds its {key} inline; those are imported")
    return items


def _read_list(p: Path, b: Builder, key: str, value) -> list:
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        b.skip(key, value, f"cannot read {p}: {e}")
        return []
    return data if isinstance(data, list) else []


def _concept(b: Builder, c: dict, i: int, base: Path) -> str | None:
    """A Concept node (and an Augment node when the concept augments); the node that gives its dataset."""
    s = b.track(Settings(flatten(c), f"concepts[{i}]."))
    if not s.get("enabled", True):
        b.skip(f"concepts[{i}]", s.peek("name") or s.peek("path"), "the concept is disabled")
        return None
    node = b.node("Concept", 0, title=None)
    b.set(node, "folder", local_path(str(s.get("path", "")), base), f"concepts[{i}].path")
    if s.peek("name"):
        b.set(node, "name", s.get("name"), f"concepts[{i}].name")
    b.set(node, "recursive", bool(s.get("include_subdirectories", True)), f"concepts[{i}].include_subdirectories")
    strategy = str(s.get("balancing_strategy", "REPEATS")).upper()
    balancing = s.get("balancing", 1.0)
    if strategy == "SAMPLES":
        b.set(node, "balancing", "samples", f"concepts[{i}].balancing_strategy")
        b.set(node, "samples_per_epoch", int(balancing), f"concepts[{i}].balancing")
    else:
        b.set(node, "repeats", balancing, f"concepts[{i}].balancing")
    if s.has("loss_weight"):
        b.set(node, "loss_weight", s.get("loss_weight"), f"concepts[{i}].loss_weight")
    ctype = str(s.get("type", s.get("concept_type", "STANDARD"))).upper()
    if s.get("validation_concept", False):
        ctype = "VALIDATION"
    kind = {"STANDARD": "standard", "VALIDATION": "validation", "PRIOR_PREDICTION": "prior"}.get(ctype)
    if kind:
        b.set(node, "concept_type", kind, f"concepts[{i}].type")
    else:
        b.skip(f"concepts[{i}].type", ctype, "standard, validation and prior concepts are available")
    source = str(s.get("text.prompt_source", "sample")).lower()
    ps = {"sample": "per_image", "concept": "concept_file", "filename": "filename"}.get(source)
    if ps:
        b.set(node, "prompt_source", ps, f"concepts[{i}].text.prompt_source")
        if ps == "concept_file" and s.peek("text.prompt_path"):
            b.set(node, "caption_file", local_path(s.get("text.prompt_path"), base), f"concepts[{i}].text.prompt_path")
    else:
        b.skip(f"concepts[{i}].text.prompt_source", source,
               "per-image, concept file and file name captions are available")
    for key, param in (("text.enable_tag_shuffling", "shuffle_tags"), ("text.tag_delimiter", "delimiter"),
                       ("text.keep_tags_count", "keep_tags")):
        if s.has(key):
            b.set(node, param, s.get(key), f"concepts[{i}].{key}")
    if s.get("text.tag_dropout_enable", False):
        b.set(node, "tag_dropout", s.get("text.tag_dropout_probability", 0.0),
              f"concepts[{i}].text.tag_dropout_probability")
    else:
        s.get("text.tag_dropout_probability")
    if s.has("text.prompt_path"):
        s.get("text.prompt_path")
    # augmentations: an Augment node for this concept when any is on
    aug = {}
    if s.get("image.enable_fixed_flip", False):
        aug["flip"] = "always"
    elif s.get("image.enable_random_flip", False):
        aug["flip"] = "random"
    else:
        aug["flip"] = "off"
    aug["crop_jitter"] = bool(s.get("image.enable_crop_jitter", False))
    if s.get("image.enable_random_rotate", False):
        aug["rotation"] = float(s.get("image.random_rotate_max_angle", 0.0))
    else:
        s.get("image.random_rotate_max_angle")
    for name in ("brightness", "contrast", "saturation", "hue"):
        if s.get(f"image.enable_random_{name}", False):
            aug[name] = float(s.get(f"image.random_{name}_max_strength", 0.0))
        else:
            s.get(f"image.random_{name}_max_strength")
    if s.get("image.enable_resolution_override", False):
        aug["resolution"] = str(s.get("image.resolution_override", ""))
    else:
        s.get("image.resolution_override")
    # the "fixed" switches of OneTrainer apply the maximum every time; the random ones draw up to it
    fixed = [k for k in ("rotate", "brightness", "contrast", "saturation", "hue") if s.get(f"image.enable_fixed_{k}",
                                                                                           False)]
    if fixed:
        aug["mode"] = "fixed"
    active = aug["flip"] != "off" or aug["crop_jitter"] or any(aug.get(k) for k in ("rotation", "brightness",
                                                                                    "contrast",
                                                                                     "saturation", "hue", "resolution"))
    out = node
    if active:
        a = b.node("Augment", 0)
        b.link(node, "dataset", a, "dataset")
        for param, value in aug.items():
            b.set(a, param, value, f"concepts[{i}].image.{param}")
        out = a
    b.leftovers(s, reasons=REASONS)
    return out


def _samples(b: Builder, samples: list, train: str) -> None:
    prompts, first = [], None
    for i, sample in enumerate(samples):
        s = b.track(Settings(flatten(sample) if isinstance(sample, dict) else {}, f"samples[{i}]."))
        if not s.get("enabled", True):
            b.skip(f"samples[{i}]", s.peek("prompt"), "the sample is disabled")
            continue
        prompt = str(s.get("prompt", "")).replace("\n", " ").strip()
        if prompt:
            prompts.append(prompt)
        if first is None:
            first = s
            if s.has("diffusion_steps"):
                b.set(train, "sample_steps", s.get("diffusion_steps"), f"samples[{i}].diffusion_steps")
            if s.has("cfg_scale"):
                b.set(train, "sample_cfg", s.get("cfg_scale"), f"samples[{i}].cfg_scale")
            if s.has("seed") and not s.peek("random_seed", False):
                b.set(train, "sample_seed", s.get("seed"), f"samples[{i}].seed")
            sampler = str(s.get("noise_scheduler", "")).upper()
            if sampler in SAMPLERS:
                b.set(train, "sample_sampler", SAMPLERS[sampler], f"samples[{i}].noise_scheduler")
            elif sampler:
                b.skip(f"samples[{i}].noise_scheduler", sampler, f"available: {', '.join(SAMPLERS)}")
        for k, v in s.leftover():
            if k == "prompt":
                continue
            why = ("TrainLoop samples every prompt with the first sample's settings at the training resolution"
                   if first is not s or k in ("width", "height", "negative_prompt", "random_seed", "frames", "length",
                                               "sample_inpainting", "base_image_path", "mask_image_path",
                                               "text_encoder_1_layer_skip",
                                               "text_encoder_2_layer_skip", "force_last_timestep")
                   else "no NodeTrainer equivalent known to this importer")
            b.skip(f"samples[{i}].{k}", v, why)
    if prompts:
        b.set(train, "sample_prompts", "\n".join(prompts), "samples[].prompt")
    else:
        b.set(train, "sample_prompts", "")
