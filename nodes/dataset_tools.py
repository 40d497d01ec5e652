"""Dataset tools: captions and masks made by models, before training, inside the graph.

Caption runs a captioning model (BLIP or Florence-2, a folder the user downloaded) over a dataset;
Masks makes `-masklabel.png` training masks from a CLIPSeg text prompt or the images' alpha
channel. Both pass a DATASET on with the results in it, so nothing outside the workspace changes
unless the user asks: writing beside the images is a separate folder param (`write_beside`), a
written path like Save's and Cache's, so a shared recipe that names a stranger's folder is refused
by validate and by the run unless that folder is inside the workspace or allowed with
`--allow-output DIR` (README, "Sharing recipes safely"). An existing caption or mask is never
replaced without a backup beside it.

The library behind them is app/ml/data/captioning.py and masking.py; heavy imports happen inside
the functions.
"""

from app.graph.spec import Bool, Enum, Float, Int, Output, Path, Socket, String, node

PREVIEW_IMAGES = 8
PREVIEW_SIDE = 128


def _error(exc):
    from app.engine.errors import NodeError

    return NodeError(str(exc))


def _png(img) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _thumb(img, side: int = PREVIEW_SIDE):
    img = img.copy()
    img.thumbnail((side, side))
    return img


class _Shown:
    """The first PREVIEW_IMAGES results as thumbnails, each with a line of text, sent to the editor
    once: as soon as there are that many (the editor keeps every images preview, so a long run shows
    them early and does not send them again), else when the run ends."""

    def __init__(self, ctx) -> None:
        self.ctx, self.items, self.sent = ctx, [], False

    def wants(self) -> bool:
        return len(self.items) < PREVIEW_IMAGES

    def add(self, img, text: str) -> None:
        if self.wants():
            self.items.append((_thumb(img), text))

    def send(self, final: bool = False) -> None:
        if self.sent or not self.items or not (final or len(self.items) == PREVIEW_IMAGES):
            return
        self.ctx.preview("images", images=[_png(p) for p, _ in self.items], captions=[t for _, t in self.items])
        self.sent = True


def _batches(todo: list, batch_size):
    """(images done after this batch, the batch's (concept, index, sample) entries, their RGB images)."""
    from app.ml.data.images import open_image_rgb

    bs = int(batch_size)
    for k in range(0, len(todo), bs):
        chunk = todo[k:k + bs]
        yield min(len(todo), k + bs), chunk, [open_image_rgb(s.path) for _, _, s in chunk]


def _device_failure(what: str, device: str, exc: RuntimeError):
    """Out of memory or a device problem while a model ran, as the node's error with what to do."""
    from app.engine.errors import NodeError

    return NodeError(f"{what} failed on {device} ({str(exc).splitlines()[0][:300]}); lower batch_size or use "
                     "another device")


def _names(paths, most: int = 10) -> str:
    return ", ".join(p.name for p in paths[:most]) + (" ..." if len(paths) > most else "")


def _write_root(ctx, write_beside, samples, what: str):
    """The folder writes go to (resolved), after checking that every chosen image lies in it; None
    when nothing is written beside the images."""
    import os
    from pathlib import Path as P

    from app.engine.errors import NodeError
    from app.graph.confine import is_inside

    if not write_beside:
        return None
    root = P(os.path.realpath(os.path.expanduser(str(write_beside))))
    if not root.is_dir():
        raise NodeError(f"write_beside folder {root} does not exist; choose the dataset's folder")
    outside = [s.path for s in samples if not is_inside(s.path, root)]
    if outside:
        names = ", ".join(str(p) for p in outside[:5]) + (f" and {len(outside) - 5} more" if len(outside) > 5 else "")
        raise NodeError(f"{len(outside)} images are not inside write_beside ({root}), so their {what} would be "
                        f"written elsewhere: {names}; set write_beside to the folder that holds them (the "
                        "Concept's folder)")
    return root


def _replace_samples(dataset, new_samples: dict):
    """A new DATASET with some samples replaced ((concept index, sample index) -> Sample); the input
    (a cached output of another node) is never changed."""
    from dataclasses import replace

    from app.ml.data.concept import Dataset

    concepts = []
    for c in dataset.concepts:
        samples = tuple(new_samples.get((c.index, i), s) for i, s in enumerate(c.samples))
        concepts.append(replace(c, samples=samples))
    return Dataset(tuple(concepts))


