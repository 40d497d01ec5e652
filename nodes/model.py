"""Model nodes: load a base model, patch adapters in, sample images, save results."""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PENDING = "is declared but not implemented yet: it arrives with the model issue"
DTYPES = ["fp32", "fp16", "bf16"]
QUANT = ["none", "fp8", "int8", "nf4"]  # app/ml/memory/quant.py's CHOICES (kept torch-free here)
SAMPLERS = ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc"]


def _model_files(params: dict) -> str:
    from app.ml.fingerprint import path_fingerprint

    return "".join(path_fingerprint(params.get(name) or "") for name in ("source", "vae", "tokenizer", "ae", "clip_l",
                                                                           "t5xxl"))


@node(type="LoadModel", category="model", fingerprint=_model_files,
      description="Loads a base model: a diffusers folder, a single-file .safetensors checkpoint "
                  "(A1111/Civitai layout) or a built-in tiny model for demos and tests (builtin:shapes-sd, which "
                  "draws coloured shapes; builtin:tiny-sd, builtin:tiny-sdxl, builtin:tiny-flux with random weights).",
      inputs=[
          Path("source", "builtin:tiny-sd", kind="file_or_folder",
               tooltip="a diffusers folder, a .safetensors checkpoint, or builtin:shapes-sd / builtin:tiny-sd / "
                       "builtin:tiny-sdxl / builtin:tiny-flux"),
          Enum("family", ["auto", "sd15", "sd2", "sd2-v", "sdxl", "flux-dev", "flux-schnell"],
               tooltip="auto: detected from the checkpoint's keys; sd2-v: SD 2.x 768 with v-prediction"),
          Path("vae", "", kind="file_or_folder", optional=True, tooltip="a separate VAE to use instead"),
          Enum("unet_dtype", DTYPES, "fp32", tooltip="weight precision of the UNet (Flux: of the transformer)"),
          Enum("text_encoder_dtype", DTYPES, "fp32", tooltip="weight precision of the text encoder(s)"),
          Enum("vae_dtype", DTYPES, "fp32", tooltip="weight precision of the VAE (the SDXL VAE overflows in fp16)"),
          Path("tokenizer", "", kind="folder", optional=True, advanced=True,
               tooltip="a tokenizer folder (tokenizer.json or vocab.json + merges.txt; for SDXL one CLIP tokenizer "
                       "or tokenizer/ and tokenizer_2/ subfolders); wins over one beside the model. Empty: the "
                       "model's own, one beside the checkpoint, else fetched once from the Hugging Face hub"),
          Path("ae", "", kind="file", optional=True, advanced=True,
               tooltip="Flux split files: the VAE (ae.safetensors); empty: found beside the transformer file"),
          Path("clip_l", "", kind="file", optional=True, advanced=True,
               tooltip="Flux split files: the CLIP-L text encoder (clip_l.safetensors); empty: found beside it"),
          Path("t5xxl", "", kind="file", optional=True, advanced=True,
               tooltip="Flux split files: the T5-XXL text encoder (t5xxl_fp16 / t5xxl_fp8_e4m3fn); empty: found beside it"),
          Int("text_max_length", 0, min=0, max=512, advanced=True,
              tooltip="Flux: prompt tokens T5 reads (0 = the model's default: 512 dev, 256 schnell); part of the "
                      "Cache key. SD families read 75-token pieces (TrainLoop's max_tokens) and ignore it"),
          Enum("denoiser_quant", QUANT, "none",
               tooltip="store the UNet's (Flux: the transformer's) Linear weights quantized and frozen, for adapter "
                       "training on small GPUs (QLoRA): fp8 ~1 byte a weight (pure torch), int8 ~1, nf4 ~0.56 "
                       "(bitsandbytes); embedders and input/output projections stay as they are. A full fine-tune "
                       "needs none"),
          Enum("text_encoder_quant", QUANT, "none",
               tooltip="the same for the text encoder(s) (Flux: CLIP-L and T5-XXL, where it matters most)"),
          Int("fp8_block_size", 128, min=0, max=65536, advanced=True,
              tooltip="fp8: one scale per this many input columns of each row (finer keeps small weights); "
                      "0 = one scale per tensor (kohya's fp8_base)"),
      ],
      outputs=[Output("model", "MODEL")])
