"""Dataset nodes: folders of images and captions become training batches.

Concept scans one folder (every problem reported by file name), Augment sets per-concept image
augmentation without rescanning, Bucketer groups the concepts into aspect buckets and batches
(and shows epoch 1's plan before anything trains), Cache encodes latents and captions once, keyed
by content. The library behind them is app/ml/data; these functions translate params, turn data
errors into messages that name the file, and report what the user should see.

Heavy imports (numpy, PIL, torch, app.ml.data) happen inside the functions so that listing and
validating recipes never loads them.
"""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node
from app.ml.data.resolution import optional_resolution_problem, resolution_problem

THUMB_SIDE = 96
THUMBS = 8
TABLE_ROWS = 100
WARN_LIMIT = 20  # per-image warnings sent as separate log lines; the rest are summarised
ASPECT_SETS = {
    "full": (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0),
    "moderate": (1.0, 1.25, 1.5, 1.75, 2.0),
    "square": (1.0,),
}
DEFAULT_QUANTIZATION = 8  # SD1.x/2.x, when no model is connected
DEFAULT_TRAIN_SEED = 42  # TrainLoop's default seed, used when the recipe has no TrainLoop


# ---- shared helpers ---------------------------------------------------------------------------

def _node_error(exc):
    from app.engine.errors import NodeError

    return NodeError(str(exc))


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _thumbnail(path, side: int = THUMB_SIDE) -> bytes | None:
    """A small PNG of an image file, or None if it cannot be opened (it is reported elsewhere)."""
    from app.ml.data.errors import DataError
    from app.ml.data.images import open_image_rgb

    try:
        img = open_image_rgb(path, draft_size=(side, side))
    except DataError:
        return None
    img.thumbnail((side, side))
    return _png(img)


def _array_to_image(arr):
    """float32 CHW in [-1, 1] (what load_item gives) -> PIL RGB."""
    import numpy as np
    from PIL import Image

    u8 = np.clip((arr.transpose(1, 2, 0) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(u8, "RGB")


def _spread(n: int, k: int) -> list[int]:
    """k indices spread evenly over range(n) (all of them when n <= k)."""
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)}) if k > 1 else [0]


def _names(paths, limit: int = 12) -> str:
    from pathlib import Path as P

    names = [P(p).name for p in paths]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _problem_text(p) -> str:
    """A Problem as a log line: 'skipped: concept 'x', path: reason' for unusable files."""
    text = str(p).split(": ", 1)[1] if ": " in str(p) else str(p)
    return f"skipped: {text}" if p.severity == "error" else text


def _train_seed(ctx, explicit: int) -> tuple[int, str]:
    """The seed the training loop will plan with: explicit, or that of the TrainLoop(s) this node
    feeds in the recipe. Crop jitter and augmentation draws (and so latent cache keys) depend on it."""
    if explicit >= 0:
        return explicit, "set on this node"
    recipe = ctx.recipe or {}
    nodes = recipe.get("nodes") or {}
    links = recipe.get("links") or []
    default = DEFAULT_TRAIN_SEED
    try:
        from nodes.training import train_loop

        default = train_loop.__node_spec__.input("seed").default
    except Exception:  # the training module is someone else's: fall back to the known default
        pass
    seen, todo, seeds = {ctx.node_id}, [ctx.node_id], set()
    while todo:
        nid = todo.pop()
        for link in links:
            if link.get("from_node") == nid and link.get("to_node") not in seen:
                nxt = link["to_node"]
                seen.add(nxt)
                todo.append(nxt)
                entry = nodes.get(nxt) or {}
                if entry.get("type") == "TrainLoop":
                    seeds.add(int((entry.get("params") or {}).get("seed", default)))
    if len(seeds) == 1:
        return seeds.pop(), "the TrainLoop's seed"
    if len(seeds) > 1:
        seed = min(seeds)
        ctx.warn(f"this node feeds TrainLoops with different seeds {sorted(seeds)}; using {seed} "
                 "(set seed on this node to choose)")
        return seed, "the lowest TrainLoop seed"
    return default, "TrainLoop's default seed (no TrainLoop downstream)"


# ---- Concept ----------------------------------------------------------------------------------

