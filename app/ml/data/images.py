"""Finding training images on disk and opening them safely.

Scanning is deterministic (sorted, case-insensitive extensions, recursive) so sample indices and
therefore every seeded draw are stable between runs. kohya's `<repeats>_<name>` folders are
understood because users bring datasets laid out that way. Opening always verifies the file and
turns any decoder failure into a `DataError` that names the file, so a broken image never
surfaces as a bare PIL traceback in the middle of training.
"""
from __future__ import annotations

import errno
import os
import re
import stat
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


@dataclass(frozen=True)
class SkippedEntry:
    """A folder entry the scan could not use (a symlink loop, a broken link, a folder it cannot
    list, a pipe named like an image): skipped and reported, never a reason to fail the scan."""

    path: Path
    rel: str
    kind: str  # one of SKIP_KINDS
    detail: str = ""


SKIP_KINDS = {
    "symlink loop": "symlink loops (a link to a folder above it, or to itself)",
    "broken link": "broken symlinks (the target does not exist)",
    "already scanned": "links to folders already scanned (each folder is read once)",
    "permission denied": "entries that cannot be read (permission denied)",
    "not a file": "entries that are not regular files (pipes, sockets, devices)",
    "unreadable": "entries that cannot be read",
}


@dataclass
class FolderScan:
    """What `scan_folder` found: images in order, plus everything it left out or should mention."""

    images: list[ImageFile]
    skipped: list[SkippedEntry]
    orphan_captions: list[str]  # rel paths of `.txt` files with no image of that stem beside them
    outside_links: list[tuple[str, str]]  # (rel, resolved target) of links leading out of the folder


def scan_images(folder: str | Path, *, recursive: bool = True, check_cancel=None) -> list[ImageFile]:
    """List training images under `folder` in sorted order (see `scan_folder`)."""
    return scan_folder(folder, recursive=recursive, check_cancel=check_cancel).images


def _entry_error(exc: OSError, is_link: bool) -> tuple[str, str]:
    if exc.errno == errno.ELOOP:
        return "symlink loop", ""
    if exc.errno in (errno.ENOENT, errno.ENOTDIR) and is_link:
        return "broken link", ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied", ""
    return "unreadable", exc.strerror or str(exc)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def scan_folder(folder: str | Path, *, recursive: bool = True, check_cancel=None) -> FolderScan:
    """Walk `folder` once: training images in sorted order (masks are paired, never listed),
    entries that cannot be used, orphan caption files, and links leading out of the folder.

    The folder itself may be a kohya `N_name` folder; the nearest such ancestor of an image
    (up to and including `folder`) gives its repeats and name.

    Symlinks: a user may link an images folder in on purpose, so links are followed, also out of
    the dataset folder (listed in `outside_links` so the report names them). Every real folder is
    read at most once, so a link back to a folder above it (a loop) or to a folder already read
    is skipped, and the walk always ends. Only the dataset folder itself must be listable; any
    entry below it that cannot be read is skipped and listed, never fatal.
    """
    root = Path(folder)
    if not root.exists():
        raise DataError("folder does not exist; choose an existing dataset folder", root)
    if not root.is_dir():
        raise DataError("is not a folder; choose the folder that holds the images", root)
    root_real = os.path.realpath(root)
    root_kohya = parse_kohya_folder(root.name)
    out = FolderScan([], [], [], [])
    seen: dict[str, str] = {root_real: ""}  # real folder -> its rel, once read

    def walk(directory: Path, rel_parts: tuple[str, ...], kohya, chain: tuple[str, ...]):
        check_cancelled(check_cancel)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as exc:
            if not rel_parts:
                raise DataError(f"cannot list folder ({exc.strerror or exc}); check permissions", directory) from exc
            kind, detail = _entry_error(exc, False)
            out.skipped.append(SkippedEntry(directory, "/".join(rel_parts), kind, detail))
            return
        names = {e.name for e in entries}
        stems = {os.path.splitext(n)[0] for n in names if is_image_name(n)}
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = "/".join(rel_parts + (entry.name,))
            path = Path(entry.path)
            try:
                is_link = entry.is_symlink()
                if is_link:
                    st = os.stat(entry.path)  # follows the link: ELOOP / ENOENT say loop / broken
                    is_dir, is_file = stat.S_ISDIR(st.st_mode), stat.S_ISREG(st.st_mode)
                else:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    is_file = not is_dir and entry.is_file(follow_symlinks=False)
            except OSError as exc:
                if is_image_name(entry.name) or is_link:
                    kind, detail = _entry_error(exc, is_link)
                    out.skipped.append(SkippedEntry(path, rel, kind, detail))
                continue
            real = os.path.realpath(entry.path) if is_link else None
            if is_dir:
                if not recursive:
                    continue
                real = real or os.path.realpath(entry.path)
                if real in chain:
                    out.skipped.append(SkippedEntry(path, rel, "symlink loop", f"back to {seen[real] or '.'}"))
                    continue
                if _inside(root_real, real):  # a folder holding the dataset folder: it leads back in
                    out.skipped.append(SkippedEntry(path, rel, "symlink loop", f"to {real}, which holds the dataset"))
                    continue
                if real in seen:
                    out.skipped.append(SkippedEntry(path, rel, "already scanned", f"as {seen[real] or '.'}"))
                    continue
                seen[real] = rel
                if is_link and not _inside(real, root_real):
                    out.outside_links.append((rel, real))
                sub = parse_kohya_folder(entry.name) or kohya
                walk(path, rel_parts + (entry.name,), sub, chain + (real,))
                continue
            if entry.name.lower().endswith(".txt"):
                if is_file and os.path.splitext(entry.name)[0] not in stems:
                    out.orphan_captions.append(rel)
                continue
            if not is_image_name(entry.name) or is_mask_name(entry.name):
                continue
            if not is_file:
                out.skipped.append(SkippedEntry(path, rel, "not a file"))
                continue
            if is_link and not _inside(real, root_real):
                out.outside_links.append((rel, real))
            mask = mask_path_for(path)
            out.images.append(
                ImageFile(
                    path=path,
                    rel=rel,
                    repeats=kohya[0] if kohya else None,
                    folder_name=kohya[1] if kohya else None,
                    mask_path=mask if mask.name in names else None,
                )
            )

    walk(root, (), root_kohya, (root_real,))
    return out


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