def load_model(ctx, source, family, vae, unet_dtype, text_encoder_dtype, vae_dtype, tokenizer="", ae="", clip_l="",
               t5xxl="", text_max_length=0, denoiser_quant="none", text_encoder_quant="none", fp8_block_size=128):
    from app.engine.errors import NodeError
    from app.ml.models import ModelLoadError
    from app.ml.models import load_model as load

    ctx.progress(0, 1, "loading")
    try:
        bundle = load(source, family=None if family == "auto" else family, vae=vae or None,
                      dtypes={"unet": unet_dtype, "text_encoder": text_encoder_dtype, "vae": vae_dtype},
                      tokenizer=tokenizer or None, text_max_length=text_max_length or None,
                      split_files={"ae": ae, "clip_l": clip_l, "t5xxl": t5xxl},
                      quant={"unet": denoiser_quant, "text_encoder": text_encoder_quant},
                      fp8_block_size=fp8_block_size, log=ctx.log,
                      check_cancel=ctx.check_cancel)
    except (ModelLoadError, FileNotFoundError) as e:
        raise NodeError(str(e)) from None
    ctx.log(f"loaded {bundle.family.display_name} from {source}")
    ctx.progress(1, 1)
    from app.ml.handle import ModelHandle

    return ModelHandle(bundle)


@node(type="LoRAInject", category="model",
      description="Adds a trainable adapter (LoRA, LoCon, LoHa, LoKr or DoRA) to a model. The base model is "
                  "never changed: the adapter is patched in only while a consumer runs.",
      inputs=[
          Socket("model", "MODEL"),
          Enum("algorithm", ["lora", "locon", "loha", "lokr", "dora"]),
          Int("rank", 16, min=1, max=1024, tooltip="adapter rank (network dim)"),
          Float("alpha", 1.0, min=0.0, max=4096.0, tooltip="the applied scale is alpha / rank"),
          Int("conv_rank", 0, min=0, max=1024, tooltip="rank for conv layers (LoCon); 0 = same as rank"),
          Float("conv_alpha", 1.0, min=0.0, max=4096.0),
          Float("dropout", 0.0, min=0.0, max=1.0, tooltip="dropout on the adapter's hidden features"),
          Float("rank_dropout", 0.0, min=0.0, max=1.0, advanced=True),
          Float("module_dropout", 0.0, min=0.0, max=1.0, advanced=True),
          Int("lokr_factor", -1, min=-1, max=64, advanced=True, tooltip="LoKr factor; -1 = automatic"),
          Enum("unet_layers", ["attn-mlp", "attn-only", "full", "single-blocks", "custom", "none"],
               tooltip="which layers of the denoiser (UNet, or Flux's transformer) get adapters; single-blocks: "
                       "Flux's single-stream blocks only"),
          String("unet_custom", "", tooltip="layer names or a regex, when unet_layers is custom"),
          Enum("text_encoder_layers", ["none", "attn-only", "attn-mlp", "full", "custom"],
               tooltip="train adapters in the (first) text encoder too"),
          String("text_encoder_custom", ""),
          Enum("text_encoder_2_layers", ["same", "none", "attn-only", "attn-mlp", "full", "custom"],
               tooltip="SDXL's second text encoder; same = as the first"),
          String("text_encoder_2_custom", ""),
          Path("init_from", "", optional=True, tooltip="continue training from an existing LoRA file"),
      ],
      outputs=[Output("model", "MODEL")])
def lora_inject(ctx, model, algorithm, rank, alpha, conv_rank, conv_alpha, dropout, rank_dropout, module_dropout,
                lokr_factor, unet_layers, unet_custom, text_encoder_layers, text_encoder_custom, text_encoder_2_layers,
                text_encoder_2_custom, init_from):
    from app.engine.errors import NodeError
    from app.ml.adapters import AdapterConfig, AdapterError, create_adapter_set, load_adapter_file
    from app.ml.handle import as_handle

    handle = as_handle(model)
    bundle = handle.base
    same = text_encoder_2_layers == "same"
    te2_layers = text_encoder_layers if same else text_encoder_2_layers
    te2_custom = text_encoder_custom if same else text_encoder_2_custom
    try:
        if init_from:
            adapter = load_adapter_file(init_from, bundle, trainable=True)
            ctx.log(f"continuing from {init_from}")
            _warn_init_precision(ctx, init_from, adapter, bundle)
        else:
            config = AdapterConfig(
                algorithm=algorithm, rank=rank, alpha=alpha, conv_rank=conv_rank or None,
                conv_alpha=conv_alpha if conv_rank else None, dropout=dropout, rank_dropout=rank_dropout,
                module_dropout=module_dropout, factor=lokr_factor,
                targets={"unet": unet_layers, "text_encoder": text_encoder_layers,
                         "text_encoder_2": te2_layers},
                custom={"unet": _names(unet_custom), "text_encoder": _names(text_encoder_custom),
                        "text_encoder_2": _names(te2_custom)})
            adapter = create_adapter_set(bundle, config)
    except (AdapterError, FileNotFoundError) as e:
        raise NodeError(str(e)) from None
    summary = adapter.summary()
    ctx.log(f"{algorithm}: {summary['trainable_parameters']:,} trainable parameters in {len(adapter)} layers")
    ctx.preview("table", title="Adapter", rows=[[k, str(v)] for k, v in summary.items()])
    return handle.with_adapter(adapter)