def _concept_files(params: dict) -> str:
    """Sizes and mtimes of the folder (and an outside caption file): editing an image re-runs Concept."""
    from app.ml.fingerprint import path_fingerprint

    parts = [path_fingerprint(params.get("folder") or "")]
    cfile = params.get("caption_file") or ""
    if cfile and params.get("prompt_source") == "concept_file":
        import os

        folder = params.get("folder") or ""
        parts.append(path_fingerprint(cfile if os.path.isabs(cfile) else os.path.join(folder, cfile)))
    return "|".join(parts)


def _default_concept_name(folder: str) -> str:
    from pathlib import Path as P

    from app.ml.data.images import parse_kohya_folder

    base = P(folder).name or "concept"
    kohya = parse_kohya_folder(base)
    return kohya[1] if kohya else base


@node(type="Concept", category="dataset", fingerprint=_concept_files,
      description="A folder of training images with captions (and optional masks); kohya-style "
                  "'N_name' subfolders give N repeats.",
      inputs=[
          Path("folder", kind="folder", tooltip="the folder of images (png, jpg, webp, bmp); subfolders are included"),
          String("name", tooltip="concept name (default: the folder's name); used as the caption when one is "
                                 "missing and that is chosen below"),
          Enum("prompt_source", ["per_image", "concept_file", "filename"],
               tooltip="per_image: <stem>.txt beside each image (one random line per epoch); concept_file: one "
                       "text file for all; filename: 'sunset_beach.png' gives 'sunset beach'"),
          Path("caption_file", kind="file", optional=True, tooltip="the text file used when prompt_source is concept_file"),
          Enum("missing_caption", ["concept_name", "empty", "error"],
               tooltip="what an image without a caption gets; the preview lists them either way"),
          Enum("balancing", ["repeats", "samples"], tooltip="repeat each image, or draw a fixed number per epoch"),
          Float("repeats", 1.0, min=0.0, max=10000.0, tooltip="times each image is seen per epoch (fractions allowed)"),
          Int("samples_per_epoch", 100, min=1, max=10_000_000, tooltip="images drawn per epoch when balancing by samples"),
          Float("loss_weight", 1.0, min=0.0, max=100.0, tooltip="scales this concept's loss (e.g. 0.5 for prior images)"),
          Enum("concept_type", ["standard", "validation", "prior"],
               tooltip="validation: used only for validation loss; prior: regularisation images"),
          Int("keep_tags", 0, min=0, max=1000, tooltip="leading tags never shuffled or dropped"),
          Bool("shuffle_tags", False, tooltip="shuffle tags after the kept ones, every epoch"),
          Float("tag_dropout", 0.0, min=0.0, max=1.0, tooltip="probability of dropping each tag"),
          Float("caption_dropout", 0.0, min=0.0, max=1.0, tooltip="probability of training with an empty caption"),
          String("delimiter", ",", tooltip="separates tags in a caption"),
          Enum("on_bad_image", ["skip", "error"],
               tooltip="skip corrupt or unreadable images (they are listed), or stop before training"),
          Enum("verify", ["full", "header"], advanced=True,
               tooltip="full: decode every image while scanning (catches truncated files); header: faster "
                       "for huge folders, a broken file then fails when it is loaded"),
          Bool("recursive", True, advanced=True, tooltip="include images in subfolders"),
      ],
      outputs=[Output("dataset", "DATASET")])
