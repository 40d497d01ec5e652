"""Input from anywhere: dataset folders with symlink loops, links out of the folder and unreadable
entries, huge and orphan caption files, and resume_from pointing at something that is not a backup.
Every case ends in a clear message naming the file, never a failed node for one bad entry."""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import sys
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch

from app.ml.data.captions import MAX_CAPTION_BYTES, MAX_CONCEPT_FILE_BYTES
from app.ml.data.concept import ConceptSettings, scan_concept
from app.ml.fingerprint import path_fingerprint
from app.ml.train.loop import Batch, Trainer, TrainingError, TrainSettings
from app.ml.train.trainables import FullFinetune
from data_helpers import write_image


# ---- resume_from on something that is not a backup -------------------------------------------

class _Pixels:
    def iterations(self, epoch):
        return 2

    def batch(self, epoch, index, rank=0, world=1):
        g = torch.Generator().manual_seed(epoch * 100 + index)
        return Batch(captions=["red"], loss_weights=torch.ones(1), pixels=torch.rand((1, 3, 16, 16), generator=g) * 2 - 1)


OPT = {"optimizer": "adamw", "lr": 1e-3, "schedule": "constant"}
EXPECTED = "backup.json, trainable.safetensors and state.pt"


class _Foreign:
    """Not a tensor or a plain value: weights_only=True refuses it."""


def _not_backups(tmp_path):
    from safetensors.torch import save_file

    text = tmp_path / "notes.txt"
    text.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    lora = tmp_path / "my_lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    raw_pickle = tmp_path / "state.pt"
    raw_pickle.write_bytes(pickle.dumps({"optimizer": [1, 2, 3]}))
    fake = tmp_path / "fake_backup"  # the right file names, foreign contents
    fake.mkdir()
    (fake / "backup.json").write_text(json.dumps({"step": 1, "epoch": 0, "batch_index": 1}))
    save_file({"x": torch.zeros(1)}, str(fake / "trainable.safetensors"))
    (fake / "state.pt").write_bytes(pickle.dumps({"optimizer": {}, "scheduler": {}}))
    no_json = tmp_path / "no_json"
    no_json.mkdir()
    (no_json / "backup.json").write_text("[1, 2")
    return {"text file": (text, "is a file, not a backup folder"),
            "empty folder": (empty, "no backup found in this folder"),
            "LoRA file": (lora, "is a file (a LoRA or model file?)"),
            "random pickle": (raw_pickle, "is a file (a LoRA or model file?)"),
            "foreign state.pt": (fake, "state.pt was not written by torch.save"),
            "broken backup.json": (no_json, "incomplete backup, trainable.safetensors, state.pt missing"),
            "missing": (tmp_path / "nope", "no such file or folder")}


@pytest.mark.parametrize("case", ["text file", "empty folder", "LoRA file", "random pickle", "foreign state.pt",
                                  "broken backup.json", "missing"])
def test_resume_from_a_non_backup_names_the_path_and_what_a_backup_holds(sd, tmp_path, monkeypatch, case):
    path, why = _not_backups(tmp_path)[case]
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    trainer = Trainer(sd, FullFinetune(sd), _Pixels(), OPT, TrainSettings(epochs=1), tmp_path / "run")
    with pytest.raises(TrainingError) as err:
        trainer.run(resume_from=path)
    msg = str(err.value)
    assert msg.startswith(f"resume_from {path}") and why in msg and EXPECTED in msg, msg
    assert "weights_only" not in msg and loads == []  # refused before anything is unpickled


def test_a_zip_state_with_foreign_objects_is_refused_without_unsafe_advice(sd, tmp_path):
    run = tmp_path / "run"
    trainer = Trainer(sd, FullFinetune(sd), _Pixels(), OPT, TrainSettings(epochs=1, backup_every=1,
                                                                              backup_unit="steps"), run)
    trainer.run()
    backup = sorted((run / "backups").iterdir())[-1]
    torch.save({"optimizer": _Foreign(), "scheduler": {}}, backup / "state.pt")
    again = Trainer(sd, FullFinetune(sd), _Pixels(), OPT, TrainSettings(epochs=1), tmp_path / "run2")
    with pytest.raises(TrainingError) as err:
        again.run(resume_from=run / "backups")  # the folder of backups: the latest is used
    msg = str(err.value)
    assert msg.startswith(f"resume_from {backup}: state.pt holds objects other than tensors") and EXPECTED in msg
    assert "weights_only" not in msg, msg


