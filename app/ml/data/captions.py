"""Where a sample's prompt comes from, and the text augmentation applied to it.

Sources follow what kohya and OneTrainer users expect: `<stem>.txt` beside the image (one
non-empty line per variant, one chosen per epoch), one text file for the whole concept, or the
file name. A missing caption falls back by an explicit policy, and the fallback is reported,
because silently training on the folder name surprises users.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

PROMPT_SOURCES = ("per_image", "concept_file", "filename")
MISSING_CAPTION_POLICIES = ("concept_name", "empty", "error")


def caption_path_for(image_path: str | Path) -> Path:
    """`photo.png` -> `photo.txt` (the kohya/OneTrainer pairing; `photo.png.txt` does not pair)."""
    p = Path(image_path)
    return p.with_name(p.stem + ".txt")


MAX_CAPTION_BYTES = 64 * 1024  # far above any prompt a text encoder reads (75-225 tokens)
MAX_CONCEPT_FILE_BYTES = 1024 * 1024  # one line per variant, for a whole concept


@dataclass(frozen=True)
class CaptionText:
    """A caption file's usable lines; `size` is set (the file's bytes) when only its start was read."""

    lines: list[str]
    size: int | None = None

    @property
    def cut(self) -> bool:
        return self.size is not None


def read_caption(path: str | Path, limit: int = MAX_CAPTION_BYTES) -> CaptionText:
    """Non-empty, stripped lines of a caption file (UTF-8, BOM tolerated), reading at most
    `limit` bytes: a huge file is cut at the last whitespace (or whole character) before the
    limit, so it never costs more than that in memory or in every training step.

    An empty list means the file exists but is empty: the caller reports that as a problem.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
            size = None
            if len(raw) > limit:
                size = os.fstat(f.fileno()).st_size
                raw = raw[:limit]
    except OSError as exc:
        raise DataError(f"cannot read caption file ({exc.strerror or exc})", path) from exc
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if size is None or exc.start < len(raw) - 3:
            raise DataError(
                f"caption file is not UTF-8 text (byte {exc.start}); re-save it as UTF-8", path
            ) from exc
        text = raw[: exc.start].decode("utf-8-sig")  # the cut split a character: drop its start
    if size is not None:
        cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
        if cut > len(text) - 1024:  # a word boundary near the end; else keep whole characters
            text = text[:cut]
    return CaptionText([line.strip() for line in text.splitlines() if line.strip()], size)


def read_caption_lines(path: str | Path, limit: int = MAX_CAPTION_BYTES) -> list[str]:
    """The lines of `read_caption` (use that to learn whether the file was cut)."""
    return read_caption(path, limit).lines


def caption_from_filename(path: str | Path) -> str:
    """`sunset_beach.png` -> "sunset beach" (underscores become spaces, whitespace collapsed)."""
    return " ".join(Path(path).stem.replace("_", " ").split())


def choose_line(lines, rng: np.random.Generator) -> str:
    """One line of a multi-line caption; "" when there are none."""
    if not lines:
        return ""
    if len(lines) == 1:
        return lines[0]
    return lines[int(rng.integers(len(lines)))]


@dataclass(frozen=True)
class TextAugment:
    """Caption augmentation, kohya-style.

    keep_tags: the first N tags stay in place (trigger word, class) and are never dropped.
    shuffle_tags: shuffle the remaining tags. tag_dropout: drop each remaining tag with this
    probability. caption_dropout: replace the whole caption by "" with this probability
    (trains the unconditional prediction). delimiter: tag separator (joined back with
    delimiter + space).
    """

    shuffle_tags: bool = False
    keep_tags: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0
    delimiter: str = ","

    def __post_init__(self):
        for name in ("tag_dropout", "caption_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        if self.keep_tags < 0:
            raise ValueError(f"keep_tags must be >= 0, got {self.keep_tags}")
        if not self.delimiter:
            raise ValueError("delimiter must not be empty")

    @property
    def active(self) -> bool:
        return self.shuffle_tags or self.tag_dropout > 0 or self.caption_dropout > 0


def split_tags(text: str, delimiter: str = ",") -> list[str]:
    return [t.strip() for t in text.split(delimiter) if t.strip()]


def augment_caption(text: str, settings: TextAugment, rng: np.random.Generator) -> str:
    """Apply `settings` to `text`; a pure function of the generator's state.

    Draws happen in a fixed order (caption dropout, then shuffle, then tag dropout) with a
    fixed number of draws per call, so results depend only on (text, settings, seed).
    """
    if not settings.active:
        return text
    drop_caption = rng.random() < settings.caption_dropout
    tags = split_tags(text, settings.delimiter)
    keep, rest = tags[: settings.keep_tags], tags[settings.keep_tags :]
    order = rng.permutation(len(rest)) if settings.shuffle_tags else np.arange(len(rest))
    survive = rng.random(len(rest)) >= settings.tag_dropout
    if drop_caption:
        return ""
    rest = [rest[i] for i in order if survive[i]]
    joiner = settings.delimiter if settings.delimiter.isspace() else settings.delimiter + " "
    return joiner.join(keep + rest)


_WS = re.compile(r"\s+")


def normalise_caption(text: str) -> str:
    """Collapse whitespace; used for the concept-file and filename sources."""
    return _WS.sub(" ", text).strip()
