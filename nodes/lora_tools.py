"""LoRA tool nodes: load, apply and stack, resize, merge, extract, save in any layout, bake into a checkpoint.

A LORA socket carries an adapter read for one model (``app.ml.lora_tools.LoRA``): the family check,
layouts and saving are the adapters' own, the math is in ``app/ml/lora_tools``. Applying a LoRA
returns a new MODEL handle, so the base is only patched while a consumer (Sample, TrainLoop, Save)
runs, exactly as LoRAInject does.
"""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

METHODS = ["fixed", "sv_fro", "sv_ratio", "sv_cumulative"]
METHOD_TIP = ("fixed: every layer at rank; sv_fro: the fewest ranks keeping this Frobenius share (0-1); sv_ratio: "
              "singular values above the largest / target; sv_cumulative: the fewest whose sum share reaches target "
              "(kohya's resize_lora.py rules; rank caps them all)")


def _lora_file(params: dict) -> str:
    from app.ml.fingerprint import path_fingerprint

    return path_fingerprint(params.get("path") or "")


def _fail(message: str):
    from app.engine.errors import NodeError

    return NodeError(message)


def _show(ctx, lora, reports=None) -> None:
    rows = [[k, str(v)] for k, v in lora.summary().items()]
    ctx.preview("table", title="LoRA", rows=rows)
    if reports:
        worst = min(reports, key=lambda r: r.fro_share)
        mean = sum(r.fro_share for r in reports) / len(reports)
        ctx.log(f"{len(reports)} layers, ranks {min(r.rank for r in reports)}-{max(r.rank for r in reports)}; "
                f"Frobenius share kept: mean {mean:.4f}, lowest {worst.fro_share:.4f} ({worst.component}.{worst.name})")
        ctx.preview("table", title="Per layer: rank, Frobenius share kept", rows=[r.row() for r in reports])


@node(type="LoadLoRA", category="lora", fingerprint=_lora_file,
      description="Reads a LoRA/LyCORIS .safetensors file (kohya, diffusers/PEFT or ComfyUI layout; LoRA, LoCon, LoHa, "
                  "LoKr or DoRA) for a model, refusing one made for another base model, and shows its metadata: "
                  "rank, alpha, base model, trigger words and whether it carries its recipe.",
      inputs=[Socket("model", "MODEL", tooltip="the base model the LoRA is for (its family is checked)"),
              Path("path", "", kind="file", tooltip="a .safetensors LoRA file")],
      outputs=[Output("lora", "LORA")])
def load_lora(ctx, model, path):
    from app.ml.adapters import AdapterError
    from app.ml.handle import as_handle
    from app.ml.adapters import load_adapter_file
    from app.ml.lora_tools import LoRA, check_family, lora_file_info, model_name

    if not path:
        raise _fail("choose a LoRA .safetensors file in path")
    bundle = as_handle(model).base
    try:
        info = lora_file_info(path)
        check_family(info, bundle.family)
        aset = load_adapter_file(path, bundle, trainable=False)
    except AdapterError as e:
        raise _fail(str(e)) from None
    lora = LoRA(aset, info["metadata"], info["file"], {**info, "model_name": model_name(bundle)})
    _warn_precision(ctx, info, aset, bundle)
    ctx.log(f"{info['file']}: {info['algorithm']} rank {info['rank']} alpha {info['alpha']} for {info['base_model']} "
            f"({info['layout']} layout, {len(aset)} layers)" + (f"; trigger words: {info['trigger_words']}"
                                                              if info["trigger_words"] else ""))
    for note in bundle.family.lora_file_warnings(path, info["metadata"]):  # e.g. a Flux dev LoRA on schnell
        ctx.warn(note)
    _show(ctx, lora)
    return lora


def _warn_precision(ctx, info, aset, bundle) -> None:
    """A LoRA trained on a quantized base (QLoRA) applied to another precision, or the other way round: it works,
    but it learned against its base's rounding, so the user is told which file and which components differ."""
    from app.ml.save.metadata import precision_mismatch

    note = precision_mismatch(info["file"], info["metadata"], aset.components, bundle.precisions)
    if note:
        ctx.warn(note)