def concept(ctx, folder, name, prompt_source, caption_file, missing_caption, balancing, repeats,
            samples_per_epoch, loss_weight, concept_type, keep_tags, shuffle_tags, tag_dropout,
            caption_dropout, delimiter, on_bad_image, verify="full", recursive=True):
    from app.ml.data.captions import TextAugment
    from app.ml.data.concept import ConceptSettings, combine, iterations_per_epoch, scan_concept
    from app.ml.data.errors import DataError

    name = (name or "").strip() or _default_concept_name(folder)
    try:
        settings = ConceptSettings(
            name=name, folder=folder, prompt_source=prompt_source, caption_file=caption_file or None,
            missing_caption=missing_caption, repeats=float(repeats),
            samples_per_epoch=int(samples_per_epoch) if balancing == "samples" else None,
            balancing=balancing, loss_weight=float(loss_weight), concept_type=concept_type,
            text_augment=TextAugment(shuffle_tags=bool(shuffle_tags), keep_tags=int(keep_tags),
                                     tag_dropout=float(tag_dropout), caption_dropout=float(caption_dropout),
                                     delimiter=delimiter or ","),
            on_bad_image=on_bad_image, recursive=bool(recursive), verify=verify)
    except ValueError as exc:
        raise _node_error(exc) from None

    try:
        c = scan_concept(settings, 0, progress=lambda i, n: ctx.progress(i, n, "scanning"),
                         check_cancel=ctx.check_cancel)
        dataset = combine([c])
    except DataError as exc:
        raise _node_error(exc) from None

    rep = c.report
    samples = c.samples
    fallback = sorted({s.caption_lines[0] for s in samples if s.caption_source == "concept_name"})
    n_fallback = sum(1 for s in samples if s.caption_source == "concept_name")
    n_empty = sum(1 for s in samples if s.caption_source == "empty")
    iters = iterations_per_epoch(dataset, 1) if concept_type != "validation" else 0

    # --- what the user reads: log lines, a table, a text with every problem by name
    if prompt_source == "per_image":
        captions = f"{rep.captions_found} found, {rep.captions_missing} missing"
        if n_fallback:
            captions += (f" — the {n_fallback} without a caption train with the concept name "
                         + ", ".join(repr(f) for f in fallback) + " (set missing_caption to change this)")
        elif n_empty:
            captions += f" — the {n_empty} without a caption train with an empty caption"
    elif prompt_source == "concept_file":
        captions = f"from {caption_file} for every image"
    else:
        captions = "from the file names"
    skipped = rep.skipped
    warnings = rep.warnings
    lines = [
        f"concept '{name}' ({folder}): {rep.images} of {rep.files} images usable",
        f"captions: {captions}",
        f"masks: {rep.masks_found} found" + (f", {rep.masks_missing} images without a mask train unmasked"
                                             if rep.masks_found and rep.masks_missing else ""),
    ]
    if concept_type == "validation":
        lines.append("validation concept: used only for the validation loss, never trained on")
    else:
        how = (f"{samples_per_epoch} samples per epoch" if balancing == "samples"
               else f"repeats {float(repeats):g}" + (" x the N_ of kohya folders"
                                                     if any(s.repeats != float(repeats) for s in samples) else ""))
        lines.append(f"iterations per epoch at batch size 1: {iters} ({how})")
    if skipped:
        lines.append(f"skipped {len(skipped)} unusable files: {_names([p.path for p in skipped], 50)}")
    for line in lines:
        ctx.log(line)
    entry_warnings = rep.entry_warnings()  # loops, broken links, orphan captions: one line per kind
    for w in entry_warnings:
        ctx.warn(w)
    for p in skipped[:WARN_LIMIT] + warnings[:WARN_LIMIT]:
        ctx.warn(_problem_text(p))
    extra = max(0, len(skipped) - WARN_LIMIT) + max(0, len(warnings) - WARN_LIMIT)
    if extra:
        ctx.warn(f"{extra} more problems in concept '{name}' (see the preview)")

    rows = [
        ["images usable", f"{rep.images} of {rep.files}"],
        ["captions", captions],
        ["masks found", rep.masks_found],
        ["skipped files", f"{len(skipped)}" + (f": {_names([p.path for p in skipped])}" if skipped else "")],
        ["caption warnings", f"{len(warnings)}" + (f": {_names([p.path for p in warnings])}" if warnings else "")],
        ["iterations / epoch (batch 1)", iters],
    ]
    ctx.preview("table", title=f"concept '{name}'", columns=["", "value"], rows=rows)
    detail = lines + entry_warnings + [f"  {_problem_text(p)}" for p in (skipped + warnings)[:200]]
    if len(skipped) + len(warnings) > 200:
        detail.append(f"  ... and {len(skipped) + len(warnings) - 200} more")
    ctx.preview("text", text="\n".join(detail))

    images, caps = [], []
    for i in _spread(len(samples), THUMBS):
        s = samples[i]
        png = _thumbnail(s.path)
        if png is None:
            continue
        cap = s.caption_lines[0] if s.caption_lines else ""
        if s.caption_source == "concept_name":
            cap = f"{cap} (no caption: concept name)"
        elif s.caption_source == "empty":
            cap = "(no caption: empty)"
        images.append(png)
        caps.append(f"{s.rel}: {cap}")
    ctx.preview("images", images=images, captions=caps)
    ctx.progress(1, 1)
    return dataset


# ---- Augment ----------------------------------------------------------------------------------

FLIP = {"random": "random", "off": "off", "always": "fixed"}


