"""The files a recipe reads, checked when it is validated: before anything loads.

A run that loads a 7 GB checkpoint for a minute and then finds the dataset folder misspelled wastes
the user's time, so ``validate`` (and ``launch.py run``, which validates first) reports, by node and
param, every input path that is missing, unreadable or the wrong kind of thing (a folder where a
file is expected and vice versa), and for LoadModel what can be told cheaply from file headers: a
``.safetensors`` file whose header is damaged, one that is a LoRA rather than a base model, and a
model whose family contradicts the recipe's ``family`` (an SDXL file where it says sd15). Only the
JSON header at the start of a ``.safetensors`` file (8-byte little-endian length, then JSON) and a
diffusers folder's ``model_index.json`` / ``unet/config.json`` are read; never weights.

Relative paths are read from the recipe's folder, as the executor does. Without a recipe folder
(an unsaved recipe in the editor, or a graph checked on its own) nothing is checked: the files
belong to a recipe that is not anywhere yet, so the run will tell. ``builtin:`` sources are always fine; an unset
required path is reported by validate.py itself. Pure Python and the standard library (families.py
and tokenizers.py are torch-free): validation never imports torch.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from app.graph.problems import Problem

# The suffixes load.py reads as single-file models (a test keeps the two equal; load.py imports torch).
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit on the JSON header
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # builtin:tiny-sd (two letters at least: not C:)

# The built-in nodes' PATH params that are read (see _CONTENT_CHECKS at the end for what each must
# hold). Plugins are not checked: a plugin's plain "file" path may as well be one it writes.
READ_INPUTS = {
    ("LoadModel", "source"), ("LoadModel", "vae"), ("LoadModel", "tokenizer"),
    ("LoadModel", "ae"), ("LoadModel", "clip_l"), ("LoadModel", "t5xxl"),
    ("Concept", "folder"), ("Concept", "caption_file"),
    ("LoRAInject", "init_from"), ("LoadLoRA", "path"), ("TrainLoop", "resume_from"), ("Cache", "folder"),
    ("Embedding", "init_from"), ("LoadEmbedding", "path"),
    ("Caption", "model_folder"), ("Masks", "model_folder"),
    ("Caption", "write_beside"), ("Masks", "write_beside"),  # the images' folder: written into, must exist
}
# Inputs a node creates when missing (only the wrong kind of thing there is a problem).
_CREATED_WHEN_MISSING = {("Cache", "folder")}
# Inputs read only when another param says so: (param, value it must have).
_USED_ONLY_WHEN = {("Concept", "caption_file"): ("prompt_source", "concept_file"),
                   ("Masks", "model_folder"): ("source", "clipseg")}


def check_input_files(graph, registry, *, recipe_dir: "str | os.PathLike | None" = None) -> list[Problem]:
    """Every input path of every node that would fail when the node runs, as Problems (none without
    ``recipe_dir``: see the module docstring)."""
    problems: list[Problem] = []
    if recipe_dir is None:
        return problems
    for node in graph.nodes.values():
        spec = registry.get(node.type)
        if spec is None or node.version != spec.version:
            continue  # reported elsewhere
        params = spec.default_params()
        params.update({k: v for k, v in node.params.items() if k in params})
        for inp in spec.params:
            if inp.type != "PATH" or (spec.type, inp.name) not in READ_INPUTS:
                continue
            value = params.get(inp.name)
            if not isinstance(value, str) or not value.strip() or _SCHEME.match(value):
                continue
            when = _USED_ONLY_WHEN.get((spec.type, inp.name))
            if when and params.get(when[0]) != when[1]:
                continue
            path = _resolve(value, recipe_dir)
            why = kind_problem(path, inp.path_kind, may_be_missing=(spec.type, inp.name) in _CREATED_WHEN_MISSING)
            if why is None and path.exists():
                check = _CONTENT_CHECKS.get((spec.type, inp.name))
                why = check(path, params) if check else None
            if why:
                shown = value if str(path) == value else f"{value} ({path})"
                problems.append(Problem(node.id, node.label(), f"{inp.name!r} = {shown}: {why}"))
    return problems


# ---- image sizes the model family cannot take --------------------------------------------------------

# Built-in models whose family is not SD's default (the others are SD 1.5 / SDXL and take multiples of 8).
BUILTIN_FAMILIES = {"tiny-flux": "flux-dev"}
# Size params checked against the family's pixel multiple (Flux packs 2x2 latent patches: 16 px):
# (node type, param, kind) with kind "side" (an Int), "resolution" (a Bucketer-style resolution string)
# or "quantization" (an Int, 0 = the family's own).
SIZE_PARAMS = (("Sample", "width", "side"), ("Sample", "height", "side"), ("Bucketer", "resolution", "resolution"),
               ("Bucketer", "quantization", "quantization"), ("Augment", "resolution", "resolution"))


def _model_family(params: dict, recipe_dir) -> Any:
    """LoadModel's family from its params alone: the ``family`` param, a builtin's name, else the source's
    header (absolute paths always, relative ones only with a recipe folder); None when it cannot be told."""
    from app.ml.models.families import ModelLoadError, get_family

    wanted = str(params.get("family") or "auto")
    source = str(params.get("source") or "").strip()
    try:
        if wanted != "auto":
            return get_family(wanted)
        if source.startswith("builtin:"):
            return get_family(BUILTIN_FAMILIES.get(source[len("builtin:"):], "sd15"))
        if not source or _SCHEME.match(source) or (recipe_dir is None and not Path(source).expanduser().is_absolute()):
            return None
        path = _resolve(source, recipe_dir or ".")
        return _family_of(path) if path.exists() else None
    except (HeaderError, ModelLoadError, OSError):
        return None  # an unreadable or unknown model is reported by the input checks


def _sides(kind: str, value: Any) -> list[int]:
    if kind in ("side", "quantization"):
        return [int(value)] if isinstance(value, int) and not isinstance(value, bool) and value > 0 else []
    from app.ml.data.resolution import parse_resolution  # pure Python

    text = str(value or "").strip()
    if not text:
        return []
    try:
        res = parse_resolution(text)
    except ValueError:
        return []  # reported as a bad param value
    return list(res.fixed) if res.fixed else list(res.targets)


def check_image_sizes(graph, registry, *, recipe_dir: "str | os.PathLike | None" = None) -> list[Problem]:
    """Sizes a recipe's model cannot take, by node and param, before anything loads: for Flux (16 px: 8 px
    latents packed 2x2) a Sample side, a Bucketer or Augment resolution, or a Bucketer quantization that is
    not a multiple of 16. SD's multiple of 8 is left to the nodes (the Bucketer rounds to it)."""
    multiples = []
    for node in graph.nodes.values():
        spec = registry.get(node.type)
        if node.type != "LoadModel" or spec is None or node.version != spec.version:
            continue
        params = spec.default_params()
        params.update({k: v for k, v in node.params.items() if k in params})
        family = _model_family(params, recipe_dir)
        if family is not None and family.pixel_multiple > 8:
            multiples.append((family.pixel_multiple, family.display_name))
    if not multiples:
        return []
    q, name = max(multiples)
    problems: list[Problem] = []
    for node in graph.nodes.values():
        spec = registry.get(node.type)
        if spec is None or node.version != spec.version:
            continue
        params = spec.default_params()
        params.update({k: v for k, v in node.params.items() if k in params})
        for node_type, param, kind in SIZE_PARAMS:
            if node.type != node_type or param not in params:
                continue
            bad = [v for v in _sides(kind, params[param]) if v % q]
            if bad:
                fix = {"side": f"use {bad[0] - bad[0] % q or q} or {bad[0] - bad[0] % q + q}",
                       "resolution": f"use sizes that are multiples of {q} (e.g. 512, 768, 1024)",
                       "quantization": f"use {q}, 64 or 0 (the model's own)"}[kind]
                problems.append(Problem(node.id, node.label(), f"{param!r} = {params[param]}: {name} needs image sides "
                                        f"that are multiples of {q} px ({', '.join(map(str, bad))} is not); {fix}"))
    return problems