@node(type="ApplyLoRA", category="lora",
      description="Applies a LoRA to a model at a strength (denoiser and text encoders separately). Stackable; the "
                  "base model is never changed: the LoRA is patched in only while Sample, TrainLoop or Save runs.",
      inputs=[Socket("model", "MODEL"), Socket("lora", "LORA"),
              Float("strength", 1.0, min=-10.0, max=10.0, tooltip="strength on the UNet / denoiser"),
              Float("text_encoder_strength", 1.0, min=-10.0, max=10.0, tooltip="strength on the text encoder(s)")],
      outputs=[Output("model", "MODEL")])
def apply_lora(ctx, model, lora, strength, text_encoder_strength):
    from app.ml.handle import as_handle
    from app.ml.lora_tools import split_components

    handle = as_handle(model)
    if lora.adapters.family.id != handle.family.id and lora.adapters.family.config_dir != handle.family.config_dir:
        raise _fail(f"{lora.source} was loaded for {lora.adapters.family.display_name}; this model is "
                    f"{handle.family.display_name}: connect LoadLoRA to the same model")
    for part, s in split_components(lora.adapters, strength, text_encoder_strength):
        handle = handle.with_adapter(part, s)
    ctx.log(f"{lora.source} applied at {strength} (text encoders {text_encoder_strength})")
    return handle


@node(type="ResizeLoRA", category="lora",
      description="Shrinks a LoRA (any algorithm) to a lower rank by SVD, fixed or dynamic, and reports per layer the "
                  "share of the Frobenius norm it keeps; conv layers included. The result is a LoRA/LoCon.",
      inputs=[Socket("model", "MODEL", tooltip="the model the LoRA was loaded for"), Socket("lora", "LORA"),
              Int("rank", 16, min=1, max=1024, tooltip="the rank (dynamic methods: the largest rank)"),
              Enum("method", METHODS, "fixed", tooltip=METHOD_TIP),
              Float("target", 0.9, min=0.0, max=1000.0, tooltip="sv_fro / sv_cumulative: a share 0-1; sv_ratio: > 1"),
              Int("conv_rank", 0, min=0, max=1024, tooltip="rank for 3x3 conv layers; 0 = same as rank")],
      outputs=[Output("lora", "LORA")])
def resize_lora_node(ctx, model, lora, rank, method, target, conv_rank):
    from app.ml.adapters import AdapterError
    from app.ml.handle import as_handle
    from app.ml.lora_tools import LoRA, resize_lora

    try:
        out, reports = resize_lora(as_handle(model).base, lora.adapters, rank, method=method, target=target,
                                   conv_rank=conv_rank or None, progress=lambda i, n: ctx.progress(i, n, "SVD"))
    except AdapterError as e:
        raise _fail(f"{lora.source}: {e}") from None
    result = LoRA(out, lora.metadata, lora.source, dict(lora.info))
    _show(ctx, result, reports)
    return result


@node(type="MergeLoRAs", category="lora",
      description="Merges several LoRAs, each with a weight, into one: exact (ranks side by side, identical to applying "
                  "them all; LoRA/LoCon only) or compressed by SVD to a rank (any algorithm).",
      inputs=[Socket("model", "MODEL"), Socket("loras", "LORA", multi=True),
              String("weights", "", tooltip="one weight per LoRA in link order, e.g. 1.0, 0.5 (empty: all 1.0)"),
              Enum("mode", ["exact", "svd"], "exact"),
              Int("rank", 32, min=1, max=1024, tooltip="svd mode: the rank (dynamic methods: the largest)"),
              Enum("method", METHODS, "fixed", tooltip=METHOD_TIP),
              Float("target", 0.9, min=0.0, max=1000.0)],
      outputs=[Output("lora", "LORA")])