def augment_settings_from(params: dict):
    """The node's params as AugmentSettings (one mode for every strength)."""
    from app.ml.data.augment import AugmentSettings

    mode = params.get("mode", "random")
    return AugmentSettings(
        flip=FLIP[params.get("flip", "random")], rotation=float(params.get("rotation", 0.0)), rotation_mode=mode,
        crop_jitter=bool(params.get("crop_jitter", True)),
        brightness=float(params.get("brightness", 0.0)), brightness_mode=mode,
        contrast=float(params.get("contrast", 0.0)), contrast_mode=mode,
        saturation=float(params.get("saturation", 0.0)), saturation_mode=mode,
        hue=float(params.get("hue", 0.0)), hue_mode=mode)


def _describe_draw(p) -> str:
    parts = []
    if p.flip:
        parts.append("flip")
    if p.angle:
        parts.append(f"rot {p.angle:+.1f}°")
    for label, v in (("bright", p.brightness), ("contrast", p.contrast), ("sat", p.saturation)):
        if v != 1.0:
            parts.append(f"{label} x{v:.2f}")
    if p.hue:
        parts.append(f"hue {p.hue:+.3f}")
    return ", ".join(parts) or "unchanged"


@node(type="Augment", category="dataset",
      description="Random image augmentation, redrawn every epoch from (seed, epoch, image). Applies to every "
                  "concept of the dataset; the preview shows a few draws per image.",
      inputs=[
          Socket("dataset", "DATASET"),
          Enum("flip", ["random", "off", "always"], tooltip="horizontal flip"),
          Float("rotation", 0.0, min=0.0, max=180.0, tooltip="maximum rotation in degrees"),
          Bool("crop_jitter", True, tooltip="random crop offset instead of a centred crop"),
          Float("brightness", 0.0, min=0.0, max=1.0, tooltip="maximum brightness change"),
          Float("contrast", 0.0, min=0.0, max=1.0, tooltip="maximum contrast change"),
          Float("saturation", 0.0, min=0.0, max=1.0, tooltip="maximum saturation change"),
          Float("hue", 0.0, min=0.0, max=0.5, tooltip="maximum hue shift (fraction of the colour wheel)"),
          Enum("mode", ["random", "fixed"], tooltip="random: a new draw up to the maximum; fixed: always the maximum"),
          String("resolution", "", tooltip="override the bucketing resolution for this dataset (e.g. 768)",
                 check=optional_resolution_problem),
          Int("seed", -1, min=-1, max=2**31 - 1,
              tooltip="seed of the preview draws; -1 = the TrainLoop's seed, so the preview shows exactly what "
                      "epochs 1..N train on. Training draws are a pure function of (TrainLoop seed, epoch, image)"),
          Int("preview_images", 3, min=0, max=16, tooltip="images shown in the preview (0 = no preview)"),
          Int("preview_draws", 4, min=1, max=16, tooltip="augmented draws (epochs 1..N) shown per image"),
          Int("preview_resolution", 256, min=64, max=1024, advanced=True,
              tooltip="bucket resolution of the preview when no resolution is set here"),
      ],
      outputs=[Output("dataset", "DATASET")])
def augment(ctx, dataset, flip, rotation, crop_jitter, brightness, contrast, saturation, hue, mode,
            resolution, seed, preview_images=3, preview_draws=4, preview_resolution=256):
    from dataclasses import replace

    from app.ml.data.bucketing import parse_resolution
    from app.ml.data.concept import Dataset

    try:
        settings = augment_settings_from(dict(flip=flip, rotation=rotation, crop_jitter=crop_jitter,
                                              brightness=brightness, contrast=contrast, saturation=saturation,
                                              hue=hue, mode=mode))
        res = (resolution or "").strip() or None
        if res is not None:
            parse_resolution(res)
    except ValueError as exc:
        raise _node_error(exc) from None
    concepts = tuple(
        replace(c, settings=replace(c.settings, augment=settings,
                                    resolution=res if res is not None else c.settings.resolution))
        for c in dataset.concepts)
    out = Dataset(concepts)
    ctx.log(f"augmentation for {len(concepts)} concept(s): flip {flip}, rotation {rotation:g}°, crop jitter "
            f"{'on' if crop_jitter else 'off'}, brightness {brightness:g}, contrast {contrast:g}, saturation "
            f"{saturation:g}, hue {hue:g} ({mode})" + (f"; resolution {res}" if res else ""))
    if preview_images > 0:
        _augment_preview(ctx, out, seed, preview_images, preview_draws, res or str(preview_resolution))
    ctx.progress(1, 1)
    return out


