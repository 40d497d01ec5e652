"""The dataset browser: a Concept folder's images with their captions, edited in place.

Opened from a Concept node (right-click > Browse dataset..., or View > Browse the focused dataset).
It shows thumbnails with their `<stem>.txt` captions; captions are edited with undo/redo, changed
across many images with find-and-replace, and read as a tag frequency list; the view filters by
bucket, caption length, missing caption and text; images can be excluded from training, which
writes `.nodetrainer-ignore` in the folder (the Concept node honours it).

Nothing touches the folder until Save: then each changed caption is written atomically, the
previous text kept as `<stem>.txt.bak`, and the ignore list rewritten. The text cache is keyed by
caption text (app/ml/data/cache.py), so exactly the edited captions are encoded again on the next
Cache run; the latent cache, keyed by image content, is not touched.

`BrowserModel` is plain Python (tested without a window); `DatasetBrowser` is its Dear PyGui
window. Neither imports torch.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import dearpygui.dearpygui as dpg

THUMB_SIDE = 112
PAGE = 24  # cards per page: a 5,000-image folder never makes 5,000 textures
DEFAULT_RESOLUTION = 512
BUCKET_QUANTIZATION = 64
RESOLUTIONS = (512, 768, 1024)


@dataclass
class Entry:
    rel: str
    path: Path
    size: tuple[int, int]
    bucket: str
    caption: str  # the text being edited (lines joined by "\n")
    saved: str  # what the caption file holds ("" when there is none)
    has_file: bool
    excluded: bool = False


@dataclass
class Filter:
    text: str = ""
    bucket: str = ""  # "" = every bucket
    min_words: int = 0
    max_words: int = 0  # 0 = no limit
    missing_only: bool = False
    show_excluded: bool = True
    tag: str = ""


@dataclass
class SaveResult:
    captions: list[str] = field(default_factory=list)  # rel paths written
    backups: list[Path] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)  # emptied captions: the file moved to a backup
    ignore_written: bool = False

    def message(self) -> str:
        parts = [f"{len(self.captions)} captions saved" if self.captions else "no caption changed"]
        if self.removed:
            parts.append(f"{len(self.removed)} emptied captions moved to .bak")
        if self.backups:
            parts.append(f"previous text kept in {len(self.backups)} .bak files")
        if self.ignore_written:
            parts.append("exclusions written to .nodetrainer-ignore")
        if self.captions or self.removed:
            parts.append(f"the next Cache run encodes only these {len(self.captions) + len(self.removed)} captions")
        return "; ".join(parts)


def _natural(rel: str) -> list:
    """img2 before img10, as a file manager orders them."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p.lower()) for p in re.split(r"(\d+)", rel)]


def _words(text: str) -> int:
    return len(text.split())


