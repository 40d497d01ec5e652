"""Finding training images on disk and opening them safely.

Scanning is deterministic (sorted, case-insensitive extensions, recursive) so sample indices and
therefore every seeded draw are stable between runs. kohya's `<repeats>_<name>` folders are
understood because users bring datasets laid out that way. Opening always verifies the file and
turns any decoder failure into a `DataError` that names the file, so a broken image never
surfaces as a bare PIL traceback in the middle of training.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import DataError, check_cancelled

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MASK_SUFFIX = "-masklabel"
_KOHYA = re.compile(r"^(\d+)_(.+)$")
_ORIENTATION_TAG = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}


@dataclass(frozen=True)
class ImageFile:
    """An image found by `scan_images`, before it is opened."""

    path: Path
    rel: str  # path relative to the scanned folder, "/"-separated
    repeats: int | None  # from the nearest kohya `N_name` folder, if any
    folder_name: str | None  # the `name` of that kohya folder
    mask_path: Path | None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def is_mask_name(name: str) -> bool:
    stem, ext = os.path.splitext(name)
    return ext.lower() == ".png" and stem.endswith(MASK_SUFFIX)


def mask_path_for(image_path: Path) -> Path:
    """`photo.jpg` -> `photo-masklabel.png` (white = learn, black = less weight)."""
    return image_path.with_name(image_path.stem + MASK_SUFFIX + ".png")


def parse_kohya_folder(name: str) -> tuple[int, str] | None:
    """`"10_ohwx man"` -> `(10, "ohwx man")`; anything else -> None."""
    m = _KOHYA.match(name)
    if not m:
        return None
    return int(m.group(1)), m.group(2).strip()


def scan_images(folder: str | Path, *, recursive: bool = True, check_cancel=None) -> list[ImageFile]:
    """List training images under `folder` in sorted order; masks are paired, never listed.

    The folder itself may be a kohya `N_name` folder; the nearest such ancestor of an image
    (up to and including `folder`) gives its repeats and name.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError("folder does not exist; choose an existing dataset folder", root)
    if not root.is_dir():
        raise DataError("is not a folder; choose the folder that holds the images", root)
    root_kohya = parse_kohya_folder(root.name)
    found: list[ImageFile] = []

    def walk(directory: Path, rel_parts: tuple[str, ...], kohya):
        check_cancelled(check_cancel)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot list folder ({exc.strerror or exc}); check permissions", directory) from exc
        names = {e.name for e in entries}
        for entry in entries:
            if entry.is_dir(follow_symlinks=True):
                if recursive and not entry.name.startswith("."):
                    sub = parse_kohya_folder(entry.name) or kohya
                    walk(Path(entry.path), rel_parts + (entry.name,), sub)
                continue
            if entry.name.startswith(".") or not is_image_name(entry.name) or is_mask_name(entry.name):
                continue
            path = Path(entry.path)
            mask = mask_path_for(path)
            found.append(
                ImageFile(
                    path=path,
                    rel="/".join(rel_parts + (entry.name,)),
                    repeats=kohya[0] if kohya else None,
                    folder_name=kohya[1] if kohya else None,
                    mask_path=mask if mask.name in names else None,
                )
            )

    walk(root, (), root_kohya)
    return found


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block should not make a good image unusable
        return 1


def read_image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), read from the header only."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            if _orientation(img) in _TRANSPOSED_ORIENTATIONS:
                w, h = h, w
            return w, h
    except DataError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc


def verify_image(path: str | Path, *, full: bool = True) -> tuple[int, int]:
    """Check that the file decodes; return its displayed (width, height).

    `full=True` decodes the pixel data, which is the only way to catch a truncated JPEG; for
    JPEG it decodes at 1/8 scale (draft), which still reads every byte of the stream.
    """
    try:
        with Image.open(path) as img:
            fmt = img.format
            img.verify()  # checks structure/CRCs; must come first, the image is unusable afterwards
        with Image.open(path) as img:
            w, h = img.size
            orient = _orientation(img)
            if full:
                if fmt == "JPEG":
                    img.draft(img.mode, (max(1, w // 8), max(1, h // 8)))
                img.load()
    except DataError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc
    if orient in _TRANSPOSED_ORIENTATIONS:
        w, h = h, w
    if w < 1 or h < 1:
        raise DataError("image has zero size; remove or replace it", path)
    return w, h


def _open_error(path, exc: Exception) -> DataError:
    if isinstance(exc, FileNotFoundError):
        return DataError("file not found (moved or deleted since the scan?)", path)
    if isinstance(exc, PermissionError):
        return DataError("cannot read file (permission denied); fix its permissions", path)
    if isinstance(exc, Image.DecompressionBombWarning | Image.DecompressionBombError):
        return DataError(f"image is implausibly large ({exc}); resize it", path)
    return DataError(
        f"cannot decode image ({type(exc).__name__}: {exc}); the file is corrupt or truncated — "
        "re-export it or remove it from the folder",
        path,
    )


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB. Alpha is composited on white; 16-bit is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1.0 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_image_rgb(path: str | Path, *, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image as upright 8-bit RGB; errors become a `DataError` naming the file.

    `draft_size` (displayed width, height) lets JPEG decode at a reduced scale that is still
    at least that big — much faster when the target bucket is smaller than the photo.
    """
    try:
        with Image.open(path) as img:
            orient = _orientation(img)
            if draft_size is not None and img.format == "JPEG":
                dw, dh = draft_size
                if orient in _TRANSPOSED_ORIENTATIONS:
                    dw, dh = dh, dw
                img.draft("RGB", (max(1, int(dw)), max(1, int(dh))))
            img.load()
            if orient != 1:
                img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except DataError:
        raise
    except Exception as exc:
        raise _open_error(path, exc) from exc


def open_mask(path: str | Path) -> Image.Image:
    """Open a mask as 8-bit grayscale ("L"), upright; white = learn."""
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I", "F"):
                img = to_rgb(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                img = to_rgb(img)
            return img.convert("L")
    except Exception as exc:
        raise _open_error(path, exc) from exc