def _augment_preview(ctx, dataset, seed, n_images, n_draws, resolution):
    """For a few images: the centre crop without augmentation, then the draws of epochs 1..N,
    produced by the same planning and loading code as training (first occurrence of the image)."""
    from app.ml.data.augment import NO_AUGMENT, draw_params
    from app.ml.data.batches import PlannedItem, load_item
    from app.ml.data.bucketing import BucketSettings, assign_bucket, cover_size, crop_box, parse_resolution
    from app.ml.data.errors import DataError
    from app.ml.data.rng import rng_for

    seed, _ = _train_seed(ctx, seed)
    pool = [(c, s) for c in dataset.training_concepts or dataset.concepts for s in c.samples]
    if not pool:
        return
    images, caps = [], []
    picks = [pool[i] for i in _spread(len(pool), n_images)]
    for k, (c, smp) in enumerate(picks):
        res = parse_resolution(c.settings.resolution or resolution)
        target = None if res.fixed else res.targets[0]
        bucket = assign_bucket(smp.size, res, target, BucketSettings(resolution=resolution, quantization=8))
        resize = cover_size(smp.size, bucket)
        aug = c.settings.augment
        for d in [None] + list(range(n_draws)):
            ctx.progress(k * (n_draws + 1) + (d or 0), len(picks) * (n_draws + 1), "preview")
            epoch = 0 if d is None else d
            pixel_index = (smp.key, 0)
            jitter = rng_for(seed, epoch, pixel_index, "crop") if (d is not None and aug.crop_jitter) else None
            params = draw_params(aug if d is not None else NO_AUGMENT, seed, epoch, pixel_index)
            item = PlannedItem(concept_index=c.index, sample_index=0, path=smp.path, bucket=bucket, resize=resize,
                               crop=crop_box(resize, bucket, jitter), caption="", loss_weight=1.0, mask_path=None,
                               concept_type=c.settings.concept_type, concept_name=c.name, seed=seed, epoch=epoch,
                               variation=None, pixel_index=pixel_index,
                               augment=aug if d is not None else NO_AUGMENT, augment_params=params)
            try:
                img = _array_to_image(load_item(item, resample="bilinear").image)
            except DataError as exc:
                ctx.warn(f"preview: {exc}")
                break
            img.thumbnail((160, 160))
            images.append(_png(img))
            caps.append(f"{smp.path.name}: original (centre crop)" if d is None
                        else f"{smp.path.name}: epoch {d + 1}: {_describe_draw(params)}")
    ctx.preview("images", images=images, captions=caps, columns=n_draws + 1,
                title=f"augmentation draws (seed {seed})")


# ---- Bucketer ---------------------------------------------------------------------------------

def _bucketer_v1_to_v2(params: dict) -> dict:
    """v1 took one integer resolution and a bucketing flag; v2 takes a resolution string (a list
    for multi-resolution, or WxH) and a bucketing mode."""
    if "resolution" in params and isinstance(params["resolution"], int) and not isinstance(params["resolution"], bool):
        params["resolution"] = str(params["resolution"])
    if "enable_bucketing" in params:
        params["bucketing"] = "on" if params.pop("enable_bucketing") else "off"
    return params


def combine_datasets(datasets):
    """One dataset from several DATASET links; every concept keeps its own settings."""
    from app.ml.data.concept import combine
    from app.ml.data.errors import DataError

    concepts = [c for d in datasets if d is not None for c in d.concepts]
    if not concepts:
        from app.engine.errors import NodeError

        raise NodeError("no dataset is connected; link a Concept (or Augment) node to 'datasets'")
    try:
        return combine(concepts)
    except DataError as exc:
        from app.engine.errors import NodeError

        raise NodeError(f"{exc}: give the Concept nodes different names") from None


def _fmt(size) -> str:
    return "%dx%d" % tuple(size)


