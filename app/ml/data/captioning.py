"""Automatic captions from a captioning model the user downloaded (a Hugging Face model folder).

Captioning happens before training, once, on a folder of images: the model is loaded with
transformers' own classes (no custom code is executed: ``trust_remote_code`` is never set), chosen
from the folder's ``config.json`` so the user points at a folder and nothing else. Supported:

- BLIP (``model_type`` "blip": Salesforce/blip-image-captioning-base / -large): one sentence.
- Florence-2 (``model_type`` "florence2", the transformers-native conversion,
  e.g. florence-community/Florence-2-base / -large): a short, detailed or very detailed sentence.
- Qwen2.5-VL / Qwen2-VL (``model_type`` "qwen2_5_vl" / "qwen2_vl", e.g. Qwen/Qwen2.5-VL-3B-Instruct): a
  vision-language model asked for a sentence or for comma-separated tags (tagger style), or with
  the user's own instruction.

Captions written beside the images never replace a user's caption without a backup, and are
written atomically (app/atomic.py), because a half-written or lost caption file is a lost hour of
a user's work.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from .errors import DataError

MODEL_TYPES = {"blip": "BLIP", "florence2": "Florence-2", "qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL"}
VLM_PROMPTS = {
    "sentence": "Describe this image in one detailed sentence, as a caption for training an image generator.",
    "tags": "List what is visible in this image as short comma-separated tags (subject, clothing, pose, setting, "
            "style), most important first. Answer with the tags only.",
}
VLM_MAX_PIXELS = 768 * 768  # Qwen-VL sees images up to this many pixels (~750 tokens): ample for a caption,
# where the model's default (12.8 MP, 16k tokens) would make every image cost seconds and gigabytes
# Qwen2(.5)-VL's chat format, written out: the folder's chat template may be the text-only one
_QWEN_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>", "more_detailed": "<MORE_DETAILED_CAPTION>"}
DOWNLOAD_HINT = ("download one, e.g. `hf download Salesforce/blip-image-captioning-base --local-dir "
                 "models/blip-base` or `hf download florence-community/Florence-2-base --local-dir "
                 "models/florence2-base`")
BACKUP_SUFFIX = ".bak"
_WS = re.compile(r"\s+")


def read_model_config(folder: str | Path, what: str = "captioning model") -> dict:
    """The folder's config.json, or a DataError naming the folder and what to do."""
    folder = Path(folder) if folder else None
    if folder is None or not str(folder).strip():
        raise DataError(f"no {what} folder is set; {DOWNLOAD_HINT if what == 'captioning model' else 'choose one'}")
    if not folder.exists():
        raise DataError(f"{what} folder not found", folder)
    if not folder.is_dir():
        raise DataError(f"{what} must be a folder (a Hugging Face model folder with config.json), not a file", folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise DataError("not a Hugging Face model folder: config.json is missing; choose the folder that "
                        "holds config.json and the weights", folder)
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"config.json cannot be read ({exc}); download the model again", cfg) from None
    if not isinstance(data, dict):
        raise DataError("config.json is not a JSON object; download the model again", cfg)
    return data


def detect_model_type(folder: str | Path) -> str:
    """'blip' or 'florence2' from config.json's model_type; anything else is a clear error."""
    data = read_model_config(folder)
    mtype = str(data.get("model_type", ""))
    if mtype not in MODEL_TYPES:
        known = ", ".join(f"{v} ({k})" for k, v in MODEL_TYPES.items())
        raise DataError(f"model_type {mtype!r} in config.json is not a supported captioning model; supported: "
                        f"{known}. {DOWNLOAD_HINT}", folder)
    if mtype == "florence2" and (data.get("vision_config") or {}).get("model_type") == "davit":
        # the original release: its config names classes of custom code that is never run here
        raise DataError("this is the original Florence-2 release, which needs remote code; download the "
                        "transformers-native conversion instead: `hf download florence-community/Florence-2-base "
                        "--local-dir models/florence2-base` (or -large)", folder)
    return mtype


def tags_from_text(text: str) -> str:
    """A VLM's tag answer as one line of unique tags: commas, semicolons, new lines and list bullets
    separate them ("1. red hair" and "- red hair" become "red hair")."""
    seen: dict[str, None] = {}
    for part in re.split(r"[,;\n]+", text):
        tag = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", part).strip().strip(".").strip()
        if tag and tag.lower() not in {t.lower() for t in seen}:
            seen[tag] = None
    return ", ".join(seen)