def _caption_fingerprint(params: dict) -> str:
    from app.ml.fingerprint import path_fingerprint

    return path_fingerprint(params.get("model_folder") or "")


@node(type="Caption", category="dataset", fingerprint=_caption_fingerprint,
      description="Captions the dataset's images with a captioning model (BLIP, Florence-2 or Qwen2.5-VL from a "
                  "Hugging Face folder you downloaded). The captions flow on in the DATASET; .txt files are written "
                  "beside the images only when write_beside is set, an existing caption first saved as .bak.",
      inputs=[
          Socket("dataset", "DATASET"),
          Path("model_folder", kind="folder",
               tooltip="a captioning model folder with config.json: BLIP (hf download Salesforce/blip-image-"
                       "captioning-base), Florence-2 (hf download florence-community/Florence-2-base) or Qwen2.5-VL "
                       "(hf download Qwen/Qwen2.5-VL-3B-Instruct); the type is read from config.json"),
          Enum("images", ["missing_only", "all"],
               tooltip="missing_only: caption images that have no caption (their fallback is replaced); all: "
                       "re-caption every image"),
          String("prefix", "", tooltip="put before every caption, e.g. the trigger word 'ohwx person'"),
          String("suffix", "", tooltip="put after every caption"),
          Enum("florence_task", ["detailed", "short", "more_detailed"],
               tooltip="Florence-2 only: a short caption, a detailed one or a paragraph"),
          Enum("vlm_style", ["sentence", "tags"],
               tooltip="Qwen2.5-VL only: one descriptive sentence, or comma-separated tags (tagger style)"),
          Int("max_length", 75, min=4, max=1024, tooltip="most new tokens per caption"),
          Int("batch_size", 4, min=1, max=256, tooltip="images per model call"),
          Enum("device", ["cpu", "cuda", "mps"], tooltip="where the captioning model runs"),
          Path("write_beside", "", kind="folder", optional=True, writes=True,
               tooltip="write <image>.txt beside the images in this folder (the Concept's folder); empty = the "
                       "captions only flow on in the DATASET. A folder outside the workspace must be allowed with "
                       "--allow-output DIR or NODETRAINER_ALLOW_OUTPUT, so a shared recipe cannot write into your "
                       "folders. A replaced caption is kept as <image>.txt.bak"),
          String("vlm_prompt", "", advanced=True, multiline=True,
                 tooltip="Qwen2.5-VL only: your own instruction instead of the one vlm_style chooses"),
          Int("num_beams", 1, min=1, max=16, advanced=True, tooltip="beam search width (1 = greedy, fastest)"),
          Enum("dtype", ["float32", "float16", "bfloat16"], advanced=True,
               tooltip="weights' precision (float16/bfloat16 on a GPU halve memory)"),
      ],
      outputs=[Output("dataset", "DATASET")])