def _resolve(value: str, recipe_dir) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else Path(recipe_dir).resolve() / p


def kind_problem(path: Path, kind: str, *, may_be_missing: bool = False) -> str | None:
    """Why ``path`` cannot serve as a ``kind`` ("file", "folder", "file_or_folder") input, or None."""
    what = {"folder": "folder", "file_or_folder": "file or folder"}.get(kind, "file")
    try:
        exists = path.exists()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if not exists:
        if may_be_missing:
            return None
        hint = "" if path.parent.is_dir() else f" (its folder {path.parent} does not exist either)"
        return f"no such {what}{hint}; check the path (relative paths start at the recipe's folder)"
    if kind == "file" and path.is_dir():
        return "is a folder, but a file is expected here"
    if kind == "folder" and not path.is_dir():
        return "is a file, but a folder is expected here"
    mode = os.R_OK | (os.X_OK if path.is_dir() else 0)
    if not os.access(path, mode):
        return f"the {'folder' if path.is_dir() else 'file'} is not readable (permission denied)"
    return None


# ---- file headers ----------------------------------------------------------------------------------

class HeaderError(ValueError):
    """A .safetensors file whose header cannot be read; the message says what is wrong."""


_HEADER_CACHE: dict[tuple[str, int, int], tuple[list[str], dict[str, str]]] = {}