def clean_caption(text: str, prefix: str = "", suffix: str = "", delimiter: str = ",") -> str:
    """One line: whitespace collapsed, model artefacts stripped, prefix/suffix (a trigger word) joined
    with the concept's delimiter so they become tags of their own."""
    text = _WS.sub(" ", text.replace("</s>", " ").replace("<s>", " ").replace("<pad>", " ")).strip()
    joiner = delimiter if delimiter.isspace() else delimiter + " "
    parts = [p.strip() for p in (prefix, text, suffix) if p and p.strip()]
    return joiner.join(parts)


@dataclass
class Captioner:
    """A loaded captioning model: `caption(images)` gives one raw sentence per PIL image."""

    kind: str
    folder: Path
    model: object
    processor: object
    device: str
    dtype: object
    task: str = ""
    tokenizer: object = None  # Qwen-VL: the tokenizer and image processor, used as its processor would
    image_processor: object = None
    prompt: str = ""
    style: str = "sentence"

    @property
    def label(self) -> str:
        return MODEL_TYPES[self.kind]

    def caption(self, images: Sequence, max_length: int = 75, num_beams: int = 1) -> list[str]:
        import torch

        images = [im.convert("RGB") for im in images]
        if not images:
            return []
        with torch.inference_mode():
            if self.kind == "blip":
                inputs = self.processor(images=images, return_tensors="pt").to(self.device)
                inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
                ids = self.model.generate(**inputs, max_new_tokens=int(max_length), num_beams=num_beams)
                return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]
            if self.kind in ("qwen2_5_vl", "qwen2_vl"):
                return self._caption_qwen(images, max_length, num_beams)
            task = self.task or FLORENCE_TASKS["detailed"]
            inputs = self.processor(text=[task] * len(images), images=images, return_tensors="pt").to(self.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
            ids = self.model.generate(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                      max_new_tokens=int(max_length), num_beams=num_beams, do_sample=False)
            # the caption tasks are plain text: what Florence-2's post-processor does for them ("pure_text")
            # is dropping the special tokens, and it needs no parsing rules the folder may lack
            return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]


    def _caption_qwen(self, images, max_length: int, num_beams: int) -> list[str]:
        """What Qwen2(.5)-VL's processor does, done here: its video half needs torchvision, which
        captioning does not: one <|image_pad|> per merged patch of each image, left padding."""
        size = getattr(self.image_processor, "size", None)
        lo, hi = getattr(size, "shortest_edge", None), getattr(size, "longest_edge", None)
        kwargs = {}
        if hi and hi > VLM_MAX_PIXELS:
            kwargs["size"] = {"shortest_edge": min(lo or VLM_MAX_PIXELS, VLM_MAX_PIXELS),
                              "longest_edge": VLM_MAX_PIXELS}
        vision = self.image_processor(images=images, return_tensors="pt", **kwargs)
        merge = int(getattr(self.image_processor, "merge_size", 2)) ** 2
        base = _QWEN_PROMPT.format(prompt=self.prompt or VLM_PROMPTS[self.style])
        texts = [base.replace("<|image_pad|>", "<|image_pad|>" * (int(g.prod()) // merge))
                 for g in vision["image_grid_thw"]]
        self.tokenizer.padding_side = "left"
        enc = self.tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        ids = self.model.generate(**enc, pixel_values=vision["pixel_values"].to(self.device, self.dtype),
                                  image_grid_thw=vision["image_grid_thw"].to(self.device),
                                  max_new_tokens=int(max_length), num_beams=num_beams, do_sample=False)
        out = self.tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [tags_from_text(t) if self.style == "tags" else " ".join(t.split()) for t in out]


def load_failure(exc: BaseException) -> str:
    """A failed model load in a few words for an error message: the exception's kind and first line."""
    first = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}" if str(exc).strip() else type(exc).__name__
    return first[:300]


def to_device(model, device: str, folder: Path) -> None:
    """Move a loaded model to `device` for inference (eval mode); an unavailable device is a DataError."""
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as exc:
        raise DataError(f"cannot use device {device!r} ({str(exc).splitlines()[0][:200]}); choose 'cpu' or an "
                        "available GPU", folder) from None
    model.eval()


def load_captioner(folder: str | Path, device: str = "cpu", *, florence_task: str = "detailed",
                   dtype: str = "float32", vlm_style: str = "sentence", vlm_prompt: str = "") -> Captioner:
    """Load the model and processor of `folder` (its type read from config.json); every failure is a
    DataError naming the folder."""
    import torch

    folder = Path(folder)
    kind = detect_model_type(folder)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tokenizer = image_processor = processor = None
    try:
        if kind == "blip":
            from transformers import BlipForConditionalGeneration as Model
            from transformers import BlipProcessor as Processor
        elif kind == "florence2":
            from transformers import Florence2ForConditionalGeneration as Model
            from transformers import Florence2Processor as Processor
        else:
            from transformers import AutoImageProcessor, AutoTokenizer

            if kind == "qwen2_5_vl":
                from transformers import Qwen2_5_VLForConditionalGeneration as Model
            else:
                from transformers import Qwen2VLForConditionalGeneration as Model
            Processor = None
            tokenizer = AutoTokenizer.from_pretrained(str(folder))
            image_processor = AutoImageProcessor.from_pretrained(str(folder))
        if Processor is not None:
            processor = Processor.from_pretrained(str(folder))
        model = Model.from_pretrained(str(folder), dtype=torch_dtype)
    except Exception as exc:  # safetensors, tokenizers and transformers each raise their own kinds
        raise DataError(f"cannot load the {MODEL_TYPES[kind]} model ({load_failure(exc)}); the folder needs the "
                        "weights, the tokenizer and the processor files: download the whole model folder",
                        folder) from None
    to_device(model, device, folder)
    return Captioner(kind=kind, folder=folder, model=model, processor=processor, device=device, dtype=torch_dtype,
                     task=FLORENCE_TASKS.get(florence_task, FLORENCE_TASKS["detailed"]), tokenizer=tokenizer,
                     image_processor=image_processor, prompt=(vlm_prompt or "").strip(),
                     style=vlm_style if vlm_style in VLM_PROMPTS else "sentence")


def caption_images(captioner: Captioner, paths: Sequence[Path], *, batch_size: int = 4, max_length: int = 75,
                   open_image: Callable | None = None, progress=None, check_cancel=None) -> list[str]:
    """Raw captions of `paths` in batches; `progress(done, total)` after each batch."""
    from .errors import check_cancelled
    from .images import open_image_rgb

    open_image = open_image or open_image_rgb
    out: list[str] = []
    paths = list(paths)
    for k in range(0, len(paths), max(1, int(batch_size))):
        check_cancelled(check_cancel)
        chunk = paths[k:k + max(1, int(batch_size))]
        out += captioner.caption([open_image(p) for p in chunk], max_length=max_length)
        if progress is not None:
            progress(len(out), len(paths))
    return out


def backup_path(path: Path) -> Path:
    """`photo.txt` -> `photo.txt.bak`, or `photo.txt.1.bak`, ... when that exists: backups never
    replace each other."""
    first = path.with_name(path.name + BACKUP_SUFFIX)
    if not first.exists():
        return first
    n = 1
    while True:
        candidate = path.with_name(f"{path.name}.{n}{BACKUP_SUFFIX}")
        if not candidate.exists():
            return candidate
        n += 1


def write_text_file(path: str | Path, text: str) -> Path | None:
    """Write `text` (UTF-8, one trailing newline) to `path` atomically; an existing file with other
    content is first copied to a backup (returned). Same content: nothing is written."""
    data = text.rstrip("\n") + "\n"
    return _replace_file(Path(path), data.encode("utf-8"), lambda tmp: tmp.write_text(data, encoding="utf-8"))


def write_file_bytes(path: str | Path, data: bytes) -> Path | None:
    """Bytes to `path` atomically, backing up an existing different file first (see write_text_file)."""
    return _replace_file(Path(path), data, lambda tmp: tmp.write_bytes(data))


def _replace_file(path: Path, data: bytes, write: Callable[[Path], object]) -> Path | None:
    """`write(tmp)` puts `data` in a temporary file that then replaces `path`, after an existing file
    with other content is copied to a backup (returned); the same content is not written again."""
    from app.atomic import atomic_file

    backup = None
    if path.exists():
        try:
            if path.read_bytes() == data:
                return None
            backup = backup_path(path)
            shutil.copy2(path, backup)
        except OSError as exc:
            raise DataError(f"cannot back up the existing file before replacing it ({exc.strerror or exc}); "
                            "nothing was changed", path) from None
    try:
        with atomic_file(path, overwrite=True) as t:
            write(t.tmp)
    except OSError as exc:
        raise DataError(f"cannot write ({exc})", path) from None
    return backup