def caption(ctx, dataset, model_folder, images, prefix, suffix, florence_task, max_length, batch_size, device,
            write_beside="", num_beams=1, dtype="float32", vlm_style="sentence", vlm_prompt=""):
    import time
    from dataclasses import replace

    from app.ml.data.captioning import clean_caption, load_captioner, write_text_file
    from app.ml.data.captions import caption_path_for
    from app.ml.data.errors import DataError

    todo = []
    for c in dataset.concepts:
        for i, s in enumerate(c.samples):
            if images == "all" or s.caption_source in ("concept_name", "empty"):
                todo.append((c, i, s))
    root = _write_root(ctx, write_beside, [s for _, _, s in todo], "captions")
    if not todo:
        ctx.log("every image already has a caption; nothing to do (choose images 'all' to re-caption)")
        ctx.progress(1, 1)
        return dataset
    try:
        ctx.progress(0, len(todo), "loading the captioning model")
        captioner = load_captioner(model_folder, device, florence_task=florence_task, dtype=dtype,
                                   vlm_style=vlm_style, vlm_prompt=vlm_prompt)
    except DataError as exc:
        raise _error(exc) from None
    ctx.log(f"{captioner.label} from {model_folder}: captioning {len(todo)} images on {device}")

    new, written, backups, empty = {}, [], [], []
    shown = _Shown(ctx)
    t0 = time.perf_counter()
    try:
        for done, chunk, pics in _batches(todo, batch_size):
            raw = captioner.caption(pics, max_length=int(max_length), num_beams=int(num_beams))
            for (c, i, s), pic, text in zip(chunk, pics, raw):
                if not clean_caption(text):
                    empty.append(s.path)
                    continue
                cap = clean_caption(text, prefix, suffix, c.settings.text_augment.delimiter)
                new[(c.index, i)] = replace(s, caption_lines=(cap,), caption_source="generated")
                if root is not None:
                    b = write_text_file(caption_path_for(s.path), cap)
                    written.append(s.path)
                    if b is not None:
                        backups.append(b)
                shown.add(pic, cap)
            ctx.progress(done, len(todo), f"captioned {done} of {len(todo)}")
            shown.send()
    except DataError as exc:
        raise _error(exc) from None
    except RuntimeError as exc:  # out of memory, a device problem
        raise _device_failure("captioning", device, exc) from None
    shown.send(final=True)
    dt = time.perf_counter() - t0
    ctx.log(f"captioned {len(todo)} images in {dt:.1f} s ({len(todo) / max(dt, 1e-9):.2f} images/s)")
    if empty:
        ctx.warn(f"the model gave an empty caption for {len(empty)} images; they keep their caption: " + _names(empty))
    if root is not None:
        ctx.log(f"wrote {len(written)} caption files beside the images in {root}"
                + (f"; {len(backups)} replaced captions kept as .bak" if backups else ""))
    else:
        ctx.log("captions flow on in the dataset only (set write_beside to save them as .txt files)")
    rows = [[s.path.name, new[(c.index, i)].caption_lines[0] if (c.index, i) in new else "(empty: kept)"]
            for c, i, s in todo[:100]]
    ctx.preview("table", title=f"captions ({len(rows)} of {len(todo)})", columns=["image", "caption"], rows=rows)
    ctx.progress(1, 1)
    return _replace_samples(dataset, new)


def _masks_fingerprint(params: dict) -> str:
    from app.ml.fingerprint import path_fingerprint

    return path_fingerprint(params.get("model_folder") or "") if params.get("source") == "clipseg" else ""


@node(type="Masks", category="dataset", fingerprint=_masks_fingerprint,
      description="Makes training masks (white = learn) from a text prompt with CLIPSeg or from the images' alpha "
                  "channel. The masks flow on in the DATASET (kept in the workspace); -masklabel.png files are "
                  "written beside the images only when write_beside is set, never replacing one without a .bak.",
      inputs=[
          Socket("dataset", "DATASET"),
          Enum("source", ["clipseg", "alpha"], tooltip="clipseg: what the prompt describes is learned; alpha: the "
                                                       "opaque part of images with transparency"),
          Path("model_folder", kind="folder", optional=True,
               tooltip="CLIPSeg model folder (hf download CIDAS/clipseg-rd64-refined); used when source is clipseg"),
          String("prompt", "a person", tooltip="what to keep, e.g. 'a person', 'the dog'"),
          Enum("images", ["missing_only", "all"], tooltip="missing_only: images without a mask; all: every image"),
          Float("threshold", 0.4, min=0.0, max=1.0, step=0.05, tooltip="score above which a pixel is learned"),
          Int("dilate", 0, min=0, max=256, tooltip="grow the mask by this many pixels"),
          Float("blur", 0.0, min=0.0, max=64.0, tooltip="soften the edge (Gaussian radius in pixels)"),
          Bool("invert", False, tooltip="learn everything except what the prompt describes"),
          Int("batch_size", 4, min=1, max=256, tooltip="images per model call"),
          Enum("device", ["cpu", "cuda", "mps"], tooltip="where CLIPSeg runs"),
          Path("write_beside", "", kind="folder", optional=True, writes=True,
               tooltip="write <image>-masklabel.png beside the images in this folder; empty = masks stay in the "
                       "workspace. A folder outside the workspace must be allowed with --allow-output DIR. A "
                       "replaced mask is kept as .bak"),
      ],
      outputs=[Output("dataset", "DATASET")])