def safetensors_header(path: Path) -> tuple[list[str], dict[str, str]]:
    """(tensor names, metadata) from a .safetensors header, reading nothing else.

    Cached by path, size and mtime: the editor validates after every edit."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _HEADER_CACHE:
        return _HEADER_CACHE[key]
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise HeaderError(f"not a safetensors file ({st.st_size} bytes; the download may have failed)")
        n = int.from_bytes(raw, "little")
        if n < 2 or n > min(st.st_size - 8, MAX_HEADER_BYTES):
            raise HeaderError("not a safetensors file (its header length does not fit the file; an incomplete "
                              "download, or a web page saved under this name?)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HeaderError(f"damaged safetensors file (its header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise HeaderError("damaged safetensors file (its header is not a JSON object)")
    meta = header.pop("__metadata__", None)
    result = (list(header), {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {})
    if len(_HEADER_CACHE) > 64:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[key] = result
    return result


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HeaderError(f"{path.name} cannot be read ({e})") from None
    return data if isinstance(data, dict) else {}


# ---- what each input must hold -------------------------------------------------------------------

def _family_of(path: Path) -> Any:
    """The model family of a single file or diffusers folder, as far as headers tell (None: cannot tell)."""
    from app.ml.models.families import detect_diffusers_family, detect_single_file_family

    if path.is_dir():
        index = _read_json(path / "model_index.json") or {}
        if str(index.get("_class_name", "")).startswith("Flux"):  # a diffusers FLUX.1 folder
            from app.ml.models.families import get_family

            cfg = _read_json(path / "transformer" / "config.json")
            if cfg is None:
                raise HeaderError("a Flux folder without transformer/config.json")
            return get_family("flux-dev" if cfg.get("guidance_embeds") else "flux-schnell")
        unet = _read_json(path / "unet" / "config.json")
        if unet is None:
            hint = " It holds .safetensors files: choose one of those instead." if any(path.glob("*.safetensors")) else ""
            raise HeaderError(f"not a diffusers model folder (no unet/config.json).{hint}")
        return detect_diffusers_family(_read_json(path / "model_index.json"), unet,
                                       _read_json(path / "text_encoder" / "config.json"),
                                       _read_json(path / "scheduler" / "scheduler_config.json"), source=path.name)
    if path.suffix.lower() not in MODEL_SUFFIXES:
        raise HeaderError(f"not a model file (expected {', '.join(MODEL_SUFFIXES)}) or a diffusers folder")
    if path.suffix.lower() != ".safetensors":
        return None  # pickled checkpoints cannot be read cheaply (or safely) here
    keys, meta = safetensors_header(path)
    flux = _flux_file(path)
    if flux is not None and flux.kind == "flux-transformer":
        from app.ml.models.families import get_family

        return get_family("flux-dev" if flux.variant == "dev" else "flux-schnell")
    return detect_single_file_family(keys, source=path.name, metadata=meta)


def _flux_file(path: Path):
    """What a .safetensors file is as a Flux part (transformer, VAE, CLIP, T5), from its header; None if unreadable."""
    from app.ml.flux import detect

    try:
        return detect.detect_file(path)
    except detect.DetectError:
        return None


def check_flux_part(slot: str):
    """LoadModel's ae / clip_l / t5xxl: the header must show the part that slot needs (named otherwise)."""
    def check(path: Path, params: dict) -> str | None:
        from app.ml.flux import detect

        kind = {"ae": "vae", "clip_l": "clip", "t5xxl": "t5"}[slot]
        try:
            detect.expect_file(path, kind, variant="L" if slot == "clip_l" else None)
        except detect.DetectError as e:
            return str(e).replace(f"LoadModel: {path}", "it").replace("this slot", f"'{slot}'")
        return None

    return check