def _warn_init_precision(ctx, path, adapter, bundle) -> None:
    """Continuing a QLoRA on another precision (or the other way round) is allowed, and said."""
    from pathlib import Path

    from safetensors import safe_open

    from app.ml.save.metadata import precision_mismatch

    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
    note = precision_mismatch(Path(path).name, metadata, adapter.components, bundle.precisions)
    if note:
        ctx.warn(note)


def _names(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.replace("\n", ",").split(",") if t.strip())


@node(type="Sample", category="sampling", side_effect=True,
      description="Generates images from a model; they are written to the workspace with the recipe in "
                  "their PNG text and shown as a preview.",
      inputs=[
          Socket("model", "MODEL"),
          String("prompt", "a photo", multiline=True, optional=False, tooltip="one prompt per line"),
          String("negative_prompt", "", multiline=True),
          Int("width", 512, min=64, max=4096, step=8),
          Int("height", 512, min=64, max=4096, step=8),
          Int("steps", 0, min=0, max=500, tooltip="0 = the model's default (30; Flux schnell 4)"),
          Float("cfg", 7.0, min=0.0, max=50.0, tooltip="classifier-free guidance scale (Flux dev: its distilled "
                                                         "guidance, about 3.5; schnell: not used)"),
          Int("seed", -1, min=-1, max=2**63 - 1, tooltip="-1 = random (the seed used is recorded)"),
          Enum("sampler", SAMPLERS, "dpmpp_2m"),
          Float("lora_strength", 1.0, min=-10.0, max=10.0),
          Float("true_cfg", 1.0, min=1.0, max=50.0,
                tooltip="Flux: real classifier-free guidance with the negative prompt (two passes a step, as "
                        "diffusers' true_cfg_scale); 1 = off, the negative prompt unused"),
      ],
      outputs=[Output("images", "IMAGES")])
def sample(ctx, model, prompt, negative_prompt, width, height, steps, cfg, seed, sampler, lora_strength, true_cfg=1.0):
    from app.engine.errors import NodeError
    from app.ml.handle import as_handle
    from app.ml.sampling import sample_images, save_samples

    from app.ml import dist

    prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not prompts:
        raise NodeError("the prompt is empty: write at least one line")
    if not dist.is_main():
        return {"paths": [], "params": []}  # data-parallel runs: the main process samples
    handle = as_handle(model)
    try:
        result = sample_images(handle.base, prompts, negative_prompt=negative_prompt, width=width, height=height,
                               steps=steps, cfg=cfg, seed=None if seed < 0 else seed, sampler=sampler,
                               adapters=handle.adapter_pairs(lora_strength),
                               progress=lambda i, n: ctx.progress(i, n, "sampling"), check_cancel=ctx.check_cancel,
                               options={"true_cfg": true_cfg} if true_cfg != 1.0 else None)
    except ValueError as e:
        raise NodeError(str(e)) from None
    notes = sorted({n for p in result.params for n in p.get("sampler_impl", "").split("; ")[1:]})
    for note in notes:  # e.g. Flux: the negative prompt is not used
        ctx.log(note)
    paths = save_samples(result, ctx.node_dir(), recipe=ctx.recipe)
    show_images(ctx, result)
    ctx.log(f"{len(paths)} image(s) in {paths[0].parent}")
    return {"paths": [str(p) for p in paths], "params": result.params}


def show_images(ctx, result) -> None:
    from app.ml.preview import images_payload

    captions = [f"{p['prompt']} (seed {p['seed']})" for p in result.params]
    ctx.preview("images", **images_payload(result.images, captions))