def test_a_file_inside_a_real_backup_resumes_that_backup(sd, tmp_path):
    run = tmp_path / "run"
    Trainer(sd, FullFinetune(sd), _Pixels(), OPT, TrainSettings(epochs=1, backup_every=1, backup_unit="steps"),
            run).run()
    backup = sorted((run / "backups").iterdir())[0]
    result = Trainer(sd, FullFinetune(sd), _Pixels(), OPT, TrainSettings(epochs=1), tmp_path / "r2").run(
        resume_from=backup / "backup.json")
    assert result.steps == 2 and len(result.losses) == 1  # resumed after step 1 of 2


# ---- dataset folders: symlink loops, links out, unreadable entries -----------------------------


def _pair(folder: Path, stem: str, caption: str = "a photo") -> Path:
    img = write_image(folder / f"{stem}.png", (32, 32))
    (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return img


def _lines(report, start: str) -> list[str]:
    return [w for w in report.entry_warnings() if w.startswith(start)]


def test_symlink_loops_are_skipped_and_named_never_failing_the_concept(tmp_path):
    data = tmp_path / "parent" / "data"
    _pair(data, "a")
    _pair(data / "sub", "c")
    os.symlink(".", data / "loop")  # back to the dataset folder
    os.symlink("..", data / "sub" / "back")  # from a subfolder back up
    os.symlink("self.png", data / "self.png")  # a link to itself: ELOOP
    os.symlink(str(tmp_path / "parent"), data / "up")  # out of the folder, but it holds the dataset
    os.symlink("missing.png", data / "gone.png")
    c = scan_concept(ConceptSettings("loops", data))
    assert [s.rel for s in c.samples] == ["a.png", "sub/c.png"]
    kinds = {e.rel: e.kind for e in c.report.skipped_entries}
    assert kinds == {"loop": "symlink loop", "sub/back": "symlink loop", "self.png": "symlink loop",
                     "up": "symlink loop", "gone.png": "broken link"}
    (loops,) = _lines(c.report, "skipped 4 symlink loops")
    assert "loop (back to .)" in loops and "sub/back (back to .)" in loops and "self.png" in loops
    assert _lines(c.report, "skipped 1 broken symlinks") == ["skipped 1 broken symlinks (the target does not "
                                                             "exist): gone.png"]
    assert "symlink loops" in c.report.summary()


def test_links_out_of_the_dataset_are_followed_once_and_named(tmp_path):
    outside = tmp_path / "elsewhere"
    _pair(outside, "x")
    data = tmp_path / "data"
    _pair(data, "a")
    os.symlink(str(outside), data / "linked")  # a user's images folder, linked in on purpose
    os.symlink(str(outside / "x.png"), data / "one.png")
    os.symlink(str(data), outside / "back")  # ... which links back into the dataset: a loop
    os.symlink(str(outside), data / "zz_again")  # the same folder twice: read once
    c = scan_concept(ConceptSettings("out", data))
    assert [s.rel for s in c.samples] == ["a.png", "linked/x.png", "one.png"]
    assert c.samples[2].caption_source == "concept_name"  # one.txt does not exist beside the link
    assert c.report.outside_links == [("linked", str(outside.resolve())), ("one.png", str((outside / "x.png").resolve()))]
    (note,) = _lines(c.report, "followed 2 symlinks out of the dataset folder")
    assert f"linked -> {outside.resolve()}" in note
    assert {e.rel: (e.kind, e.detail) for e in c.report.skipped_entries} == {
        "zz_again": ("already scanned", "as linked"), "linked/back": ("symlink loop", "back to .")}


def test_a_pipe_named_like_an_image_is_skipped_not_opened(tmp_path):
    data = tmp_path / "data"
    _pair(data, "a")
    os.mkfifo(data / "stream.png")  # opening it would wait forever for a writer
    def hung(*_):
        raise TimeoutError("the scan opened the pipe and waited for a writer")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    try:
        c = scan_concept(ConceptSettings("pipe", data))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert [s.rel for s in c.samples] == ["a.png"]
    assert _lines(c.report, "skipped 1 entries that are not regular files") != []


def test_one_warning_line_per_kind_through_the_node(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "nodes"))
    from dataset_node_helpers import graph, run

    data = tmp_path / "data"
    _pair(data, "a")
    for i in range(30):
        os.symlink(f"missing_{i}.png", data / f"gone_{i:02d}.png")
    os.symlink(".", data / "loop")
    (data / "orphan.txt").write_text("nobody reads me")
    r, _ = run(graph([("1", "Concept", {"folder": str(data), "name": "many"})]))
    assert r.status == "done", r.error()
    warnings = r.logs("1", "warning")
    broken = [w for w in warnings if "broken symlinks" in w]
    assert broken == ["skipped 30 broken symlinks (the target does not exist): gone_00.png, gone_01.png, "
                      "gone_02.png, gone_03.png, gone_04.png and 25 more"]
    assert len([w for w in warnings if "symlink loops" in w]) == 1
    assert len([w for w in warnings if "orphan.txt" in w]) == 1
    assert "broken symlinks" in r.previews("1")["text"]["text"]