@node(type="Bucketer", version=2, category="dataset",
      description="Groups images into aspect-ratio buckets at equal pixel count and forms batches within a "
                  "bucket. Leftovers are reported by name, never dropped silently.",
      migrations={1: _bucketer_v1_to_v2},
      inputs=[
          Socket("datasets", "DATASET", multi=True, tooltip="one or more datasets; each keeps its own settings"),
          Socket("model", "MODEL", optional=True, tooltip="used only to pick the quantization of its family"),
          String("resolution", "512", optional=False, check=resolution_problem,
                 tooltip="target resolution: '512', a list '512,768,1024' (multi-resolution) or a fixed 'WxH'"),
          Enum("bucketing", ["on", "off"], tooltip="off: square centre crops at the resolution"),
          Enum("aspects", ["full", "moderate", "square"],
               tooltip="full: 1:1 to 1:4 and transposes; moderate: up to 1:2; square: 1:1 only"),
          Int("quantization", 0, min=0, max=256, tooltip="round sizes to this; 0 = from the model family "
                                                         "(8 for SD1.x/2.x, 64 for SDXL/Flux)"),
          Bool("no_upscale", False, tooltip="never upscale: small images get a smaller bucket"),
          Int("batch_size", 1, min=1, max=1024, tooltip="images per batch (all from one bucket)"),
          Enum("leftovers", ["drop", "repeat", "keep"],
               tooltip="images that cannot fill a batch: drop them this epoch (listed by name), fill the batch by "
                       "repeating others of the bucket (listed), or keep a smaller last batch"),
      ],
      outputs=[Output("buckets", "BUCKETS")])
def bucketer(ctx, datasets, model, resolution, bucketing, aspects, quantization, no_upscale, batch_size, leftovers):
    from dataclasses import replace

    from app.engine.errors import NodeError
    from app.ml.data.batches import plan_epoch
    from app.ml.data.bucketing import BucketSettings
    from app.ml.data.concept import epoch_samples
    from app.ml.data.errors import DataError
    from app.ml.data.pipeline import Buckets

    dataset = combine_datasets(datasets)
    if quantization:
        q, q_from = int(quantization), "set on this node"
    elif model is not None and getattr(getattr(model, "family", None), "bucket_quantization", None):
        q, q_from = int(model.family.bucket_quantization), f"the {model.family.id} model family"
    else:
        q, q_from = DEFAULT_QUANTIZATION, "the default (no model connected)"
        ctx.warn("no model connected and quantization 0: bucket sizes are rounded to 8 (SD1.x/2.x); connect the "
                 "model or set quantization to 64 for SDXL/Flux")
    try:
        settings = BucketSettings(resolution=str(resolution).strip(), quantization=q, mode=bucketing,
                                  no_upscale=bool(no_upscale), aspects=ASPECT_SETS[aspects])
    except ValueError as exc:
        raise NodeError(str(exc)) from None

    seed, seed_from = _train_seed(ctx, -1)
    try:
        plan = plan_epoch(dataset, settings, int(batch_size), seed, 0, leftovers, check_cancel=ctx.check_cancel)
    except DataError as exc:
        raise _node_error(exc) from None
    except ValueError as exc:  # a concept's resolution override that does not parse
        raise NodeError(str(exc)) from None

    n_samples = len(plan.items) + len(plan.report.dropped) - len(plan.report.repeated)
    if plan.iterations == 0:
        if not dataset.training_concepts:
            raise NodeError("no training images: every connected concept is a validation concept")
        later = [e for e in (1, 2, 3) if epoch_samples(dataset, seed, e)]
        if n_samples == 0 and not later:
            raise NodeError("the epoch has no images: the concepts' repeats (or samples per epoch) are 0; "
                            "raise repeats")
        if n_samples > 0:
            hist = {}
            for it in plan.report.dropped:
                hist[it.bucket] = hist.get(it.bucket, 0) + 1
            biggest = max(hist.values())
            raise NodeError(
                f"no batch can be filled: batch_size is {batch_size} but the {n_samples} images of an epoch fall "
                f"into {len(hist)} bucket(s) of at most {biggest} images ("
                + ", ".join(f"{_fmt(b)}: {n}" for b, n in sorted(hist.items(), key=lambda kv: -kv[1])[:8])
                + "); lower batch_size, use leftovers 'repeat' or 'keep', or use fewer aspects")
        ctx.warn("epoch 1 has no images (fractional repeats); later epochs do")

    # --- report: logs (every leftover by name), histogram, crop table, text
    report = plan.report
    counts = {}  # the epoch's images per bucket, before leftovers are dropped or filled
    for sign, group in ((1, plan.items), (-1, report.repeated), (1, report.dropped)):
        for it in group:
            counts[it.bucket] = counts.get(it.bucket, 0) + sign
    hist = dict(sorted(((b, n) for b, n in counts.items() if n), key=lambda kv: (-kv[1], kv[0])))
    ctx.log(f"epoch 1: {n_samples} images in {len(hist)} buckets -> {plan.iterations} batches of {batch_size} "
            f"(resolution {resolution}, quantization {q} from {q_from}, seed {seed} from {seed_from})")
    leftover_messages = replace(report, problems=()).messages()
    for m in leftover_messages:
        ctx.warn(m)
    for p in report.problems[:WARN_LIMIT]:
        ctx.warn(_problem_text(p))
    if len(report.problems) > WARN_LIMIT:
        ctx.warn(f"{len(report.problems) - WARN_LIMIT} more images are upscaled (see the preview)")
    if dataset.validation_concepts:
        n_val = sum(len(c.samples) for c in dataset.validation_concepts)
        ctx.log(f"validation: {n_val} images (every one once, centre crop)")

    left = f", {len(report.dropped)} left over" if report.dropped else (
        f", {len(report.repeated)} repeated to fill" if report.repeated else "")
    ctx.preview("histogram", labels=[_fmt(b) for b in hist], counts=[int(n) for n in hist.values()],
                title=f"buckets of epoch 1 ({n_samples} images, {plan.iterations} batches{left})")
    dropped = {id(it) for it in report.dropped}
    by_file = sorted(list(plan.items) + list(report.dropped), key=lambda it: (it.concept_index, str(it.path)))
    seen, rows = set(), []
    for it in by_file:
        if (it.concept_index, it.sample_index) in seen:
            continue
        seen.add((it.concept_index, it.sample_index))
        if len(rows) < TABLE_ROWS:
            rows.append([it.path.name, it.concept_name, _fmt(it.bucket), _fmt(it.resize), "%d,%d,%d,%d" % it.crop,
                         "left over (dropped this epoch)" if id(it) in dropped else ""])
    ctx.preview("table", title=f"where each image goes in epoch 1 ({len(rows)} of {len(seen)} images)",
                columns=["file", "concept", "bucket", "resized to", "crop (l,t,r,b)", "note"], rows=rows)
    text = [f"epoch 1: {plan.iterations} batches of {batch_size}; buckets: "
            + ", ".join(f"{_fmt(b)} x{n}" for b, n in hist.items())]
    if report.dropped:
        text.append(f"dropped this epoch ({len(report.dropped)}): {_names(report.dropped_files, 200)}")
    if report.repeated:
        text.append(f"repeated to fill batches ({len(report.repeated)}): {_names(report.repeated_files, 200)}")
    if not report.dropped and not report.repeated:
        text.append("no leftovers: every image is in a full batch" if leftovers != "keep"
                    else "leftovers kept as smaller last batches")
    text += [_problem_text(p) for p in report.problems[:200]]
    ctx.preview("text", text="\n".join(text))
    ctx.progress(1, 1)
    return Buckets(dataset=dataset, settings=settings, batch_size=int(batch_size), leftover=leftovers)


