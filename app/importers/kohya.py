"""kohya sd-scripts configs (``--config_file`` TOML, with an optional ``--dataset_config`` TOML) and the
kohya_ss GUI's saved JSON -> a NodeTrainer recipe.

A config with ``network_module`` trains a LoRA (``networks.lora``, or LyCORIS' ``lycoris.kohya`` with
its ``network_args``); one without trains the whole model (fine_tune.py / sdxl_train.py). The GUI's
JSON names a few settings differently (``LoRA_type``, ``epoch``, ``max_resolution``, ``optimizer``,
``lr_warmup`` in percent...); they are renamed first and then read like the TOML.
"""

from __future__ import annotations

from pathlib import Path

from app.importers import ImportError_, ImportResult
from app.importers.common import FUSED_OPTIMIZERS, Builder, Settings, local_path

OPTIMIZERS = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adafactor": "adafactor", "prodigy": "prodigy",
              "lion": "lion", "lion8bit": "lion8bit", "sgdnesterov": "sgd_nesterov", "dadaptadam": "dadapt_adam",
              "adamwschedulefree": "schedulefree_adamw", "adamw_schedulefree": "schedulefree_adamw"}
SCHEDULES = {"constant": "constant", "constant_with_warmup": "constant", "linear": "linear", "cosine": "cosine",
             "cosine_with_restarts": "cosine_restarts", "polynomial": "polynomial"}
SAMPLERS = {"ddim": "ddim", "euler": "euler", "k_euler": "euler", "euler_a": "euler_a", "k_euler_a": "euler_a",
            "dpmsolver++": "dpmpp_2m", "dpmsolver": "dpmpp_2m", "k_dpm_2": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m",
            "dpmpp_2m_karras": "dpmpp_2m_karras", "dpmpp_sde_karras": "dpmpp_sde_karras", "unipc": "unipc"}
PRECISION = {"fp16": "fp16", "bf16": "bf16", "float": "fp32", "fp32": "fp32", "no": "fp32"}
LYCORIS = {"lora": "lora", "locon": "locon", "loha": "loha", "lokr": "lokr"}
GUI_LORA_TYPES = {"standard": "lora", "kohya locon": "locon", "lycoris/locon": "locon", "lycoris/loha": "loha",
                  "lycoris/lokr": "lokr", "kohya dylora": None, "lycoris/dylora": None, "lycoris/ia3": None,
                  "lycoris/diag-oft": None, "lycoris/glora": None, "lycoris/native fine-tuning": None}
GUI_RENAMES = {"epoch": "max_train_epochs", "max_resolution": "resolution", "optimizer": "optimizer_type",
               "optimizer_args": "optimizer_args", "lr_scheduler_args": "lr_scheduler_args"}
RUNTIME_KEYS = {
    "xformers": "the attention kernel is chosen automatically", "sdpa": "the attention kernel is chosen automatically",
    "mem_eff_attn": "the attention kernel is chosen automatically",
    "max_data_loader_n_workers": "data loading is set up by NodeTrainer",
    "persistent_data_loader_workers": "data loading is set up by NodeTrainer",
    "logging_dir": "TrainLoop writes TensorBoard logs into the run's workspace",
    "log_with": "TrainLoop writes TensorBoard logs into the run's workspace",
    "log_prefix": "TrainLoop writes TensorBoard logs into the run's workspace",
    "output_dir": "outputs go into the run's workspace (launch.py run --workspace; --allow-output for another folder)",
    "lowram": "memory use is managed by NodeTrainer", "highvram": "memory use is managed by NodeTrainer",
    "save_state": "TrainLoop.backup_every makes resumable backups (mapped from save_every_n_* when save_state is on)",
    "resume": "a kohya state folder is not a TrainLoop backup: start the run anew",
    "full_fp16": "weights stay in LoadModel's precision; training uses autocast (train_dtype)",
    "full_bf16": "weights stay in LoadModel's precision; training uses autocast (train_dtype)",
    "clip_skip": "no clip-skip setting: the penultimate layer is used as each model family expects",
    "caption_extension": "captions are <stem>.txt files",
    "min_bucket_reso": "Bucketer picks buckets by aspect ratio (Bucketer.aspects), not by side limits",
    "max_bucket_reso": "Bucketer picks buckets by aspect ratio (Bucketer.aspects), not by side limits",
    "cache_latents_to_disk": "the Cache node always caches on disk, in the workspace",
    "vae_batch_size": "Cache.encode_batch is the batch size of encoding",
    "split_mode": "kohya's deprecated split mode (replaced there by blocks_to_swap) is not available: use "
                  "TrainLoop.blocks_to_swap",
    "apply_t5_attn_mask": "the Flux family's prompt encoding decides the T5 mask",
}


