"""Concepts (one folder of images with its own settings), datasets, and what an epoch contains.

A concept keeps its own caption source, balancing, loss weight and augmentation, the way
OneTrainer's concept tab does. Scanning produces a report (counts and every problem, by file
name) that the user sees before training: nothing is dropped silently.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .augment import AugmentSettings
from .captions import (
    MAX_CAPTION_BYTES,
    MAX_CONCEPT_FILE_BYTES,
    MISSING_CAPTION_POLICIES,
    PROMPT_SOURCES,
    TextAugment,
    caption_from_filename,
    caption_path_for,
    read_caption,
)
from .errors import DataError, Problem, check_cancelled
from .images import SKIP_KINDS, SkippedEntry, read_image_size, scan_folder, verify_image
from .rng import permutation, stable_key

CONCEPT_TYPES = ("standard", "validation", "prior")
ENTRY_NAMES_SHOWN = 5  # names listed per kind of skipped folder entry; the rest are counted
BALANCING = ("repeats", "samples")
BAD_IMAGE_POLICIES = ("skip", "error")
VERIFY_MODES = ("full", "header")
IGNORE_FILE = ".nodetrainer-ignore"  # images left out of the concept, one relative path a line


def read_ignore_list(folder: str | Path) -> list[str]:
    """The relative paths ("/"-separated, as `Sample.rel`) listed in the folder's ignore file, in order;
    blank lines and lines starting with '#' are skipped. No file: an empty list."""
    path = Path(folder) / IGNORE_FILE
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the ignore list ({exc}); fix or delete the file", path) from None
    out = []
    for line in text.splitlines():
        line = line.strip().replace("\\", "/")
        if line and not line.startswith("#") and line not in out:
            out.append(line)
    return out


def write_ignore_list(folder: str | Path, rels) -> Path:
    """Write the ignore list atomically (the dataset browser's "exclude"); an empty list leaves only the
    header comment, so the user still sees where exclusions live."""
    from app.atomic import atomic_file

    path = Path(folder) / IGNORE_FILE
    body = ("# images left out of training by NodeTrainer's Concept node (one path a line, relative to "
            "this folder); delete a line to include the image again\n"
            + "".join(f"{r}\n" for r in sorted(set(rels))))
    try:
        with atomic_file(path, overwrite=True) as t:
            t.tmp.write_text(body, encoding="utf-8")
    except OSError as exc:
        raise DataError(f"cannot write the ignore list ({exc})", path) from None
    return path


@dataclass(frozen=True)
class ConceptSettings:
    """What the user sets per concept.

    repeats: float; combined (multiplied) with a kohya `N_name` folder's N. Fractions take a
    share per epoch (0.0072 of 5,000 images = 36 per epoch, rotating through all of them).
    samples_per_epoch + balancing="samples": a fixed number of samples per epoch instead.
    caption_file: the text file for prompt_source="concept_file" (relative to the folder).
    resolution: overrides the dataset's bucket resolution for this concept ("768", "512,768").
    verify: "full" decodes every image while scanning (catches truncated files before
    training); "header" only checks the header (faster for huge datasets).
    """

    name: str
    folder: str | Path
    prompt_source: str = "per_image"
    caption_file: str | Path | None = None
    missing_caption: str = "concept_name"
    repeats: float = 1.0
    samples_per_epoch: int | None = None
    balancing: str = "repeats"
    loss_weight: float = 1.0
    concept_type: str = "standard"
    text_augment: TextAugment = field(default_factory=TextAugment)
    augment: AugmentSettings = field(default_factory=AugmentSettings)
    on_bad_image: str = "skip"
    resolution: str | None = None
    recursive: bool = True
    verify: str = "full"

    def __post_init__(self):
        def check(value, allowed, what):
            if value not in allowed:
                raise ValueError(f"concept '{self.name}': {what} must be one of {allowed}, got {value!r}")

        check(self.prompt_source, PROMPT_SOURCES, "prompt_source")
        check(self.missing_caption, MISSING_CAPTION_POLICIES, "missing_caption")
        check(self.balancing, BALANCING, "balancing")
        check(self.concept_type, CONCEPT_TYPES, "concept_type")
        check(self.on_bad_image, BAD_IMAGE_POLICIES, "on_bad_image")
        check(self.verify, VERIFY_MODES, "verify")
        if not (self.repeats >= 0 and math.isfinite(self.repeats)):
            raise ValueError(f"concept '{self.name}': repeats must be a number >= 0, got {self.repeats}")
        if self.balancing == "samples" and (self.samples_per_epoch is None or self.samples_per_epoch < 0):
            raise ValueError(f"concept '{self.name}': balancing='samples' needs samples_per_epoch >= 0")
        if self.prompt_source == "concept_file" and not self.caption_file:
            raise ValueError(f"concept '{self.name}': prompt_source='concept_file' needs caption_file")
        if self.loss_weight < 0:
            raise ValueError(f"concept '{self.name}': loss_weight must be >= 0, got {self.loss_weight}")


@dataclass(frozen=True)
class Sample:
    """One usable image of a concept."""

    path: Path
    rel: str
    size: tuple[int, int]  # displayed (width, height)
    caption_lines: tuple[str, ...]
    caption_source: str  # "file", "concept_file", "filename", "concept_name", "empty"
    mask_path: Path | None
    repeats: float
    concept_index: int
    key: int  # stable rng index (from concept name + relative path)


@dataclass
class ScanReport:
    """What the scan found; shown to the user before training."""

    concept: str
    folder: str
    images: int = 0  # usable images
    files: int = 0  # image files found (usable + skipped)
    captions_found: int = 0
    captions_missing: int = 0
    masks_found: int = 0
    masks_missing: int = 0
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped_entries: list[SkippedEntry] = field(default_factory=list)  # loops, broken links, ...
    orphan_captions: list[str] = field(default_factory=list)  # rel paths of .txt with no image
    outside_links: list[tuple[str, str]] = field(default_factory=list)  # (rel, target) followed
    ignored: list[str] = field(default_factory=list)  # rel paths left out by the folder's IGNORE_FILE

    def entry_warnings(self, shown: int = ENTRY_NAMES_SHOWN) -> list[str]:
        """One line per kind of folder entry left out (a count and the first names), one for
        orphan captions and one for links followed out of the folder: a dataset with ten
        thousand broken links gives three lines, not ten thousand."""

        def names(items: list[str]) -> str:
            more = f" and {len(items) - shown} more" if len(items) > shown else ""
            return ", ".join(items[:shown]) + more

        out = []
        for kind, what in SKIP_KINDS.items():
            group = [e for e in self.skipped_entries if e.kind == kind]
            if group:
                out.append(f"skipped {len(group)} {what}: "
                           + names([f"{e.rel} ({e.detail})" if e.detail else e.rel for e in group]))
        if self.orphan_captions:
            out.append(f"{len(self.orphan_captions)} caption files have no image of the same name beside them "
                       f"and are not used: {names(self.orphan_captions)}")
        if self.ignored:
            out.append(f"left out {len(self.ignored)} images listed in {IGNORE_FILE} (the dataset browser's "
                       f"'exclude'): {names(self.ignored)}")
        if self.outside_links:
            out.append(f"followed {len(self.outside_links)} symlinks out of the dataset folder: "
                       + names([f"{rel} -> {target}" for rel, target in self.outside_links]))
        return out

    @property
    def skipped(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        lines = [
            f"concept '{self.concept}' ({self.folder}): {self.images} of {self.files} images usable, "
            f"captions {self.captions_found} found / {self.captions_missing} missing, "
            f"masks {self.masks_found} found / {self.masks_missing} missing"
        ]
        lines += [f"  note: {n}" for n in self.notes]
        lines += [f"  warning: {w}" for w in self.entry_warnings()]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class Concept:
    settings: ConceptSettings
    index: int
    samples: tuple[Sample, ...]
    report: ScanReport

    @property
    def name(self) -> str:
        return self.settings.name


@dataclass(frozen=True)
class Dataset:
    """Several concepts, each keeping its own settings; indices are positions in `concepts`."""

    concepts: tuple[Concept, ...]

    def sample(self, concept_index: int, sample_index: int) -> Sample:
        return self.concepts[concept_index].samples[sample_index]

    @property
    def training_concepts(self) -> tuple[Concept, ...]:
        return tuple(c for c in self.concepts if c.settings.concept_type != "validation")

    @property
    def validation_concepts(self) -> tuple[Concept, ...]:
        return tuple(c for c in self.concepts if c.settings.concept_type == "validation")

    @property
    def problems(self) -> list[Problem]:
        return [p for c in self.concepts for p in c.report.problems]

    def summary(self) -> str:
        return "\n".join(c.report.summary() for c in self.concepts)


def _check_unique_names(names: list[str]) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"concept names must be unique; rename {dupes}")


def combine(concepts) -> Dataset:
    """A dataset from separately scanned concepts, re-indexed by position (names must be unique)."""
    concepts = list(concepts)
    _check_unique_names([c.name for c in concepts])
    out = []
    for i, c in enumerate(concepts):
        if c.index != i:
            c = replace(c, index=i, samples=tuple(replace(s, concept_index=i) for s in c.samples))
        out.append(c)
    return Dataset(tuple(out))


def _resolve(folder: Path, p: str | Path) -> Path:
    p = Path(p)
    return p if p.is_absolute() else folder / p


def _too_many(problems: list[Problem], concept: str, what: str) -> DataError:
    shown = "; ".join(f"{p.path}: {p.message}" for p in problems[:10])
    more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
    first = problems[0].path if problems else None
    return DataError(f"{len(problems)} {what}{more}: {shown}", first, concept)


def _cut_message(size: int, limit: int, lines: int | None = None) -> str:
    if lines is not None:  # the concept's one caption file: many variants, one line each
        return (f"concept caption file is {size / 1024:,.0f} KB; only its first {limit // 1024} KB "
                f"({lines} lines) are used; shorten it or split the concept")
    return (f"caption file is {size / 1024:,.0f} KB; only its first {limit // 1024} KB are used (cut at a word "
            "boundary) — a caption longer than that is never read by a text encoder; shorten it")


def scan_concept(settings: ConceptSettings, index: int = 0, *, progress=None, check_cancel=None, log=None) -> Concept:
    """Scan a concept folder: verify images, pair captions and masks, count everything.

    With on_bad_image="error" any unusable image raises a `DataError` (listing every bad file)
    here, before training starts; with "skip" they are left out and listed in the report.
    """
    name = settings.name
    folder = Path(settings.folder)
    try:
        found = scan_folder(folder, recursive=settings.recursive, check_cancel=check_cancel)
    except DataError as exc:
        raise DataError(exc.reason, exc.path, name) from exc
    files = found.images
    ignored = set(read_ignore_list(folder))
    left_out: list[str] = []
    if ignored:
        left_out = [f.rel for f in files if f.rel in ignored]
        files = [f for f in files if f.rel not in ignored]
    n_ignored = len(left_out)
    if not files and n_ignored:
        raise DataError(f"every image is excluded by {IGNORE_FILE}; remove lines from it (or the file) to "
                        "train on them", folder, name)
    if not files:
        left_out = ScanReport(name, str(folder), skipped_entries=found.skipped).entry_warnings()
        raise DataError(
            "folder contains no images (looked for .png .jpg .jpeg .webp .bmp, including subfolders); "
            "choose a folder with images" + "".join(f"; {w}" for w in left_out),
            folder,
            name,
        )
    report = ScanReport(concept=name, folder=str(folder), files=len(files), skipped_entries=found.skipped,
                        outside_links=found.outside_links)
    if settings.prompt_source == "per_image":
        report.orphan_captions = found.orphan_captions
    if n_ignored:
        report.notes.append(f"{n_ignored} images are excluded by {IGNORE_FILE} in the folder")
        report.ignored = left_out

    concept_lines: tuple[str, ...] = ()
    if settings.prompt_source == "concept_file":
        cfile = _resolve(folder, settings.caption_file)
        if not cfile.is_file():
            raise DataError("concept caption file not found; choose an existing text file", cfile, name)
        text = read_caption(cfile, MAX_CONCEPT_FILE_BYTES)
        if text.cut:
            report.problems.append(Problem(str(cfile), _cut_message(text.size, MAX_CONCEPT_FILE_BYTES, len(text.lines)),
                                           name, "warning"))
        concept_lines = tuple(text.lines)
        if not concept_lines:
            raise DataError("concept caption file is empty; write at least one caption line", cfile, name)

    samples: list[Sample] = []
    missing_caption_errors: list[Problem] = []
    fallback_count = 0
    for i, f in enumerate(files):
        check_cancelled(check_cancel)
        if progress is not None:
            progress(i, len(files))
        try:
            size = verify_image(f.path) if settings.verify == "full" else read_image_size(f.path)
        except DataError as exc:
            report.problems.append(Problem(str(f.path), exc.reason, name, "error"))
            continue

        source = "file"
        lines: tuple[str, ...] = ()
        if settings.prompt_source == "concept_file":
            lines, source = concept_lines, "concept_file"
        elif settings.prompt_source == "filename":
            lines, source = (caption_from_filename(f.path),), "filename"
        else:
            cpath = caption_path_for(f.path)
            reason = None
            if cpath.is_file():
                try:
                    text = read_caption(cpath, MAX_CAPTION_BYTES)
                except DataError as exc:
                    report.problems.append(Problem(str(cpath), exc.reason, name, "warning"))
                    reason = "unreadable"
                else:
                    lines = tuple(text.lines)
                    if text.cut:
                        report.problems.append(Problem(str(cpath), _cut_message(text.size, MAX_CAPTION_BYTES),
                                                       name, "warning"))
                    if lines:
                        report.captions_found += 1
                    else:
                        report.problems.append(
                            Problem(str(cpath), "caption file is empty; write a caption or delete the file", name, "warning")
                        )
                        reason = "empty"
            else:
                reason = "missing"
            if not lines:
                report.captions_missing += 1
                if settings.missing_caption == "error":
                    hint = ""
                    odd = f.path.with_name(f.path.name + ".txt")
                    if odd.is_file():
                        hint = f" ({odd.name} does not pair: rename it to {cpath.name})"
                    missing_caption_errors.append(
                        Problem(str(f.path), f"no caption ({reason}: {cpath.name}){hint}", name, "error")
                    )
                elif settings.missing_caption == "concept_name":
                    lines, source = (f.folder_name or name,), "concept_name"
                    fallback_count += 1
                else:
                    lines, source = ("",), "empty"
                    fallback_count += 1

        if f.mask_path is not None:
            report.masks_found += 1
        else:
            report.masks_missing += 1
        repeats = settings.repeats * (f.repeats if f.repeats is not None else 1)
        samples.append(
            Sample(
                path=f.path,
                rel=f.rel,
                size=size,
                caption_lines=lines,
                caption_source=source,
                mask_path=f.mask_path,
                repeats=repeats,
                concept_index=index,
                key=stable_key(name, f.rel),
            )
        )
    if progress is not None:
        progress(len(files), len(files))

    if missing_caption_errors:
        raise _too_many(missing_caption_errors, name, "images have no caption and missing_caption='error'")
    if report.skipped and settings.on_bad_image == "error":
        raise _too_many(report.skipped, name, "images cannot be used and on_bad_image='error'")
    if fallback_count:
        what = "the concept/folder name" if settings.missing_caption == "concept_name" else "an empty caption"
        report.notes.append(f"{fallback_count} images have no caption and train with {what}")
    if report.masks_found and report.masks_missing:
        report.notes.append(f"{report.masks_missing} images have no mask (-masklabel.png) and train unmasked")
    report.images = len(samples)
    if not samples:
        raise DataError(
            f"no usable images: all {len(files)} files were skipped ({report.skipped[0].message} ...)",
            folder,
            name,
        )
    if log is not None:
        log(report.summary())
    return Concept(settings=settings, index=index, samples=tuple(samples), report=report)


def scan_dataset(settings_list, *, progress=None, check_cancel=None, log=None) -> Dataset:
    """Scan several concepts; progress counts concepts done (value, total)."""
    settings_list = list(settings_list)
    if not settings_list:
        raise DataError("the dataset has no concepts; add at least one concept")
    _check_unique_names([s.name for s in settings_list])
    concepts = []
    for i, s in enumerate(settings_list):
        if progress is not None:
            progress(i, len(settings_list))
        concepts.append(scan_concept(s, i, check_cancel=check_cancel, log=log))
    if progress is not None:
        progress(len(settings_list), len(settings_list))
    return Dataset(tuple(concepts))


def _window(n: int, rate: float, seed: int, epoch: int, index, purpose: str) -> list[int]:
    """Positions taken in `epoch` when taking `rate` items per epoch from shuffled cycles of n.

    Epoch e takes positions floor(e*rate) .. floor((e+1)*rate) of an endless sequence of
    permutations, so counts average exactly `rate` and every item is seen before any repeats.
    """
    if n == 0 or rate <= 0:
        return []
    eps = 1e-9 * max(1.0, rate)
    start = math.floor(epoch * rate + eps)
    end = math.floor((epoch + 1) * rate + eps)
    out, perms = [], {}
    for p in range(start, end):
        cycle = p // n
        if cycle not in perms:
            perms[cycle] = permutation(n, seed, index, purpose, cycle)
        out.append(int(perms[cycle][p % n]))
    return out


def concept_epoch_samples(concept: Concept, seed: int, epoch: int) -> list[int]:
    """Sample indices of one concept for one epoch (unshuffled; plan_epoch shuffles)."""
    s = concept.settings
    n = len(concept.samples)
    if s.balancing == "samples":
        return _window(n, float(s.samples_per_epoch), seed, epoch, (concept.index, 0), "balance")
    groups: dict[float, list[int]] = {}
    for i, smp in enumerate(concept.samples):
        groups.setdefault(smp.repeats, []).append(i)
    out: list[int] = []
    for g, (repeats, members) in enumerate(sorted(groups.items())):
        whole = math.floor(repeats + 1e-9)
        frac = repeats - whole
        for _ in range(whole):
            out.extend(members)
        if frac > 1e-9:
            picked = _window(len(members), len(members) * frac, seed, epoch, (concept.index, g + 1), "balance")
            out.extend(members[i] for i in picked)
    return sorted(out)


def epoch_samples(dataset: Dataset, seed: int, epoch: int) -> list[tuple[int, int]]:
    """(concept index, sample index) pairs of one training epoch; validation concepts excluded."""
    return [
        (c.index, i)
        for c in dataset.training_concepts
        for i in concept_epoch_samples(c, seed, epoch)
    ]


def validation_samples(dataset: Dataset) -> list[tuple[int, int]]:
    """Every sample of the validation concepts, once (used for validation loss only)."""
    return [(c.index, i) for c in dataset.validation_concepts for i in range(len(c.samples))]


def iterations_per_epoch(dataset: Dataset, batch_size: int, seed: int = 0, epoch: int = 0) -> int:
    """ceil(samples / batch_size): an upper bound before bucketing (plan_epoch gives the exact count)."""
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    return math.ceil(len(epoch_samples(dataset, seed, epoch)) / batch_size)