# ---- Cache ------------------------------------------------------------------------------------

CHUNK = 64  # items per cache call: bounds memory (values are not kept) and keeps progress moving


def _captions_to_cache(dataset, items) -> list[str]:
    """Every caption training can ask for when no text augmentation is on (each line of each
    caption file, chosen per epoch), plus the planned captions of the cached variations."""
    seen: dict[str, None] = {}
    for it in items:
        seen.setdefault(it.caption, None)
    for c in dataset.concepts:
        ta = c.settings.text_augment
        if ta.active and c.settings.concept_type != "validation":
            if ta.caption_dropout > 0:
                seen.setdefault("", None)
            continue
        for s in c.samples:
            for line in s.caption_lines or ("",):
                seen.setdefault(line, None)
    return list(seen)


@node(type="Cache", category="dataset",
      description="Encodes images to latents and captions to text embeddings once, on disk, keyed by content; "
                  "augmentation stops being random here unless several variations are cached.",
      inputs=[
          Socket("model", "MODEL"),
          Socket("buckets", "BUCKETS"),
          Path("folder", "", kind="folder", optional=True, writes=True,
               tooltip="cache folder (default: the workspace's cache/); must lie inside the workspace or an "
                       "allowed output folder (--allow-output)"),
          Int("variations", 1, min=1, max=64, tooltip="augmented draws cached per image; epoch e uses e mod N"),
          Bool("cache_text", True, tooltip="cache text-encoder outputs (only for encoders not being trained)"),
          Int("seed", -1, min=-1, max=2**31 - 1, advanced=True,
              tooltip="-1 = the TrainLoop's seed; crops and augmentation draws depend on it, so a different "
                      "seed than training's makes training encode its own draws"),
          Int("encode_batch", 8, min=1, max=256, advanced=True, tooltip="images per VAE call"),
      ],
      outputs=[Output("buckets", "BUCKETS")])
