"""Input from anywhere: dataset folders with symlink loops, links out of the folder and unreadable
entries, huge and orphan caption files, and resume_from pointing at something that is not a backup.
Every case ends in a clear message naming the file, never a failed node for one bad entry."""
from __future__ import annotations

import json
import pickle

import pytest
import torch

from app.ml.train.loop import Batch, Trainer, TrainingError, TrainSettings
from app.ml.train.trainables import FullFinetune


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