def merge_loras_node(ctx, model, loras, weights, mode, rank, method, target):
    from app.ml.adapters import AdapterError
    from app.ml.handle import as_handle
    from app.ml.lora_tools import LoRA, merge_loras

    loras = list(loras)
    try:
        ws = [float(w) for w in weights.replace(";", ",").split(",") if w.strip()] if weights.strip() else []
    except ValueError:
        raise _fail(f"weights must be numbers separated by commas, got {weights!r}") from None
    if ws and len(ws) != len(loras):
        raise _fail(f"{len(ws)} weights for {len(loras)} LoRAs: give one per linked LoRA, in link order")
    ws = ws or [1.0] * len(loras)
    try:
        out, reports = merge_loras(as_handle(model).base, [(l.adapters, w) for l, w in zip(loras, ws)], mode=mode,
                                   rank=rank, method=method, target=target,
                                   progress=lambda i, n: ctx.progress(i, n, "SVD"))
    except AdapterError as e:
        raise _fail(str(e)) from None
    sources = " + ".join(f"{w:g} x {l.source}" for l, w in zip(loras, ws))
    meta = dict(loras[0].metadata) if loras else {}
    result = LoRA(out, meta, f"merge of {sources}", {"merged_from": sources})
    ctx.log(f"merged {sources} ({mode})")
    _show(ctx, result, reports if mode == "svd" else None)
    return result


@node(type="ExtractLoRA", category="lora",
      description="Extracts a LoRA from a fine-tuned model and its base by truncated SVD of their difference, per layer "
                  "(linear and conv, UNet and text encoders); layers that barely changed are left out.",
      inputs=[Socket("tuned", "MODEL", tooltip="the fine-tuned model"),
              Socket("base", "MODEL", tooltip="the model it was fine-tuned from"),
              Int("rank", 32, min=1, max=1024), Int("conv_rank", 0, min=0, max=1024, tooltip="0 = same as rank"),
              Enum("method", METHODS, "fixed", tooltip=METHOD_TIP), Float("target", 0.9, min=0.0, max=1000.0),
              Float("min_diff", 1e-6, min=0.0, max=1.0,
                    tooltip="a layer whose largest weight change is at most this is left out"),
              Bool("text_encoders", True, tooltip="extract from the text encoder(s) too")],
      outputs=[Output("lora", "LORA")])
def extract_lora_node(ctx, tuned, base, rank, conv_rank, method, target, min_diff, text_encoders):
    from app.ml.adapters import AdapterError, component_modules
    from app.ml.handle import as_handle
    from app.ml.lora_tools import LoRA, extract_lora, model_name

    t, b = as_handle(tuned), as_handle(base)
    if t.adapters or b.adapters:
        ctx.log("adapters on the inputs are ignored: extraction reads the models' own weights "
                "(bake them with MergeToModel first)")
    comps = [c for c in component_modules(b.base) if text_encoders or not c.startswith("text_encoder")]
    try:
        out, reports = extract_lora(t.base, b.base, rank, method=method, target=target, conv_rank=conv_rank or None,
                                    min_diff=min_diff, components=comps,
                                    progress=lambda i, n: ctx.progress(i, n, "SVD"))
    except AdapterError as e:
        raise _fail(str(e)) from None
    result = LoRA(out, {}, "extracted", {"model_name": model_name(b.base)})
    _show(ctx, result, reports)
    return result


@node(type="SaveLoRA", category="lora", side_effect=True,
      description="Writes a LORA in any layout that can express it (converting between kohya, diffusers/PEFT and "
                  "ComfyUI), keeping the source file's metadata and adding the recipe.",
      inputs=[Socket("lora", "LORA"),
              Path("path", "", kind="output_file", tooltip="e.g. my_lora.safetensors (relative: into the workspace)"),
              Enum("layout", ["kohya", "peft", "comfyui"],
                   tooltip="kohya: A1111, Forge, ComfyUI and diffusers; peft: diffusers only (plain LoRA); comfyui: "
                           "ComfyUI's own names"),
              Enum("dtype", ["fp16", "bf16", "fp32"]),
              Enum("if_exists", ["add_suffix", "overwrite"]),
              String("title", "", tooltip="modelspec.title and ss_output_name (A1111's alias); empty: the file name"),
              String("author", "", tooltip="modelspec.author"),
              String("description", "", multiline=True, tooltip="modelspec.description"),
              String("trigger_phrase", "", tooltip="modelspec.trigger_phrase: the words that call the LoRA up")],
      outputs=[])