class BrowserModel:
    """A folder's images and captions with edits, undo/redo, find-and-replace, tags, filters and save."""

    def __init__(self, folder, entries: list[Entry], *, delimiter: str = ",", problems: list[str] | None = None):
        self.folder = Path(folder)
        self.entries = entries
        self.by_rel = {e.rel: e for e in entries}
        self.delimiter = delimiter or ","
        self.problems = problems or []
        self._undo: list[list[tuple[str, str, object, object]]] = []
        self._redo: list[list[tuple[str, str, object, object]]] = []
        self._open_edit: str | None = None  # rel whose typing merges into the last undo step
        self._saved_excluded = {e.rel for e in entries if e.excluded}
        self.resolution = DEFAULT_RESOLUTION

    @classmethod
    def load(cls, folder, *, delimiter: str = ",", resolution: int = DEFAULT_RESOLUTION,
             recursive: bool = True) -> "BrowserModel":
        """Scan the folder as Concept does (ignored images included, marked), reading image headers only."""
        from app.ml.data.bucketing import bucket_sizes, nearest_bucket
        from app.ml.data.captions import caption_path_for, read_caption
        from app.ml.data.concept import read_ignore_list
        from app.ml.data.errors import DataError
        from app.ml.data.images import read_image_size, scan_folder

        folder = Path(folder)
        found = scan_folder(folder, recursive=recursive)
        ignored = set(read_ignore_list(folder))
        buckets = bucket_sizes(int(resolution), BUCKET_QUANTIZATION)
        entries, problems = [], []
        for f in found.images:
            try:
                size = read_image_size(f.path)
            except DataError as exc:
                problems.append(f"{f.rel}: {exc.reason}")
                continue
            b = nearest_bucket(size, buckets)
            cpath = caption_path_for(f.path)
            text, has = "", cpath.is_file()
            if has:
                try:
                    text = "\n".join(read_caption(cpath).lines)
                except DataError as exc:
                    problems.append(f"{cpath.name}: {exc.reason}")
            entries.append(Entry(rel=f.rel, path=f.path, size=size, bucket="%dx%d" % b, caption=text, saved=text,
                                 has_file=has, excluded=f.rel in ignored))
        entries.sort(key=lambda e: _natural(e.rel))
        model = cls(folder, entries, delimiter=delimiter, problems=problems)
        model.resolution = int(resolution)
        return model

    def set_resolution(self, resolution: int) -> None:
        """Bucket labels at another training resolution (the Bucketer's), for the bucket filter."""
        from app.ml.data.bucketing import bucket_sizes, nearest_bucket

        buckets = bucket_sizes(int(resolution), BUCKET_QUANTIZATION)
        for e in self.entries:
            e.bucket = "%dx%d" % nearest_bucket(e.size, buckets)
        self.resolution = int(resolution)

    # ---- edits ------------------------------------------------------------------------------------
    def _apply(self, changes, forward: bool = True) -> None:
        for rel, what, old, new in changes:
            setattr(self.by_rel[rel], what, new if forward else old)

    def _push(self, changes) -> None:
        if changes:
            self._apply(changes)
            self._undo.append(changes)
            self._redo.clear()

    def set_caption(self, rel: str, text: str, *, typing: bool = False) -> None:
        """One caption's new text. `typing`: keystrokes in the same caption merge into one undo step."""
        e = self.by_rel[rel]
        if text == e.caption:
            return
        if typing and self._open_edit == rel and self._undo and self._undo[-1][0][:2] == (rel, "caption"):
            r, what, old, _ = self._undo[-1][0]
            self._undo[-1] = [(r, what, old, text)]
            e.caption = text
            self._redo.clear()
            return
        self._push([(rel, "caption", e.caption, text)])
        self._open_edit = rel if typing else None

    def set_excluded(self, rel: str, excluded: bool) -> None:
        e = self.by_rel[rel]
        self._open_edit = None
        if e.excluded != bool(excluded):
            self._push([(rel, "excluded", e.excluded, bool(excluded))])

    def replace_all(self, find: str, replace: str, *, regex: bool = False, case: bool = True,
                    rels=None) -> int:
        """Replace in every caption of `rels` (default: all); one undo step. Returns captions changed."""
        if not find:
            return 0
        flags = 0 if case else re.IGNORECASE
        pattern = re.compile(find if regex else re.escape(find), flags)
        changes = []
        for e in (self.entries if rels is None else [self.by_rel[r] for r in rels]):
            new = pattern.sub(replace if regex else (lambda _m: replace), e.caption)
            if new != e.caption:
                changes.append((e.rel, "caption", e.caption, new))
        self._open_edit = None
        self._push(changes)
        return len(changes)

    def undo(self) -> bool:
        self._open_edit = None
        if not self._undo:
            return False
        step = self._undo.pop()
        self._apply(reversed(step), forward=False)
        self._redo.append(step)
        return True

    def redo(self) -> bool:
        self._open_edit = None
        if not self._redo:
            return False
        step = self._redo.pop()
        self._apply(step)
        self._undo.append(step)
        return True

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    # ---- views ------------------------------------------------------------------------------------
    def changed(self) -> list[Entry]:
        return [e for e in self.entries if e.caption.strip() != e.saved.strip()]

    @property
    def dirty(self) -> bool:
        return bool(self.changed()) or {e.rel for e in self.entries if e.excluded} != self._saved_excluded

    def tags(self, include_excluded: bool = False) -> list[tuple[str, int]]:
        """Tags (caption parts split by the delimiter) by how many images use them, most used first."""
        from app.ml.data.captions import split_tags

        counts: Counter = Counter()
        for e in self.entries:
            if e.excluded and not include_excluded:
                continue
            counts.update({t for line in e.caption.splitlines() for t in split_tags(line, self.delimiter)})
        return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))

    def buckets(self) -> list[tuple[str, int]]:
        return sorted(Counter(e.bucket for e in self.entries).items(), key=lambda kv: (-kv[1], kv[0]))

    def visible(self, f: Filter) -> list[Entry]:
        from app.ml.data.captions import split_tags

        out = []
        needle = f.text.lower().strip()
        for e in self.entries:
            if e.excluded and not f.show_excluded:
                continue
            if f.missing_only and e.caption.strip():
                continue
            if f.bucket and e.bucket != f.bucket:
                continue
            n = _words(e.caption)
            if n < f.min_words or (f.max_words and n > f.max_words):
                continue
            if needle and needle not in e.caption.lower() and needle not in e.rel.lower():
                continue
            if f.tag and f.tag not in {t for line in e.caption.splitlines() for t in split_tags(line, self.delimiter)}:
                continue
            out.append(e)
        return out

    # ---- save -------------------------------------------------------------------------------------
    def save(self) -> SaveResult:
        """Write the changed captions (atomically, the old text kept as .bak) and the ignore list."""
        from app.ml.data.captioning import backup_path, write_text_file
        from app.ml.data.captions import caption_path_for
        from app.ml.data.concept import write_ignore_list

        result = SaveResult()
        for e in self.changed():
            cpath = caption_path_for(e.path)
            if e.caption.strip():
                b = write_text_file(cpath, e.caption.strip())
                if b is not None:
                    result.backups.append(b)
                result.captions.append(e.rel)
                e.has_file = True
            elif cpath.exists():  # emptied: the file is moved aside, never deleted
                b = backup_path(cpath)
                cpath.replace(b)
                result.backups.append(b)
                result.removed.append(e.rel)
                e.has_file = False
            e.caption = e.caption.strip()
            e.saved = e.caption
        excluded = {e.rel for e in self.entries if e.excluded}
        if excluded != self._saved_excluded:
            write_ignore_list(self.folder, sorted(excluded) + self._read_ignore_others())
            self._saved_excluded = excluded
            result.ignore_written = True
        return result

    def _read_ignore_others(self) -> list[str]:
        """Lines of the ignore list that name no image here (kept: a subfolder scanned elsewhere)."""
        from app.ml.data.concept import read_ignore_list

        return [r for r in read_ignore_list(self.folder) if r not in self.by_rel]