def cache(ctx, model, buckets, folder, variations, cache_text, seed=-1, encode_batch=8):
    import time
    from dataclasses import replace
    from pathlib import Path as P

    import numpy as np
    import torch

    from app.engine.errors import NodeError
    from app.ml.data.batches import plan_validation, variation_items
    from app.ml.data.cache import LatentCache, TextCache
    from app.ml.data.errors import DataError
    from app.ml.data.pipeline import CacheSpec

    model = getattr(model, "base", model)  # a ModelHandle: encode with its base model (adapters never touch the VAE)
    for attr in ("encode_images", "encode_prompts", "vae_identity", "text_identity"):
        if not hasattr(model, attr):
            raise NodeError(f"the connected model cannot encode ({attr} missing); connect a LoadModel output")
    folder = P(folder) if folder else ctx.workspace / "cache"
    seed, seed_from = _train_seed(ctx, seed)
    ds, settings = buckets.dataset, buckets.settings
    try:
        items = variation_items(ds, settings, seed, int(variations), check_cancel=ctx.check_cancel)
        if ds.validation_concepts:
            items += plan_validation(ds, settings, buckets.batch_size, seed).items
    except (DataError, ValueError) as exc:
        raise NodeError(str(exc)) from None
    items.sort(key=lambda it: it.bucket)  # chunks of one bucket encode in full batches

    def encode_pixels(arrays):
        latents = model.encode_images(torch.from_numpy(np.stack(arrays)))
        return [z.cpu().numpy() for z in latents]

    def encode_texts(texts):
        out = model.encode_prompts(list(texts))
        return [{k: v[i].cpu().numpy() for k, v in out.items()} for i in range(len(texts))]

    latents = LatentCache(folder, model.vae_identity)
    t0 = time.perf_counter()
    total = len(items)
    ctx.progress(0, total, "latents")
    try:
        for k in range(0, total, CHUNK):
            latents.get_or_encode(items[k:k + CHUNK], encode_pixels, batch_size=int(encode_batch),
                                  check_cancel=ctx.check_cancel)
            ctx.progress(min(total, k + CHUNK), total,
                         f"latents: {latents.misses} encoded, {latents.hits} cached")
    except DataError as exc:
        raise _node_error(exc) from None
    t_lat = time.perf_counter() - t0
    rows = [["latents", total, latents.hits, latents.misses, f"{t_lat:.1f} s"]]
    ctx.log(f"latents: {latents.misses} encoded, {latents.hits} already cached ({total} items = "
            f"{len({it.path for it in items})} images x {variations} variation(s), seed {seed} from {seed_from}) "
            f"in {t_lat:.1f} s")

    text_identity = None
    if cache_text:
        text_identity = model.text_identity
        captions = _captions_to_cache(ds, items)
        texts = TextCache(folder, text_identity)
        t1 = time.perf_counter()
        ctx.progress(0, len(captions), "captions")
        texts.get_or_encode(captions, encode_texts, batch_size=32,
                            progress=lambda v, n: ctx.progress(v, n, "captions"), check_cancel=ctx.check_cancel)
        t_txt = time.perf_counter() - t1
        rows.append(["captions", len(captions), texts.hits, texts.misses, f"{t_txt:.1f} s"])
        ctx.log(f"captions: {texts.misses} encoded, {texts.hits} already cached ({len(captions)} distinct)")
        if any(c.settings.text_augment.active for c in ds.training_concepts):
            ctx.log("captions changed by tag shuffle/dropout in later epochs are encoded when training reaches them")
    else:
        ctx.log("captions are not cached: training encodes them on the fly")
    ctx.preview("table", title=f"cache in {folder}", columns=["", "total", "cached", "encoded", "time"], rows=rows)
    ctx.progress(1, 1)
    return replace(buckets, cache=CacheSpec(folder=folder, vae_identity=model.vae_identity,
                                            text_identity=text_identity, variations=int(variations)))