def masks(ctx, dataset, source, model_folder, prompt, images, threshold, dilate, blur, invert, batch_size, device,
          write_beside=""):
    import time
    from dataclasses import replace

    from app.atomic import atomic_file
    from app.engine.errors import NodeError
    from app.ml.data.captioning import write_file_bytes
    from app.ml.data.errors import DataError
    from app.ml.data.images import mask_path_for
    from app.ml.data.masking import (MaskSettings, alpha_score, finish_mask, load_segmenter, mask_png, overlay)

    try:
        settings = MaskSettings(threshold=float(threshold), dilate=int(dilate), blur=float(blur), invert=bool(invert))
    except ValueError as exc:
        raise NodeError(str(exc)) from None
    todo = [(c, i, s) for c in dataset.concepts for i, s in enumerate(c.samples)
            if images == "all" or s.mask_path is None]
    root = _write_root(ctx, write_beside, [s for _, _, s in todo], "masks")
    if not todo:
        ctx.log("every image already has a mask; nothing to do (choose images 'all' to remake them)")
        ctx.progress(1, 1)
        return dataset
    segmenter = None
    if source == "clipseg":
        if not (prompt or "").strip():
            raise NodeError("prompt is empty; describe what to keep, e.g. 'a person'")
        try:
            segmenter = load_segmenter(model_folder, device)
        except DataError as exc:
            raise _error(exc) from None
        ctx.log(f"CLIPSeg from {model_folder}: masks of '{prompt}' for {len(todo)} images on {device}")
    out_dir = ctx.node_dir("masks")
    new, no_alpha, backups = {}, [], []
    shown = _Shown(ctx)
    t0 = time.perf_counter()
    try:
        for done, chunk, pics in _batches(todo, batch_size):
            if segmenter is not None:
                scores = segmenter.scores(pics, prompt.strip())
            else:
                scores = [alpha_score(s.path) for _, _, s in chunk]
            for (c, i, s), pic, score in zip(chunk, pics, scores):
                if score is None:
                    no_alpha.append(s.path)
                    continue
                if score.shape != (pic.size[1], pic.size[0]):
                    raise NodeError(f"{s.path}: the mask source is {score.shape[1]}x{score.shape[0]} but the image "
                                    f"is {pic.size[0]}x{pic.size[1]}; re-save the image")
                mask = finish_mask(score, settings)
                data = mask_png(mask)
                if root is not None:
                    target = mask_path_for(s.path)
                    b = write_file_bytes(target, data)
                    if b is not None:
                        backups.append(b)
                else:
                    name = f"{c.index}_{i}_{s.path.stem}-masklabel.png"
                    target = out_dir / name
                    with atomic_file(target, overwrite=True) as t:  # the node's own file in the workspace
                        t.tmp.write_bytes(data)
                new[(c.index, i)] = replace(s, mask_path=target)
                if shown.wants():  # the overlay only for the images shown
                    shown.add(overlay(pic, mask), f"{s.path.name}: {float((mask >= 128).mean()):.0%} learned")
            ctx.progress(done, len(todo), f"masks {done} of {len(todo)}")
            shown.send()
    except DataError as exc:
        raise _error(exc) from None
    except RuntimeError as exc:
        raise _device_failure("mask generation", device, exc) from None
    shown.send(final=True)
    dt = time.perf_counter() - t0
    ctx.log(f"made {len(new)} masks in {dt:.1f} s ({len(todo) / max(dt, 1e-9):.2f} images/s)")
    if no_alpha:
        ctx.warn(f"{len(no_alpha)} images have no alpha channel and keep no mask: " + _names(no_alpha))
    if not new:
        raise NodeError("no mask was made: none of the images has an alpha channel; use source 'clipseg'")
    if root is not None:
        ctx.log(f"wrote {len(new)} masks beside the images in {root}"
                + (f"; {len(backups)} replaced masks kept as .bak" if backups else ""))
    else:
        ctx.log(f"masks are kept in {out_dir} (set write_beside to save them beside the images)")
    ctx.progress(1, 1)
    return _replace_samples(dataset, new)