def thumbnail_png(path: Path, side: int = THUMB_SIDE) -> bytes | None:
    from app.ml.data.errors import DataError
    from app.ml.data.images import open_image_rgb

    try:
        img = open_image_rgb(path, draft_size=(side, side))
    except DataError:
        return None
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class DatasetBrowser:
    """The browser window over a BrowserModel; `say(text, error)` reports to the editor's status bar."""

    def __init__(self, model: BrowserModel, textures, *, title: str = "", say=None, on_close=None,
                 pos=(60, 50), size=(1180, 820)) -> None:
        self.model = model
        self.textures = textures
        self.say = say or (lambda text, error=False: None)
        self.on_close = on_close
        self.filter = Filter()
        self.page = 0
        self._thumbs: dict[str, bytes | None] = {}
        self.cards: dict[str, dict[str, int]] = {}  # rel -> {"caption": id, "exclude": id, "image": id}
        self._card_windows: list[int] = []
        self.tag_items: dict[str, int] = {}
        self.window = dpg.add_window(label=title or f"Dataset: {model.folder}", width=size[0], height=size[1],
                                     pos=list(pos), on_close=lambda: self.close())
        self._build()
        self.refresh()

    # ---- layout ------------------------------------------------------------------------------------
    def _build(self) -> None:
        w = self.window
        with dpg.group(horizontal=True, parent=w):
            self.f_text = dpg.add_input_text(hint="filter: text or file name", width=220,
                                             callback=lambda: self._filter_changed())
            dpg.add_text("bucket at")
            self.f_res = dpg.add_combo([str(r) for r in RESOLUTIONS], default_value=str(self.model.resolution),
                                       width=70, callback=lambda: self._resolution_changed())
            self.f_bucket = dpg.add_combo(["all"], default_value="all", width=120,
                                          callback=lambda: self._filter_changed())
            dpg.add_text("words")
            self.f_min = dpg.add_input_int(default_value=0, width=90, min_value=0, min_clamped=True,
                                           callback=lambda: self._filter_changed())
            self.f_max = dpg.add_input_int(default_value=0, width=90, min_value=0, min_clamped=True,
                                           callback=lambda: self._filter_changed())
            self.f_missing = dpg.add_checkbox(label="missing caption", callback=lambda: self._filter_changed())
            self.f_excluded = dpg.add_checkbox(label="show excluded", default_value=True,
                                               callback=lambda: self._filter_changed())
        with dpg.group(horizontal=True, parent=w):
            self.find = dpg.add_input_text(hint="find", width=200)
            self.repl = dpg.add_input_text(hint="replace with", width=200)
            self.regex = dpg.add_checkbox(label="regex")
            self.case = dpg.add_checkbox(label="match case", default_value=True)
            dpg.add_button(label="Replace in shown captions", callback=lambda: self.replace())
            dpg.add_spacer(width=12)
            self.b_undo = dpg.add_button(label="Undo", callback=lambda: self.undo())
            self.b_redo = dpg.add_button(label="Redo", callback=lambda: self.redo())
            dpg.add_button(label="Save", callback=lambda: self.save())
        self.status = dpg.add_text("", parent=w)
        with dpg.group(horizontal=True, parent=w):
            with dpg.child_window(width=230, height=-1) as left:
                dpg.add_text("Tags (images using them)")
                self.tag_list = dpg.add_group()
            self.left = left
            with dpg.child_window(width=-1, height=-1) as right:
                with dpg.group(horizontal=True):
                    dpg.add_button(label="< Prev", callback=lambda: self.go(-1))
                    self.page_text = dpg.add_text("")
                    dpg.add_button(label="Next >", callback=lambda: self.go(1))
                self.grid = dpg.add_group()
            self.right = right

    # ---- actions (the callbacks; tests call them directly) -------------------------------------------
    def _filter_changed(self) -> None:
        b = dpg.get_value(self.f_bucket)
        self.filter.text = dpg.get_value(self.f_text) or ""
        self.filter.bucket = "" if b in ("all", None) else b.split(" ")[0]
        self.filter.min_words = int(dpg.get_value(self.f_min) or 0)
        self.filter.max_words = int(dpg.get_value(self.f_max) or 0)
        self.filter.missing_only = bool(dpg.get_value(self.f_missing))
        self.filter.show_excluded = bool(dpg.get_value(self.f_excluded))
        self.page = 0
        self.refresh()

    def _resolution_changed(self) -> None:
        self.model.set_resolution(int(dpg.get_value(self.f_res)))
        dpg.set_value(self.f_bucket, "all")
        self._filter_changed()

    def set_tag_filter(self, tag: str) -> None:
        self.filter.tag = "" if self.filter.tag == tag else tag
        self.page = 0
        self.refresh()

    def go(self, delta: int) -> None:
        pages = max(1, -(-len(self.model.visible(self.filter)) // PAGE))
        self.page = min(max(0, self.page + delta), pages - 1)
        self.refresh()

    def edit_caption(self, rel: str, text: str) -> None:
        self.model.set_caption(rel, text, typing=True)
        self._update_status()

    def exclude(self, rel: str, excluded: bool) -> None:
        self.model.set_excluded(rel, excluded)
        self.refresh()

    def replace(self) -> int:
        find, repl = dpg.get_value(self.find) or "", dpg.get_value(self.repl) or ""
        if not find:
            self.say("! Type the text to find first.", True)
            return 0
        try:
            n = self.model.replace_all(find, repl, regex=bool(dpg.get_value(self.regex)),
                                       case=bool(dpg.get_value(self.case)),
                                       rels=[e.rel for e in self.model.visible(self.filter)])
        except re.error as exc:
            self.say(f"! The regex {find!r} is not valid ({exc}).", True)
            return 0
        self.say(f"Replaced {find!r} in {n} captions (Undo reverts them all).")
        self.refresh()
        return n

    def undo(self) -> None:
        if self.model.undo():
            self.refresh()

    def redo(self) -> None:
        if self.model.redo():
            self.refresh()

    def save(self) -> bool:
        from app.atomic import WriteError
        from app.ml.data.errors import DataError

        try:
            result = self.model.save()
        except (DataError, WriteError, OSError) as exc:
            self.say(f"! Saving the dataset failed: {exc}. Your edits are still here; fix the cause and save again.",
                     True)
            return False
        self.say(f"{self.model.folder}: {result.message()}.")
        self.refresh()
        return True

    def close(self, force: bool = False) -> None:
        if self.model.dirty and not force:
            from app.gui import dialogs

            n = len(self.model.changed())
            dialogs.choose("Unsaved dataset edits",
                           f"{n} captions (or exclusions) in {self.model.folder} are not saved.",
                           [("Save", lambda: self.save() and self.close(True)),
                            ("Discard", lambda: self.close(True)), ("Keep editing", None)])
            if dpg.does_item_exist(self.window):
                dpg.show_item(self.window)
            return
        if dpg.does_item_exist(self.window):
            dpg.delete_item(self.window)
        if self.on_close:
            self.on_close(self)

    # ---- keyboard (the editor hands keys over while this window has the focus) -------------------------
    def focused(self) -> bool:
        """Whether this window (or a part of it) has the keyboard focus: the canvas' keys (Delete, Space,
        F, Ctrl+Z) must not act on the graph while the user works on captions."""
        parts = [self.window, self.left, self.right, *self._card_windows]
        return any(dpg.does_item_exist(i) and dpg.is_item_focused(i) for i in parts) or self.typing()

    def typing(self) -> bool:
        inputs = [self.f_text, self.f_min, self.f_max, self.find, self.repl,
                  *(c["caption"] for c in self.cards.values())]
        return any(dpg.does_item_exist(i) and dpg.is_item_active(i) for i in inputs)

    def on_key(self, key: str, ctrl: bool) -> None:
        """Ctrl+S saves the dataset, Ctrl+Z / Ctrl+Y undo and redo caption edits (inside a text field the
        field's own undo works as usual); every other key stays in this window."""
        if ctrl and key == "S":
            self.save()
        elif ctrl and key == "Z" and not self.typing():
            self.undo()
        elif ctrl and key == "Y" and not self.typing():
            self.redo()

    # ---- drawing ----------------------------------------------------------------------------------
    def _update_status(self) -> None:
        m = self.model
        n_ex = sum(e.excluded for e in m.entries)
        n_missing = sum(1 for e in m.entries if not e.caption.strip())
        text = (f"{len(m.entries)} images, {n_missing} without a caption, {n_ex} excluded; "
                f"{len(m.changed())} unsaved caption edits" + (" (Save writes them)" if m.dirty else ""))
        if m.problems:
            text += f"; {len(m.problems)} unreadable: " + ", ".join(m.problems[:3])
        dpg.set_value(self.status, text)
        dpg.configure_item(self.b_undo, enabled=m.can_undo)
        dpg.configure_item(self.b_redo, enabled=m.can_redo)

    def _thumb(self, e: Entry):
        if e.rel not in self._thumbs:
            self._thumbs[e.rel] = thumbnail_png(e.path)
        png = self._thumbs[e.rel]
        return self.textures.get(png) if png else None

    def refresh(self) -> None:
        m = self.model
        buckets = ["all"] + [f"{b} ({n})" for b, n in m.buckets()]
        dpg.configure_item(self.f_bucket, items=buckets)
        dpg.delete_item(self.tag_list, children_only=True)
        self.tag_items = {}
        for tag, n in m.tags()[:200]:
            self.tag_items[tag] = dpg.add_selectable(label=f"{n:>4}  {tag}", parent=self.tag_list,
                                                     default_value=tag == self.filter.tag, user_data=tag,
                                                     callback=lambda s, a, u: self.set_tag_filter(u))
        shown = m.visible(self.filter)
        pages = max(1, -(-len(shown) // PAGE))
        self.page = min(self.page, pages - 1)
        dpg.set_value(self.page_text, f"page {self.page + 1} of {pages} ({len(shown)} images shown"
                                      + (f", tag '{self.filter.tag}'" if self.filter.tag else "") + ")")
        dpg.delete_item(self.grid, children_only=True)
        self.cards = {}
        self._card_windows = []
        row = None
        for k, e in enumerate(shown[self.page * PAGE:(self.page + 1) * PAGE]):
            if k % 3 == 0:
                row = dpg.add_group(horizontal=True, parent=self.grid)
            with dpg.child_window(width=300, height=178, parent=row, border=True, no_scrollbar=True) as cw:
                self._card_windows.append(cw)
                with dpg.group(horizontal=True):
                    tex = self._thumb(e)
                    card: dict[str, int] = {}
                    if tex:
                        t, tw, th = tex
                        scale = THUMB_SIDE / max(tw, th, 1)
                        card["image"] = dpg.add_image(t, width=max(1, int(tw * scale)), height=max(1, int(th * scale)))
                    else:
                        dpg.add_text("(unreadable)")
                    with dpg.group():
                        dpg.add_text(e.rel if len(e.rel) < 22 else "..." + e.rel[-19:],
                                     color=(230, 90, 90) if e.excluded else (200, 200, 200))
                        dpg.add_text(f"{e.size[0]}x{e.size[1]}", color=(150, 150, 150))
                        dpg.add_text(f"bucket {e.bucket}", color=(150, 150, 150))
                        if not e.caption.strip():
                            dpg.add_text("no caption", color=(240, 170, 60))
                        card["exclude"] = dpg.add_checkbox(label="exclude", default_value=e.excluded, user_data=e.rel,
                                                           callback=lambda s, a, u: self.exclude(u, a))
                card["caption"] = dpg.add_input_text(default_value=e.caption, multiline=True, width=-1, height=42,
                                                     hint="(no caption)", user_data=e.rel,
                                                     callback=lambda s, a, u: self.edit_caption(u, a))
                self.cards[e.rel] = card
        self._update_status()

    def report(self) -> dict:
        """What the window shows, for tests and the state dump."""
        return {"folder": str(self.model.folder), "shown": list(self.cards), "dirty": self.model.dirty,
                "tags": [t for t in self.tag_items], "status": dpg.get_value(self.status),
                "captions": {r: dpg.get_value(c["caption"]) for r, c in self.cards.items()},
                "caption_at": {r: [dpg.get_item_rect_min(c["caption"])[0] + dpg.get_item_rect_size(c["caption"])[0] / 2,
                                   dpg.get_item_rect_min(c["caption"])[1] + dpg.get_item_rect_size(c["caption"])[1] / 2]
                               for r, c in self.cards.items()}}