def _same_weights(a: str, b: str) -> bool:
    return a == b or {a, b} <= {"sd2", "sd2-v"}


def check_model_source(path: Path, params: dict) -> str | None:
    from app.ml.models.families import ModelLoadError, get_family

    try:
        detected = _family_of(path)
    except (HeaderError, ModelLoadError) as e:
        return str(e).removeprefix(f"{path.name}: ")
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    wanted = str(params.get("family") or "auto")
    if detected is None or wanted == "auto":
        return None
    try:
        forced = get_family(wanted)
    except ModelLoadError:
        return None  # an unknown family is reported as a bad param value
    if _same_weights(forced.id, detected.id):
        return None
    return (f"is {detected.display_name} ({detected.id}), but 'family' says {forced.id}; set family to auto "
            f"or {detected.id}, or choose a {forced.display_name} model")


def check_vae(path: Path, params: dict) -> str | None:
    if path.is_dir():
        if not (path / "config.json").is_file() and not (path / "vae" / "config.json").is_file():
            return "not a diffusers VAE folder (no config.json, no vae/config.json)"
        return None
    return _readable_safetensors(path)


def check_tokenizer(path: Path, params: dict) -> str | None:
    from app.ml.models.tokenizers import CLIP_BPE_FILENAME, is_tokenizer_folder

    places = (path, path / "tokenizer", path / "tokenizer_2")
    if any(is_tokenizer_folder(p) or (p / "spiece.model").is_file() for p in places) or (path / CLIP_BPE_FILENAME).is_file():
        return None  # spiece.model: Flux's T5 tokenizer, which may be given alone
    return ("holds no tokenizer: expected tokenizer.json or vocab.json + merges.txt (T5: spiece.model) in it, or "
            "tokenizer/ (and tokenizer_2/) subfolders holding them")


def _readable_safetensors(path: Path) -> str | None:
    if path.suffix.lower() != ".safetensors":
        return None
    try:
        safetensors_header(path)
    except HeaderError as e:
        return str(e)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def check_adapter_file(path: Path, params: dict) -> str | None:
    why = _readable_safetensors(path)
    if why or path.suffix.lower() != ".safetensors":
        return why
    keys, _ = safetensors_header(path)
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return "is a full model checkpoint, not a LoRA; choose a LoRA file to continue from"
    return None


def check_embedding_file(path: Path, params: dict) -> str | None:
    """An embedding file (Embedding, LoadEmbedding): readable, and not a model checkpoint; which layout
    and family it holds is checked when the node loads it against the model."""
    why = _readable_safetensors(path)
    if why or path.suffix.lower() != ".safetensors":
        return why
    keys, _ = safetensors_header(path)
    if any(k.startswith(("model.diffusion_model.", "unet.", "transformer.")) for k in keys):
        return "is a model checkpoint, not an embedding; choose an embedding file (or a LoRA with bundled embeddings)"
    return None


def check_hf_model_folder(path: Path, params: dict) -> str | None:
    """A captioning or mask model folder (Caption, Masks) must hold config.json; its model type is
    checked when the node loads it."""
    if not (path / "config.json").is_file():
        return "not a Hugging Face model folder (config.json is missing); choose the folder you downloaded"
    return None


_CONTENT_CHECKS: dict[tuple[str, str], Callable[[Path, dict], "str | None"]] = {
    ("Caption", "model_folder"): check_hf_model_folder,
    ("Masks", "model_folder"): check_hf_model_folder,
    ("LoadModel", "source"): check_model_source,
    ("LoadModel", "vae"): check_vae,
    ("LoadModel", "tokenizer"): check_tokenizer,
    ("LoadModel", "ae"): check_flux_part("ae"),
    ("LoadModel", "clip_l"): check_flux_part("clip_l"),
    ("LoadModel", "t5xxl"): check_flux_part("t5xxl"),
    ("LoRAInject", "init_from"): check_adapter_file,
    ("LoadLoRA", "path"): check_adapter_file,
    ("Embedding", "init_from"): check_embedding_file,
    ("LoadEmbedding", "path"): check_embedding_file,
}