def convert(data: dict, path: Path, registry, *, dataset: dict | None = None,
            dataset_path: Path | None = None) -> ImportResult:
    base = path.resolve().parent
    flat = {}
    for k, v in data.items():  # sd-scripts' TOML may group settings in tables; the keys are unique
        if isinstance(v, dict) and k not in ("datasets", "general"):
            flat.update(v)
        else:
            flat[k] = v
    gui = path.suffix.lower() == ".json"
    lora_type = None
    shown, overridden = {}, []
    if gui:
        lora_type = flat.pop("LoRA_type", None)
        for old, new in GUI_RENAMES.items():  # the GUI's field wins over an empty sd-scripts one
            if old in flat and (new not in flat or flat[new] in ("", None, 0) or old == new):
                if new in flat and old != new:
                    overridden.append((new, flat[new], f"empty: the GUI's {old} is used"))
                flat[new] = flat.pop(old)
                shown[new] = old
            elif old in flat and old != new:
                flat[f"{old} (GUI)"] = flat.pop(old)
        if "lr_warmup" in flat:  # percent of the steps in the GUI
            flat["lr_warmup_steps"] = float(flat.pop("lr_warmup") or 0) / 100.0
            shown["lr_warmup_steps"] = "lr_warmup"
    b = Builder(registry, "kohya_ss" if gui else "kohya sd-scripts", path)
    b.shown = shown
    for key, value, why in overridden:
        b.skipped.append(f"{key} = {value!r} ({why})")
    s = b.track(Settings(flat))
    module = s.get("network_module", "")
    lora = bool(module) or (gui and lora_type is not None)
    if module:
        b.mapped.append("network_module -> a LoRAInject node")

    # ---- model -----------------------------------------------------------------------------------
    load = b.node("LoadModel", 0)
    source = s.get("pretrained_model_name_or_path", "")
    if not source:
        raise ImportError_(f"{path}: no pretrained_model_name_or_path: which base model does it train?")
    b.set(load, "source", local_path(str(source), base, model=True), "pretrained_model_name_or_path")
    v2, vpred, sdxl = s.get("v2", False), s.get("v_parameterization", False), s.get("sdxl", False)
    flux = str(module).endswith("lora_flux") or any(s.has(k) for k in ("ae", "t5xxl", "flux1_checkbox")) \
        or bool(s.get("flux1_checkbox", False))
    family = "sdxl" if sdxl else ("sd2-v" if v2 and vpred else "sd2" if v2 else "auto")
    if flux:
        family = "flux-schnell" if "schnell" in str(source).lower() else "flux-dev"
    b.set(load, "family", family, "v2/v_parameterization/sdxl" if not flux else "network_module/ae/t5xxl (Flux)")
    if flux:
        for key in ("ae", "clip_l", "t5xxl"):  # Flux's split files: LoadModel's params of the same names
            if s.peek(key):
                b.set(load, key, local_path(str(s.get(key)), base), key)
            else:
                s.get(key)
        if s.has("t5xxl_max_token_length"):
            b.set(load, "text_max_length", int(s.get("t5xxl_max_token_length")), "t5xxl_max_token_length")
    if s.peek("vae"):
        b.set(load, "vae", local_path(s.get("vae"), base), "vae")
    else:
        s.get("vae")
    if s.get("no_half_vae", False):
        b.set(load, "vae_dtype", "fp32", "no_half_vae")
    _fp8(b, s, load, lora, flux)

    model = load
    if lora:
        inject = b.node("LoRAInject", 1)
        b.link(load, "model", inject, "model")
        model = inject
        _network(b, s, inject, module, lora_type, base)

    # ---- data ----------------------------------------------------------------------------------------
    bucketer = b.node("Bucketer", 1)
    b.link(model, "model", bucketer, "model")
    if dataset is not None:
        _dataset_toml(b, dataset, dataset_path or path, bucketer, s)
    else:
        _dataset_flat(b, s, bucketer, base)
    _prior_loss_weight(b, s)
    buckets = bucketer
    # sd-scripts turns cache_latents on when cache_latents_to_disk is (and the text encoders' "_to_disk" likewise)
    to_disk = bool(s.get("cache_latents_to_disk", False))
    if s.get("cache_latents", False) or to_disk:
        cache = b.node("Cache", 2)
        b.link(load, "model", cache, "model")
        b.link(bucketer, "buckets", cache, "buckets")
        b.mapped.append(f"{'cache_latents' if s.peek('cache_latents') else 'cache_latents_to_disk'} -> Cache node")
        if to_disk:
            b.mapped.append("cache_latents_to_disk -> Cache node (it always caches on disk, in the workspace)")
        text_keys = [k for k in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk") if s.has(k)]
        if text_keys:
            on = any(bool(s.get(k)) for k in text_keys)
            b.set(cache, "cache_text", on, " / ".join(text_keys))
        buckets = cache
    else:
        for key in ("cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk"):
            if s.peek(key):
                b.skip(key, s.get(key), "the Cache node caches text with the latents (Cache.cache_text): set "
                                        "cache_latents, or add a Cache node, to cache both")

    # ---- optimizer ---------------------------------------------------------------------------------
    opt = b.node("Optimizer", 2)
    name = str(s.get("optimizer_type", "AdamW") or "AdamW")
    if name.lower().replace("_", "") in {k.replace("_", "") for k in OPTIMIZERS}:
        key = next(k for k in OPTIMIZERS if k.replace("_", "") == name.lower().replace("_", ""))
        b.set(opt, "optimizer", OPTIMIZERS[key], "optimizer_type")
    else:
        b.skip("optimizer_type", name,
               f"not available; AdamW is used (available: {', '.join(sorted(set(OPTIMIZERS.values())))})")
    _optimizer_args(b, s.get("optimizer_args", []) or [], opt)
    lr = s.get("learning_rate", 0.0001)
    unet_lr = s.get("unet_lr")
    b.set(opt, "lr", unet_lr if unet_lr not in (None, "", 0) else lr, "unet_lr" if unet_lr else "learning_rate")
    te_lr = s.get("text_encoder_lr")
    if isinstance(te_lr, list):
        te_lr = te_lr[0] if te_lr else None
    b.set(opt, "text_encoder_lr", te_lr if te_lr not in (None, "", 0) else lr, "text_encoder_lr")
    sched = str(s.get("lr_scheduler", "constant")).lower()
    if sched in SCHEDULES:
        b.set(opt, "schedule", SCHEDULES[sched], "lr_scheduler")
    else:
        b.skip("lr_scheduler", sched, "not available; constant is used")
    if s.has("lr_warmup_steps"):
        b.set(opt, "warmup", s.get("lr_warmup_steps") or 0.0, "lr_warmup_steps")
    if s.has("lr_scheduler_num_cycles"):
        b.set(opt, "cycles", max(1, int(s.get("lr_scheduler_num_cycles") or 1)), "lr_scheduler_num_cycles")
    if s.has("lr_scheduler_power"):
        b.set(opt, "power", s.get("lr_scheduler_power"), "lr_scheduler_power")
    stop_te = s.get("stop_text_encoder_training")
    if stop_te:
        b.set(opt, "stop_text_encoder_after", stop_te, "stop_text_encoder_training")
        b.set(opt, "stop_text_encoder_unit", "steps")

    # ---- training ----------------------------------------------------------------------------------
    train = b.node("TrainLoop", 3)
    b.link(model, "model", train, "model")
    b.link(buckets, "buckets", train, "buckets")
    b.link(opt, "optimizer", train, "optimizer")
    epochs, steps = s.get("max_train_epochs"), s.get("max_train_steps")
    if epochs:
        b.set(train, "epochs", epochs, "max_train_epochs")
        if steps:
            b.skip("max_train_steps", steps, "max_train_epochs is set and wins, as in kohya")
    elif steps:
        b.set(train, "max_steps", steps, "max_train_steps")
    b.set(train, "grad_accumulation", s.get("gradient_accumulation_steps", 1), "gradient_accumulation_steps")
    if s.has("max_grad_norm"):
        b.set(train, "clip_grad_norm", s.get("max_grad_norm"), "max_grad_norm")
    precision = str(s.get("mixed_precision", "no")).lower()
    b.set(train, "train_dtype", PRECISION.get(precision, "fp32"), "mixed_precision")
    b.set(train, "gradient_checkpointing", bool(s.get("gradient_checkpointing", False)), "gradient_checkpointing")
    if s.has("seed") and s.peek("seed") not in (None, ""):
        b.set(train, "seed", int(s.get("seed")), "seed")
    _memory(b, s, train, lora, opt)
    if s.has("max_token_length"):
        mtl = s.get("max_token_length")
        if str(mtl) in ("75", "150", "225"):
            b.set(train, "max_tokens", str(mtl), "max_token_length")
        elif mtl:
            b.skip("max_token_length", mtl, "75, 150 or 225 tokens are available")
    if not lora:
        b.set(train, "train_text_encoder", bool(s.get("train_text_encoder", False)), "train_text_encoder")
    if s.has("masked_loss") and s.peek("masked_loss") is not None:
        b.set(train, "masked_training", s.get("masked_loss"), "masked_loss")
    obj = b.objective(train, flow=flux)  # noise and loss
    if flux:
        _flux_objective(b, s, obj)
    for key, param in (("noise_offset", "offset_noise"), ("ip_noise_gamma", "perturbation_noise"),
                       ("zero_terminal_snr", "zero_terminal_snr"), ("huber_c", "huber_delta")):
        if s.has(key) and s.peek(key) is not None:
            b.set(obj, param, s.get(key), key)
    if vpred:
        b.set(obj, "prediction", "v_prediction", "v_parameterization")
    gamma = s.get("min_snr_gamma")
    if flux and gamma:
        b.skip("min_snr_gamma", gamma, "Flux's flow-matching objective weights by sigma (FlowObjective.weighting)")
    elif gamma:
        b.set(obj, "weighting", "min_snr", "min_snr_gamma")
        b.set(obj, "min_snr_gamma", gamma, "min_snr_gamma")
    elif s.get("debiased_estimation_loss", False):
        b.set(obj, "weighting", "debiased", "debiased_estimation_loss")
    loss = str(s.get("loss_type", "l2")).lower()
    if loss in ("l2", "l1", "huber", "smooth_l1"):
        b.set(obj, "loss", {"l2": "mse", "l1": "mae"}.get(loss, "huber"), "loss_type")
        if loss == "smooth_l1":
            b.note("loss_type smooth_l1 is imported as huber (the same shape, scaled differently)")
    else:
        b.skip("loss_type", loss, "mse (l2), mae (l1) and huber are available")
    for key, param in (("min_timestep", "min_noising"), ("max_timestep", "max_noising")):
        if s.peek(key) is not None:
            b.set(obj, param, float(s.get(key)) / 1000.0, key)
    if s.has("multires_noise_iterations") and s.peek("multires_noise_iterations"):
        b.skip("multires_noise_iterations", s.get("multires_noise_iterations"),
               "pyramid noise is not available; offset_noise is the nearest")

    # ---- sampling, saving --------------------------------------------------------------------------
    _sampling(b, s, train, base)
    every_e, every_s = _every(b, s, train, "save")
    if s.peek("save_state") and (every_s or every_e):
        b.set(train, "backup_every", every_s or every_e, "save_state")
        b.set(train, "backup_unit", "steps" if every_s else "epochs")
    keep = s.get("save_last_n_epochs") or s.get("save_last_n_steps")
    if keep:
        b.skip("save_last_n_epochs/steps", keep, "periodic saves are all kept; TrainLoop.backups_kept limits backups")
    save = b.node("Save", 4)
    b.link(train, "model", save, "model")
    b.set(save, "what", "adapter" if lora else "full_model")
    fmt = str(s.get("save_model_as", "safetensors")).lower()
    name = str(s.get("output_name", "") or "model")
    if fmt == "diffusers" or fmt == "diffusers_safetensors":
        b.set(save, "layout", "peft" if lora else "diffusers_folder", "save_model_as")
    else:
        if fmt not in ("safetensors",):
            b.skip("save_model_as", fmt, "pickle formats (ckpt, pt) are never written; safetensors is used")
        else:
            s.used.add("save_model_as")
            b.mapped.append("save_model_as -> Save.layout")
        b.set(save, "layout", "kohya" if lora else "single_file")
        name += "" if name.endswith(".safetensors") else ".safetensors"
    b.set(save, "path", name, "output_name")
    b.set(save, "dtype", PRECISION.get(str(s.get("save_precision", "fp16")).lower(), "fp16"), "save_precision")
    b.set(save, "if_exists", "add_suffix")

    for key, why in RUNTIME_KEYS.items():
        if s.has(key) and key not in s.used:
            b.skip(key, s.get(key), why)
    b.leftovers(s)
    kind = "LoRA" if lora else "Fine-tune"
    return b.result(f"Imported from kohya: {path.stem}",
                    f"{kind} imported from {path.name}{' and ' + dataset_path.name if dataset_path else ''}; "
                    f"{len(b.skipped)} setting(s) not imported are listed in meta.imported.")


def _fp8(b: Builder, s: Settings, load: str, lora: bool, flux: bool) -> None:
    """fp8_base (the denoiser and, on SD families, the text encoders in fp8) and fp8_base_unet (the
    denoiser only) as LoadModel's quantized weights: frozen storage under an adapter (QLoRA)."""
    whole, unet_only = bool(s.get("fp8_base", False)), bool(s.get("fp8_base_unet", False))
    if not (whole or unet_only):
        return
    key = "fp8_base_unet" if unet_only else "fp8_base"
    if not lora:
        b.skip(key, True, "LoadModel's quantized weights are frozen, so a full fine-tune cannot train them; "
                          "TrainLoop.fused_backward and gradient_checkpointing save memory in a fine-tune")
        return
    b.set(load, "denoiser_quant", "fp8", key)
    if whole and not unet_only:
        if flux:  # flux_train_network.py keeps CLIP-L in the training precision, T5 as its file holds it
            b.note("fp8_base: kohya loads Flux's T5 in fp8 only when its file is fp8 and keeps CLIP-L as it is; "
                   "set LoadModel.text_encoder_quant to fp8 to quantize the text encoders too")
        else:
            b.set(load, "text_encoder_quant", "fp8", "fp8_base")
    b.note(f"{key}: LoadModel keeps one fp8 scale per 128 input columns (fp8_block_size), finer than kohya's plain "
           "cast; fp8_block_size 0 is one scale per tensor")


def _memory(b: Builder, s: Settings, train: str, lora: bool, opt: str) -> None:
    """blocks_to_swap, cpu_offload_checkpointing and fused_backward_pass as TrainLoop's memory params."""
    swap = s.get("blocks_to_swap")
    if swap:
        if lora:
            b.set(train, "blocks_to_swap", int(swap), "blocks_to_swap")
        else:
            b.skip("blocks_to_swap", swap, "TrainLoop's block swap streams frozen blocks, and a full fine-tune trains "
                                           "them; fused_backward and gradient_checkpointing save memory here")
    if s.get("cpu_offload_checkpointing", False):
        b.set(train, "offload_activations", True, "cpu_offload_checkpointing")
    if s.get("fused_backward_pass", False):
        chosen = b.graph.nodes[opt].params.get("optimizer", "adamw")
        if chosen not in FUSED_OPTIMIZERS:
            b.skip("fused_backward_pass", True, f"TrainLoop.fused_backward steps the optimizer per weight, which "
                                                f"{chosen} does not allow ({' and '.join(FUSED_OPTIMIZERS)} do)")
        else:
            b.set(train, "fused_backward", True, "fused_backward_pass")
            if int(b.graph.nodes[train].params.get("grad_accumulation", 1)) > 1:
                b.note("fused_backward_pass: TrainLoop.fused_backward needs grad_accumulation 1: set it to 1 and "
                       "raise the batch size instead")


def _flux_objective(b: Builder, s: Settings, obj: str) -> None:
    """flux_train_network.py's timestep sampling, shift, sigmoid scale, guidance and prediction type."""
    sampling = str(s.get("timestep_sampling", "sigma")).lower()
    if sampling == "sigma":
        _sigma_sampling(b, s, obj)
    elif sampling in ("sigmoid", "uniform"):
        b.set_flow(obj, "timesteps", sampling, "timestep_sampling")
        b.set_flow(obj, "shift", "none", "timestep_sampling")
    elif sampling == "shift":
        b.set_flow(obj, "timesteps", "sigmoid", "timestep_sampling")
        b.set_flow(obj, "shift", "fixed", "timestep_sampling")
    elif sampling == "flux_shift":
        b.set_flow(obj, "timesteps", "sigmoid", "timestep_sampling")
        b.set_flow(obj, "shift", "resolution", "timestep_sampling")
    else:
        b.skip("timestep_sampling", sampling, "sigma, sigmoid, uniform, shift and flux_shift are mapped")
    if s.has("discrete_flow_shift"):
        b.set_flow(obj, "shift_value", float(s.get("discrete_flow_shift")), "discrete_flow_shift")
    if s.has("sigmoid_scale"):
        b.set_flow(obj, "logit_scale", float(s.get("sigmoid_scale")), "sigmoid_scale")
    if s.has("guidance_scale"):
        b.set_flow(obj, "guidance", float(s.get("guidance_scale")), "guidance_scale")
    pred = s.get("model_prediction_type", "raw")
    if str(pred) == "raw":
        b.mapped.append("model_prediction_type = raw -> FlowObjective (the velocity is the target)")
    else:
        b.skip("model_prediction_type", pred, "only raw prediction (the velocity as target) is trained")


def _network(b: Builder, s: Settings, inject: str, module: str, lora_type, base: Path) -> None:
    args = {}
    for item in s.get("network_args", []) or []:
        k, _, v = str(item).partition("=")
        args[k.strip()] = v.strip()
    # the GUI keeps some network_args as top-level fields
    for key in ("conv_dim", "conv_alpha", "algo", "factor", "rank_dropout", "module_dropout", "dora_wd"):
        if s.has(key):
            v = s.get(key)
            if v not in (None, "", 0, False) or key in ("conv_dim", "conv_alpha"):
                args.setdefault(key, str(v))
    algo = "lora"
    if lora_type is not None:
        algo = GUI_LORA_TYPES.get(str(lora_type).lower(), None)
        if algo is None:
            b.skip("LoRA_type", lora_type, "not available; a plain LoRA is used (LoRA, LoCon, LoHa, LoKr, DoRA are)")
            algo = "lora"
        else:
            b.mapped.append("LoRA_type -> LoRAInject.algorithm")
    elif module == "lycoris.kohya":
        name = args.pop("algo", "lora").lower()
        algo = LYCORIS.get(name)
        if algo is None:
            b.skip("network_args.algo", name, "not available; a plain LoRA is used")
            algo = "lora"
        else:
            b.mapped.append("network_args.algo -> LoRAInject.algorithm")
    elif module not in ("networks.lora", "networks.lora_flux", ""):
        b.skip("network_module", module, "networks.lora and lycoris.kohya are mapped; a plain LoRA is used")
    args.pop("algo", None)
    if str(args.pop("dora_wd", "")).lower() in ("true", "1"):
        algo = "dora"
        b.mapped.append("network_args.dora_wd -> LoRAInject.algorithm (dora)")
    conv = args.pop("conv_dim", None)
    conv_alpha = args.pop("conv_alpha", None)
    if conv not in (None, "", "0", "None") and algo == "lora":
        algo = "locon"  # networks.lora with conv_dim trains the 3x3 convs too: LoCon
    b.set(inject, "algorithm", algo)
    b.set(inject, "rank", int(s.get("network_dim", 4) or 4), "network_dim")
    b.set(inject, "alpha", float(s.get("network_alpha", 1.0) or 1.0), "network_alpha")
    if conv not in (None, "", "0", "None"):
        b.set(inject, "conv_rank", int(float(conv)), "network_args.conv_dim")
        if conv_alpha not in (None, "", "None"):
            b.set(inject, "conv_alpha", float(conv_alpha), "network_args.conv_alpha")
    if s.has("network_dropout") and s.peek("network_dropout") is not None:
        b.set(inject, "dropout", float(s.get("network_dropout") or 0.0), "network_dropout")
    for key, param in (("rank_dropout", "rank_dropout"), ("module_dropout", "module_dropout"), ("dropout", "dropout")):
        if key in args:
            b.set(inject, param, float(args.pop(key)), f"network_args.{key}")
    if "factor" in args:
        b.set(inject, "lokr_factor", int(args.pop("factor")), "network_args.factor")
    preset = args.pop("preset", None)
    if preset in ("full", "attn-mlp", "attn-only"):
        b.set(inject, "unet_layers", preset, "network_args.preset")
    elif preset is not None:
        b.skip("network_args.preset", preset, "full, attn-mlp and attn-only are mapped")
    for k, v in args.items():
        b.skip(f"network_args.{k}", v, "no LoRAInject equivalent")
    unet_only, te_only = s.get("network_train_unet_only", False), s.get("network_train_text_encoder_only", False)
    b.set(inject, "text_encoder_layers", "none" if unet_only else "attn-mlp", "network_train_unet_only")
    if te_only:
        b.set(inject, "unet_layers", "none", "network_train_text_encoder_only")
    if s.peek("network_weights"):
        b.set(inject, "init_from", local_path(s.get("network_weights"), base), "network_weights")
    else:
        s.get("network_weights")


def _optimizer_args(b: Builder, args: list, opt: str) -> None:
    if isinstance(args, str):
        args = args.split()
    for item in args:
        k, _, v = str(item).partition("=")
        k, v = k.strip(), v.strip()
        key = f"optimizer_args.{k}"
        try:
            if k == "betas":
                b1, b2 = (float(x) for x in v.strip("()[]").split(","))
                b.set(opt, "beta1", b1, key)
                b.set(opt, "beta2", b2, key)
            elif k in ("weight_decay", "eps", "d_coef"):
                b.set(opt, k, float(v), key)
            elif k in ("safeguard_warmup", "relative_step"):
                b.set(opt, k, v.lower() == "true", key)
            elif k == "use_bias_correction":
                b.set(opt, "bias_correction", v.lower() == "true", key)
            else:
                b.skip(key, v, "no Optimizer equivalent")
        except ValueError:
            b.skip(key, v, "cannot read the value")


def _concept_settings(b: Builder, node: str, sub: Settings, aug_node_col: int, label: str):
    """Caption and augmentation settings of one subset (or of the flat config): returns the node that
    gives the dataset (an Augment node when the subset augments)."""
    for key, param in (("shuffle_caption", "shuffle_tags"), ("keep_tokens", "keep_tags"),
                       ("caption_dropout_rate", "caption_dropout"), ("caption_tag_dropout_rate", "tag_dropout")):
        if sub.has(key) and sub.peek(key) is not None:
            b.set(node, param, sub.get(key), f"{label}{key}")
    if sub.peek("keep_tokens_separator"):
        b.skip(f"{label}keep_tokens_separator", sub.get("keep_tokens_separator"),
               "Concept.keep_tags counts tags instead")
    if sub.has("caption_separator"):
        b.set(node, "delimiter", sub.get("caption_separator"), f"{label}caption_separator")
    flip, color, crop = sub.get("flip_aug", False), sub.get("color_aug", False), sub.get("random_crop", False)
    if not (flip or color or crop):
        return node
    a = b.node("Augment", aug_node_col)
    b.link(node, "dataset", a, "dataset")
    b.set(a, "flip", "random" if flip else "off", f"{label}flip_aug")
    b.set(a, "crop_jitter", bool(crop), f"{label}random_crop")
    if color:  # kohya shifts hue by a few percent and brightness slightly
        b.set(a, "hue", 0.03, f"{label}color_aug")
        b.set(a, "brightness", 0.1)
        b.note("color_aug is imported as Augment hue 0.03 and brightness 0.1 (kohya's own strengths are fixed)")
    return a


def _dataset_flat(b: Builder, s: Settings, bucketer: str, base: Path) -> None:
    """train_data_dir with kohya's N_name subfolders (Concept reads the repeats from the names)."""
    folder = s.get("train_data_dir")
    if folder:
        c = b.node("Concept", 0)
        b.set(c, "folder", local_path(str(folder), base), "train_data_dir")
        out = _concept_settings(b, c, s, 0, "")
        b.link(out, "dataset", bucketer, "datasets")
    else:
        b.note("no train_data_dir: add a Concept node with your images")
    reg = s.get("reg_data_dir")
    if reg:
        c = b.node("Concept", 0, title="Regularisation")
        b.set(c, "folder", local_path(str(reg), base), "reg_data_dir")
        b.set(c, "concept_type", "prior")
        b.link(c, "dataset", bucketer, "datasets")
    _bucketing(b, s, bucketer, "")
    b.set(bucketer, "batch_size", s.get("train_batch_size", 1), "train_batch_size")


def _prior_loss_weight(b: Builder, s: Settings) -> None:
    """kohya weighs the loss of its regularisation images (reg_data_dir, or is_reg subsets of a dataset config)
    by prior_loss_weight: that is Concept.loss_weight of each prior concept."""
    if not s.has("prior_loss_weight"):
        return
    priors = [nid for nid, n in b.graph.nodes.items() if n.type == "Concept" and n.params.get("concept_type") == "prior"]
    value = s.get("prior_loss_weight")
    if not priors:
        b.skip("prior_loss_weight", value, "no regularisation images (reg_data_dir, or is_reg in the dataset config): "
                                           "set Concept.loss_weight of the regularisation concept when you add one")
    for nid in priors:
        b.set(nid, "loss_weight", value, "prior_loss_weight")


def _bucketing(b: Builder, s: Settings, bucketer: str, label: str) -> None:
    res = s.get("resolution")
    if res is not None:
        if isinstance(res, (list, tuple)):
            w, h = (int(res[0]), int(res[-1]))
        else:
            parts = [int(x) for x in str(res).replace("x", ",").split(",") if x.strip()]
            w, h = parts[0], parts[-1]
        b.set(bucketer, "resolution", str(w) if w == h else f"{w}x{h}", f"{label}resolution")
    if s.has("enable_bucket"):
        b.set(bucketer, "bucketing", "on" if s.get("enable_bucket") else "off", f"{label}enable_bucket")
    if s.has("bucket_reso_steps"):
        b.set(bucketer, "quantization", s.get("bucket_reso_steps"), f"{label}bucket_reso_steps")
    if s.has("bucket_no_upscale"):
        b.set(bucketer, "no_upscale", bool(s.get("bucket_no_upscale")), f"{label}bucket_no_upscale")
    for key in ("min_bucket_reso", "max_bucket_reso"):
        if s.has(key):
            b.skip(f"{label}{key}", s.get(key), RUNTIME_KEYS[key])


def _dataset_toml(b: Builder, dataset: dict, dpath: Path, bucketer: str, main: Settings) -> None:
    """[general] defaults, [[datasets]] (resolution, batch size, bucketing), [[datasets.subsets]]."""
    base = dpath.resolve().parent
    general = dataset.get("general") or {}
    datasets = dataset.get("datasets") or []
    if not datasets:
        raise ImportError_(f"{dpath}: no [[datasets]] table: nothing to train on")
    for key in ("train_data_dir", "reg_data_dir", "resolution", "train_batch_size", "enable_bucket"):
        if main.has(key):  # kohya ignores these when a dataset config is given
            main.get(key)
            b.skip(key, main.peek(key), "the dataset config is used instead, as in kohya")
    reported: set[tuple[str, str]] = set()
    for d_index, ds in enumerate(datasets):
        d = b.track(Settings({**{k: v for k, v in general.items()}, **{k: v for k, v in ds.items() if k != "subsets"}},
                             f"datasets[{d_index}]."))
        if d_index == 0:
            _bucketing(b, d, bucketer, d.label)
            b.set(bucketer, "batch_size", d.get("batch_size", 1), f"{d.label}batch_size")
        for j, sub in enumerate(ds.get("subsets") or []):
            sset = b.track(Settings({**d.values, **sub}, f"datasets[{d_index}].subsets[{j}]."))
            sset.used |= {k for k in d.used}
            if d_index > 0:  # handled below: the resolution through Augment, the rest listed when it differs
                sset.used |= {"resolution", "batch_size", "enable_bucket", "bucket_reso_steps", "bucket_no_upscale"}
            c = b.node("Concept", 0)
            folder = sset.get("image_dir") or sset.get("metadata_file")
            if sset.peek("metadata_file") and not sset.peek("image_dir"):
                b.skip(f"{sset.label}metadata_file", folder,
                       "captions from a metadata JSON are not read; give image_dir")
            b.set(c, "folder", local_path(str(folder or ""), base), f"{sset.label}image_dir")
            if sset.has("num_repeats"):
                b.set(c, "repeats", sset.get("num_repeats"), f"{sset.label}num_repeats")
            if sset.peek("class_tokens"):
                b.set(c, "name", sset.get("class_tokens"), f"{sset.label}class_tokens")
                b.set(c, "missing_caption", "concept_name")
            if sset.get("is_reg", False):
                b.set(c, "concept_type", "prior", f"{sset.label}is_reg")
            out = _concept_settings(b, c, sset, 0, sset.label)
            if d_index > 0:
                # another [[datasets]] with its own resolution: the concept keeps it through Augment.resolution
                res = d.peek("resolution")
                if res is not None and res != datasets[0].get("resolution", general.get("resolution")):
                    a = out if b.graph.nodes[out].type == "Augment" else None
                    if a is None:
                        a = b.node("Augment", 0)
                        b.link(out, "dataset", a, "dataset")
                        b.set(a, "flip", "off")
                        b.set(a, "crop_jitter", False)
                    r = res if not isinstance(res, (list, tuple)) else res[0]
                    b.set(a, "resolution", str(r).split(",")[0], f"{d.label}resolution")
                    out = a
            b.link(out, "dataset", bucketer, "datasets")
            for k, v in sset.leftover():
                if k not in sub and (k, repr(v)) in reported:
                    continue  # a [general] or [[datasets]] setting: listed once
                reported.add((k, repr(v)))
                if k in RUNTIME_KEYS:
                    b.skip(sset.label + k, v, RUNTIME_KEYS[k])
                else:
                    b.skip(sset.label + k, v, "no Concept equivalent known to this importer")
        if d_index > 0:
            for key in ("batch_size", "enable_bucket", "bucket_reso_steps", "bucket_no_upscale"):
                if key in ds and ds[key] != datasets[0].get(key):
                    b.skip(f"{d.label}{key}", ds[key],
                           "one Bucketer serves every dataset: the first dataset's value is used")


def _sampling(b: Builder, s: Settings, train: str, base: Path) -> None:
    prompts_file = s.get("sample_prompts")
    prompts: list[str] = []
    if prompts_file:
        p = Path(local_path(str(prompts_file), base))
        try:
            lines = p.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            b.skip("sample_prompts", prompts_file, f"cannot read the prompt file ({e.strerror or e}); "
                                                   f"give TrainLoop.sample_prompts by hand")
            lines = []
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            text, *opts = line.split(" --")
            prompts.append(text.strip())
            if len(prompts) == 1:  # the first prompt's options set the sampling
                for opt in opts:
                    flag, _, value = opt.partition(" ")
                    try:
                        if flag == "s":
                            b.set(train, "sample_steps", int(value), "sample_prompts --s")
                        elif flag == "l":
                            b.set(train, "sample_cfg", float(value), "sample_prompts --l")
                        elif flag == "d":
                            b.set(train, "sample_seed", int(value), "sample_prompts --d")
                        else:
                            b.skip(f"sample_prompts --{flag}", value,
                                   "sampling follows the training resolution and the first prompt's --s/--l/--d")
                    except ValueError:
                        b.skip(f"sample_prompts --{flag}", value, "cannot read the value")
        if prompts:
            b.set(train, "sample_prompts", "\n".join(prompts), "sample_prompts")
    _every(b, s, train, "sample")
    sampler = s.get("sample_sampler")
    if sampler:
        if str(sampler).lower() in SAMPLERS:
            b.set(train, "sample_sampler", SAMPLERS[str(sampler).lower()], "sample_sampler")
        else:
            b.skip("sample_sampler", sampler, f"available: {', '.join(sorted(set(SAMPLERS.values())))}")
    if s.has("sample_at_first"):
        b.skip("sample_at_first", s.get("sample_at_first"),
               "TrainLoop always samples before training when it has prompts")


def _every(b: Builder, s: Settings, train: str, what: str) -> tuple:
    """`{what}_every_n_steps` (preferred) or `_n_epochs` as TrainLoop's `{what}_every` and `{what}_unit`
    (what: save, sample); both values are returned, for what else depends on them."""
    every_e, every_s = s.get(f"{what}_every_n_epochs"), s.get(f"{what}_every_n_steps")
    if every_s:
        b.set(train, f"{what}_every", every_s, f"{what}_every_n_steps")
        b.set(train, f"{what}_unit", "steps")
    elif every_e:
        b.set(train, f"{what}_every", every_e, f"{what}_every_n_epochs")
        b.set(train, f"{what}_unit", "epochs")
    return every_e, every_s


def _sigma_sampling(b: Builder, s: Settings, obj: str) -> None:
    """kohya's default "sigma" sampling: a draw by weighting_scheme (none: uniform; logit_normal) on the
    scheduler's sigmas, shifted by discrete_flow_shift (FlowObjective: a fixed shift)."""
    scheme = str(s.get("weighting_scheme", "none")).lower()
    if scheme == "logit_normal":
        b.set_flow(obj, "timesteps", "logit_normal", "timestep_sampling")
        if s.has("logit_mean"):
            b.set_flow(obj, "logit_mean", float(s.get("logit_mean")), "logit_mean")
        if s.has("logit_std"):
            b.set_flow(obj, "logit_scale", float(s.get("logit_std")), "logit_std")
        b.mapped.append("weighting_scheme -> FlowObjective.timesteps (logit_normal)")
    else:
        b.set_flow(obj, "timesteps", "uniform", "timestep_sampling")
        if scheme in ("none", "uniform"):
            b.mapped.append(f"weighting_scheme = {scheme} -> FlowObjective.timesteps (uniform)")
        elif scheme == "mode":
            b.skip("weighting_scheme", scheme, "the mode draw (SD3's) is not available: sigma is drawn uniform; "
                                               "FlowObjective has uniform, sigmoid and logit_normal")
        else:  # sigma_sqrt, cosmap: a uniform draw, the scheme named for SD3's loss weighting
            b.skip("weighting_scheme", scheme, f"sigma is drawn uniform, as kohya draws it for {scheme}; its loss "
                                               f"weighting is not imported: FlowObjective.weighting = {scheme} "
                                               "weights the loss by sigma")
    if s.has("mode_scale"):
        b.skip("mode_scale", s.get("mode_scale"), "belongs to weighting_scheme mode, which is not available")
    b.set_flow(obj, "shift", "fixed", "timestep_sampling")
    if not s.has("discrete_flow_shift"):
        if b.graph.nodes[obj].type == "FlowObjective":
            b.set(obj, "shift_value", 3.0)  # kohya's default discrete_flow_shift
