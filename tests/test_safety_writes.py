"""Disk full and file modes: a failed write names the node, the file and the cause and leaves no
partial file; TensorBoard's writer thread never prints a raw traceback; outputs follow the umask
so a ComfyUI service running as another user can read them."""
from __future__ import annotations

import errno
import os
import stat

import pytest
import torch


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def umask_022(monkeypatch):
    import app.atomic

    old = os.umask(0o022)
    monkeypatch.setattr(app.atomic, "_umask", None, raising=False)
    yield
    os.umask(old)
    app.atomic._umask = None


def lora_graph():
    from app.graph.model import Graph

    g = Graph()
    g.add_node("LoadModel", 1, {"source": "builtin:tiny-sd"}, node_id="1")
    g.add_node("LoRAInject", 1, {"rank": 2, "alpha": 2.0}, node_id="2")
    g.add_node("Save", 1, {"path": "out/my_lora.safetensors"}, node_id="3", title="Save LoRA")
    g.add_link("1", "model", "2", "model")
    g.add_link("2", "model", "3", "model")
    return g


def test_disk_full_during_save_names_node_file_and_cause(tmp_path, monkeypatch):
    import app.ml.save.lora as lora
    from app.engine.executor import Executor
    from app.graph.registry import load_registry

    def half_then_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # a partial file, then the disk is full
        enospc()

    monkeypatch.setattr(lora, "save_file", half_then_full)
    ws = tmp_path / "ws"
    r = Executor(load_registry(include_user=False)).run(lora_graph(), workspace=ws)
    assert r.status == "error" and r.error_node == "3"
    target = ws / "out" / "my_lora.safetensors"
    assert r.error.startswith(f"node 3 (Save LoRA): no space left on device while writing {target}: ")
    assert " KB needed" in r.error and " free" in r.error, r.error
    assert list((ws / "out").iterdir()) == []  # no partial file, no temp file


def test_disk_full_during_a_backup_says_how_much_and_leaves_nothing(tmp_path, monkeypatch):
    from app.atomic import WriteError
    from app.ml.train.loop import Trainer, TrainSettings

    class Trainable:
        def __init__(self):
            self.w = torch.nn.Parameter(torch.zeros(1000, 250))

        def state_dict(self):
            return {"w": self.w}

    trainable = Trainable()
    optimizer = torch.optim.AdamW([trainable.w])
    trainable.w.grad = torch.ones_like(trainable.w)
    optimizer.step()
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    fake = type("T", (), {})()
    fake.workdir, fake.trainable, fake.s, fake.opt_settings = tmp_path / "TrainLoop_7", trainable, TrainSettings(), {}

    def full(*args, **kwargs):  # what torch.save says when the disk fills up
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1234 vs 5678")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(WriteError) as info:
        Trainer._backup(fake, 20, 1, 0, optimizer, sched, None, [])
    final = tmp_path / "TrainLoop_7" / "backups" / "step_0000020"
    # weights 1 MB + AdamW's two moments 2 MB
    assert str(info.value).startswith(f"no space left on device while writing {final}: 3.0 MB needed, ")
    assert list((tmp_path / "TrainLoop_7" / "backups").iterdir()) == []


def test_other_write_errors_name_the_file(tmp_path):
    from app.atomic import WriteError, atomic_file

    (tmp_path / "ro").mkdir()
    with pytest.raises(WriteError, match=r"cannot write .*x\.png: Permission denied"):
        with atomic_file(tmp_path / "ro" / "x.png"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert list((tmp_path / "ro").iterdir()) == []


def test_tensorboard_disk_full_is_one_warning_and_no_thread_traceback(tmp_path, capfd, monkeypatch):
    from tensorboard.summary.writer import record_writer

    from app.ml.train.tensorboard import GuardedWriter

    warnings = []
    w = GuardedWriter(tmp_path / "tb", warnings.append)
    w.add_scalar("loss", 1.0, 0)
    w.flush()
    monkeypatch.setattr(record_writer.RecordWriter, "write", enospc)
    for step in range(1, 30):
        w.add_scalar("loss", 1.0, step)
        w.flush() if step % 10 == 0 else None
    w.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert warnings == [f"TensorBoard logs stopped: no space left on device while writing {tmp_path / 'tb'}; "
                        "training goes on"]


def test_outputs_follow_the_umask(tmp_path, umask_022):
    from PIL import Image

    import app.atomic
    from app.engine.executor import Executor
    from app.graph.registry import load_registry
    from app.ml.sampling.png import save_png

    ws = tmp_path / "ws"
    assert Executor(load_registry(include_user=False)).run(lora_graph(), workspace=ws).status == "done"
    lora = ws / "out" / "my_lora.safetensors"
    assert stat.S_IMODE(lora.stat().st_mode) == 0o644
    png = save_png(Image.new("RGB", (8, 8)), ws / "s.png", {"prompt": "p", "steps": 1, "sampler": "euler", "cfg": 1,
                                                          "seed": 1, "width": 8, "height": 8})
    assert stat.S_IMODE(png.stat().st_mode) == 0o644
    with app.atomic.atomic_folder(ws / "backups" / "step_0000001") as t:
        (t.tmp / "state.pt").write_bytes(b"1")
    assert stat.S_IMODE((ws / "backups" / "step_0000001").stat().st_mode) == 0o755
    assert stat.S_IMODE((ws / "backups" / "step_0000001" / "state.pt").stat().st_mode) == 0o644
    # a stricter umask is followed as well
    os.umask(0o027)
    app.atomic._umask = None
    with app.atomic.atomic_file(ws / "strict.bin") as t:
        t.tmp.write_bytes(b"1")
    assert stat.S_IMODE((ws / "strict.bin").stat().st_mode) == 0o640