def test_unreadable_entries_are_skipped_and_named(tmp_path):
    """chmod 000 does not stop root, so as root the scan runs in a child that drops to 'nobody'."""
    from PIL import Image

    Image.init()  # the child cannot import PIL plugins from a root-only environment
    base = Path(tempfile.mkdtemp(prefix="nodetrainer-perm-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        data = base / "data"
        for stem in ("a", "secret"):
            _pair(data, stem)
        _pair(data / "locked", "b")
        for p in (data, data / "locked"):
            os.chmod(p, 0o755)
        for p in data.rglob("*"):
            if p.is_file():
                os.chmod(p, 0o644)
        os.chmod(data / "secret.png", 0o000)
        os.chmod(data / "locked", 0o000)
        got = _scan_as_unprivileged(data)
    finally:
        if (base / "data" / "locked").exists():
            os.chmod(base / "data" / "locked", 0o755)
        shutil.rmtree(base, ignore_errors=True)
    assert got["samples"] == ["a.png"]
    assert got["entries"] == [["locked", "permission denied"]]
    assert any("secret.png" in p and "permission denied" in p for p in got["problems"])
    assert any(w.startswith("skipped 1 entries that cannot be read (permission denied): locked") for w in got["warnings"])


class _NoPrivilegeDrop(Exception):
    pass


def _scan_as_unprivileged(data: Path) -> dict:
    def scan():
        c = scan_concept(ConceptSettings("perm", data))
        return {"samples": [s.rel for s in c.samples],
                "entries": [[e.rel, e.kind] for e in c.report.skipped_entries],
                "problems": [str(p) for p in c.report.problems], "warnings": c.report.entry_warnings()}

    if os.geteuid() != 0:
        return scan()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, scan, report, exit without running the parent's cleanup
        code = 0
        try:
            os.close(r)
            try:
                os.setgid(65534)
                os.setuid(65534)
            except OSError as exc:
                raise _NoPrivilegeDrop(str(exc)) from None
            out = json.dumps(scan())
        except _NoPrivilegeDrop as exc:
            out, code = json.dumps({"skip": f"cannot drop root privileges here ({exc})"}), 1
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out, code = json.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        os.write(w, out.encode())
        os._exit(code)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    got = json.loads(b"".join(chunks))
    if "skip" in got:
        pytest.skip(got["skip"])
    assert "error" not in got, got["error"]
    return got


# ---- captions: huge files and files with no image ----------------------------------------------

def test_a_10mb_caption_is_cut_at_a_word_reported_and_never_read_whole(tmp_path):
    data = tmp_path / "data"
    write_image(data / "big.png", (32, 32))
    with open(data / "big.txt", "w", encoding="utf-8") as f:
        for i in range(10 * 1024 * 1024 // 16):
            f.write(f"tag{i % 1000:04d}, célin ")  # 16 bytes; a 2-byte character keeps the cut honest
    assert (data / "big.txt").stat().st_size == 10 * 1024 * 1024
    _pair(data, "small", "a small caption")
    tracemalloc.start()
    try:
        c = scan_concept(ConceptSettings("huge", data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    big = next(s for s in c.samples if s.rel == "big.png")
    (line,) = big.caption_lines
    assert MAX_CAPTION_BYTES - 1100 < len(line.encode("utf-8")) <= MAX_CAPTION_BYTES
    assert line.endswith(("célin", ",")) and line.startswith("tag0000, célin tag0001")
    assert peak < 4 * 1024 * 1024, peak  # the old scan held the whole 10 MB (and its decoded text)
    (warn,) = [p for p in c.report.warnings if p.path.endswith("big.txt")]
    assert "10,240 KB" in warn.message and "first 64 KB" in warn.message
    assert next(s for s in c.samples if s.rel == "small.png").caption_lines == ("a small caption",)


def test_a_huge_caption_without_spaces_is_cut_at_a_whole_character(tmp_path):
    data = tmp_path / "data"
    write_image(data / "a.png", (32, 32))
    (data / "a.txt").write_bytes(("é" * (MAX_CAPTION_BYTES // 2) + "x" + "é" * 100).encode("utf-8"))
    c = scan_concept(ConceptSettings("chars", data))
    (line,) = c.samples[0].caption_lines
    assert line == "é" * (MAX_CAPTION_BYTES // 2)  # the 2-byte character split by the cut is dropped
    assert [p.path for p in c.report.warnings] == [str(data / "a.txt")]


def test_orphan_captions_are_listed_once(tmp_path):
    data = tmp_path / "data"
    _pair(data, "a")
    _pair(data / "sub", "b")
    (data / "forgotten.txt").write_text("an image that was deleted")
    (data / "sub" / "photo.png.txt").write_text("does not pair")
    c = scan_concept(ConceptSettings("orphans", data))
    assert c.report.orphan_captions == ["forgotten.txt", "sub/photo.png.txt"]
    assert _lines(c.report, "2 caption files have no image") == [
        "2 caption files have no image of the same name beside them and are not used: forgotten.txt, "
        "sub/photo.png.txt"]
    by_name = scan_concept(ConceptSettings("orphans", data, prompt_source="filename"))
    assert by_name.report.orphan_captions == []  # captions are not read from files then


def test_the_folder_fingerprint_sees_linked_folders_and_ends_on_loops(tmp_path):
    """The editor re-runs Concept when its files change: also those in a folder linked in."""
    outside = tmp_path / "elsewhere"
    img = _pair(outside, "x")
    data = tmp_path / "data"
    _pair(data, "a")
    os.symlink(str(outside), data / "linked")
    os.symlink(".", data / "loop")
    os.symlink(str(tmp_path), data / "up")  # holds the dataset folder: a loop too
    before = path_fingerprint(str(data))
    write_image(img, (40, 40))
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert path_fingerprint(str(data)) != before


def test_a_huge_concept_caption_file_keeps_its_first_megabyte_of_lines(tmp_path):
    data = tmp_path / "data"
    write_image(data / "a.png", (32, 32))
    (tmp_path / "variants.txt").write_text("".join(f"variant {i:07d}\n" for i in range(200_000)))  # 3.2 MB
    c = scan_concept(ConceptSettings("many", data, prompt_source="concept_file", caption_file=tmp_path / "variants.txt"))
    lines = c.samples[0].caption_lines
    assert lines[0] == "variant 0000000" and len(lines) == MAX_CONCEPT_FILE_BYTES // 16
    (warn,) = c.report.warnings
    assert warn.path.endswith("variants.txt") and f"({len(lines)} lines) are used" in warn.message