def save_lora(ctx, lora, path, layout, dtype, if_exists, title="", author="", description="", trigger_phrase=""):
    from app.atomic import WriteError
    from app.ml.adapters import AdapterError
    from app.ml.lora_tools import carried_metadata, user_metadata
    from app.ml.save import save_adapter

    if not path:
        raise _fail("choose where to write the LoRA (path)")
    extra = carried_metadata(lora.metadata)
    extra.update(user_metadata(title=title, author=author, description=description, trigger_phrase=trigger_phrase))
    try:
        written = save_adapter(lora.adapters, path, layout=layout, dtype=dtype, recipe=ctx.recipe,
                               overwrite=if_exists == "overwrite", extra_metadata=extra,
                               base_model_name=lora.metadata.get("ss_sd_model_name") or lora.info.get("model_name", ""))
    except (AdapterError, ValueError) as e:
        raise _fail(f"{lora.source}: {e}") from None
    except FileExistsError as e:
        raise _fail(f"{e}; choose if_exists = overwrite or another path") from None
    except WriteError as e:
        raise _fail(str(e)) from None
    ctx.log(f"saved {written}")
    return None


@node(type="MergeToModel", category="lora", side_effect=True,
      description="Bakes the LoRAs applied to a model into its weights and saves a full checkpoint: one file in the "
                  "original (A1111/Civitai) layout or a diffusers folder, in a chosen dtype.",
      inputs=[Socket("model", "MODEL", tooltip="a model with LoRAs applied (ApplyLoRA, LoRAInject, TrainLoop)"),
              Path("path", "", kind="output_file", tooltip="a .safetensors file or a folder name"),
              Enum("format", ["single_file", "diffusers_folder"]),
              Enum("dtype", ["fp16", "bf16", "fp32"]),
              Enum("if_exists", ["add_suffix", "overwrite"])],
      outputs=[])
def merge_to_model(ctx, model, path, format, dtype, if_exists):
    from app.atomic import WriteError
    from app.ml.handle import as_handle
    from app.ml.save import save_diffusers, save_single_file

    handle = as_handle(model)
    if not path:
        raise _fail("choose where to write the merged model (path)")
    if not handle.adapters:
        ctx.log("no LoRA is applied to this model: the checkpoint is the base model")
    fn = save_single_file if format == "single_file" else save_diffusers
    try:
        written = fn(handle.base, path, adapters=handle.adapter_pairs(1.0) or None, dtype=dtype, recipe=ctx.recipe,
                     overwrite=if_exists == "overwrite")
    except FileExistsError as e:
        raise _fail(f"{e}; choose if_exists = overwrite or another path") from None
    except WriteError as e:
        raise _fail(str(e)) from None
    except OSError as e:
        raise _fail(f"cannot write {e.filename or path}: {e.strerror or e}") from None
    ctx.log(f"saved {written} with {len(handle.adapters)} adapter(s) merged")
    return None