@node(type="Save", category="output", side_effect=True,
      description="Writes the adapter, the trained embedding(s) or the full model, atomically, with the recipe in "
                  "its metadata.",
      inputs=[
          Socket("model", "MODEL"),
          Path("path", "", kind="output_file",
               tooltip="where to write; relative paths go into the run's workspace (e.g. my_lora.safetensors)"),
          Enum("what", ["adapter", "full_model", "embedding"],
               tooltip="embedding: the Embedding node's trained embedding(s) as standalone files (SD 1.5: emb_params; "
                       "SDXL: clip_l and clip_g), what A1111/Forge, ComfyUI and diffusers load; they call it by the "
                       "file name"),
          Enum("layout", ["kohya", "peft", "comfyui", "single_file", "diffusers_folder"],
               tooltip="kohya: what A1111 and ComfyUI read; peft: diffusers load_lora_weights (Flux: diffusers' "
                       "kohya converter skips the full preset's embedder and final-layer modules, peft loads them); "
                       "full models: single_file or diffusers_folder; embeddings have one layout per family (not used)"),
          Enum("dtype", ["fp16", "bf16", "fp32"]),
          Enum("if_exists", ["add_suffix", "overwrite"], tooltip="never overwrite unless chosen"),
          String("title", "", tooltip="adapter: modelspec.title and ss_output_name (A1111's alias); empty: the file name"),
          String("author", "", tooltip="adapter: modelspec.author"),
          String("description", "", multiline=True, tooltip="adapter: modelspec.description"),
          String("trigger_phrase", "", tooltip="adapter: modelspec.trigger_phrase, the words that call the LoRA up"),
          Bool("bundle_embeddings", False,
               tooltip="adapter: put the trained embedding(s) into the LoRA file as bundle_emb.<token> (OneTrainer's "
                       "bundle embeddings; A1111/Forge and SD.Next read them, ComfyUI and diffusers do not)"),
      ],
      outputs=[])
def save(ctx, model, path, what, layout, dtype, if_exists, title="", author="", description="", trigger_phrase="",
         bundle_embeddings=False):
    from app.atomic import WriteError
    from app.engine.errors import NodeError
    from app.ml import dist
    from app.ml.handle import as_handle

    if not dist.is_main():
        return None
    handle = as_handle(model)
    overwrite = if_exists == "overwrite"
    info = handle.info
    try:
        if what == "adapter":
            if layout not in ("kohya", "peft", "comfyui"):
                raise NodeError(f"layout {layout!r} is for full models; an adapter saves as kohya, peft or comfyui")
            from nodes.embedding import lora_and_embeddings

            lora, embeddings = lora_and_embeddings(handle)
            if lora is None and embeddings:
                raise NodeError("the model carries embeddings but no LoRA: choose what = embedding")
            if lora is None:
                raise NodeError("the model has no adapter to save (connect it after LoRAInject / TrainLoop, or "
                                "choose what = full_model)")
            if embeddings and not bundle_embeddings:
                ctx.warn(f"the embedding(s) {', '.join(e.token for e in embeddings)} are not in this LoRA file: turn on "
                         "bundle_embeddings, or save them with another Save node, what = embedding")
            bundled = {"embeddings": embeddings} if embeddings and bundle_embeddings else {}
            from app.ml.save import save_adapter

            from app.ml.save.metadata import training_metadata

            from app.ml.lora_tools import model_name, user_metadata

            extra = {**training_metadata(info), **user_metadata(title=title, author=author, description=description,
                                                                 trigger_phrase=trigger_phrase)}
            written = save_adapter(lora, path, layout=layout, dtype=dtype, recipe=ctx.recipe,
                                   step=info.get("step"), epoch=info.get("epoch"), overwrite=overwrite,
                                   extra_metadata=extra, base_model_name=model_name(handle.base), **bundled)
        elif what == "embedding":
            from nodes.embedding import save_embedding_node

            written = save_embedding_node(ctx, handle, path, dtype, overwrite, title=title, author=author,
                                          description=description, trigger_phrase=trigger_phrase)
        else:
            from app.ml.save import save_diffusers, save_single_file

            if layout not in ("single_file", "diffusers_folder"):
                raise NodeError(f"layout {layout!r} is for adapters; a full model saves as single_file or "
                                "diffusers_folder")
            fn = save_single_file if layout == "single_file" else save_diffusers
            tokens = [a.token for a in handle.adapters if getattr(a, "is_embedding_set", False)]
            if tokens:  # a checkpoint has no place for them: its token table is the base model's
                ctx.warn(f"the embedding(s) {', '.join(tokens)} are not part of a full model file; save them with "
                         "another Save node, what = embedding")
            written = fn(handle.base, path, adapters=handle.adapter_pairs(1.0) or None, dtype=dtype,
                         recipe=ctx.recipe, overwrite=overwrite)
    except FileExistsError as e:
        raise NodeError(f"{e}; choose if_exists = overwrite or another path") from None
    except WriteError as e:  # names the file and the cause; no partial file is left
        raise NodeError(str(e)) from None
    except OSError as e:
        raise NodeError(f"cannot write {e.filename or path}: {e.strerror or e}") from None
    ctx.log(f"saved {written}")
    return None