@node(type="Grid", category="lora", side_effect=True,
      description="A comparison image like A1111's X/Y plot: one row per LoRA file (e.g. the periodic saves of a run), "
                  "one column per strength and prompt, the same seed in every cell; one PNG with the recipe embedded, "
                  "shown as a preview. The fastest way to pick the best save.",
      inputs=[Socket("model", "MODEL", tooltip="the base model (LoRAs already applied to it stay applied)"),
              String("loras", "", multiline=True,
                     tooltip="one .safetensors file or folder per line; a folder gives its .safetensors in name order"),
              String("strengths", "0.5, 1.0", tooltip="columns: LoRA strengths, separated by commas"),
              String("prompt", "a photo", multiline=True, tooltip="one prompt per line; each adds a set of columns"),
              String("negative_prompt", "", multiline=True),
              Int("width", 512, min=64, max=4096, step=8), Int("height", 512, min=64, max=4096, step=8),
              Int("steps", 20, min=1, max=500), Float("cfg", 7.0, min=0.0, max=50.0),
              Int("seed", 1, min=0, max=2**63 - 1, tooltip="the same seed in every cell"),
              Enum("sampler", ["ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_sde_karras", "unipc"],
                   "dpmpp_2m"),
              Path("path", "grid.png", kind="output_file", tooltip="the grid PNG (relative: into the workspace)"),
              Enum("if_exists", ["add_suffix", "overwrite"])],
      outputs=[Output("images", "IMAGES")])
def grid(ctx, model, loras, strengths, prompt, negative_prompt, width, height, steps, cfg, seed, sampler, path,
         if_exists):
    from app.ml.adapters import AdapterError, load_adapter_file
    from app.ml.handle import as_handle
    from app.ml.lora_tools import check_family, lora_file_info
    from app.ml.lora_tools.grid import compose, lora_files
    from app.ml.preview import images_payload
    from app.ml.sampling import sample_images
    from app.ml.sampling.png import save_png

    handle = as_handle(model)
    entries = [line.strip() for line in loras.splitlines() if line.strip()]
    prompts = [line.strip() for line in prompt.splitlines() if line.strip()]
    if not entries:
        raise _fail("list at least one LoRA file or folder in loras, one per line")
    if not prompts:
        raise _fail("the prompt is empty: write at least one line")
    try:
        values = [float(s) for s in strengths.replace(";", ",").split(",") if s.strip()]
    except ValueError:
        raise _fail(f"strengths must be numbers separated by commas, got {strengths!r}") from None
    if not values:
        raise _fail("give at least one strength, e.g. 0.5, 1.0")
    try:
        files = lora_files(entries)
    except FileNotFoundError as e:
        raise _fail(str(e)) from None
    columns = [(s, p) for p in prompts for s in values]
    total, done = len(files) * len(columns), 0
    rows, cells_meta = [], []
    for f in files:
        try:
            check_family(lora_file_info(f), handle.family)
            aset = load_adapter_file(f, handle.base, trainable=False)
        except AdapterError as e:
            raise _fail(str(e)) from None
        row = []
        for s, p in columns:
            ctx.check_cancel()
            try:
                result = sample_images(handle.base, [p], negative_prompt=negative_prompt, width=width, height=height,
                                       steps=steps, cfg=cfg, seed=seed, sampler=sampler,
                                       adapters=handle.adapter_pairs() + [(aset, s)])
            except ValueError as e:
                raise _fail(str(e)) from None
            row.append(result.images[0])
            cells_meta.append({"lora": f.name, "strength": s, "prompt": p})
            done += 1
            ctx.progress(done, total, f"{f.name} at {s}")
        rows.append(row)
    col_labels = [f"strength {s:g}" + (f" | {p}" if len(prompts) > 1 else "") for s, p in columns]
    image = compose(rows, [f.stem for f in files], col_labels)
    params = {"prompt": prompts[0], "negative_prompt": negative_prompt, "steps": steps, "sampler": sampler, "cfg": cfg,
              "seed": seed, "width": width, "height": height, "grid": cells_meta}
    try:
        written = save_png(image, path, params, ctx.recipe, overwrite=if_exists == "overwrite")
    except FileExistsError as e:
        raise _fail(f"{e}; choose if_exists = overwrite or another path") from None
    ctx.preview("images", **images_payload([image], [f"{len(files)} LoRA(s) x {len(columns)} column(s)"], max_side=1024))
    ctx.log(f"grid of {len(files)} x {len(columns)} in {written}")
    return {"paths": [str(written)], "params": [params]}
