"""Unsafe and damaged files, existing run directories and a full disk.

Pickles whose loading would create a folder (through ``os.mkdir`` in ``__reduce__``) must be
rejected without creating it. A patched safetensors writer simulates a full disk: it writes
half a file and raises ``OSError(ENOSPC)``.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdexpand.io
from kdexpand.io import UnreadableFileError, UnsafeFileError, load_safetensors, load_torch
from kdexpand.train import main
from kdexpand.trainer.checkpoint import load_last

REPO = Path(__file__).resolve().parents[1]
STUDENT = str(REPO / "recipes" / "cifar10_ck.yaml")
KD_STUDENT = str(REPO / "recipes" / "cifar10_ck_kd.yaml")
SLICE = [
    "data.train_limit=128", "data.eval_limit=32", "train.batch_size=16", "train.deterministic=true",
    "output.tensorboard=false",
]


class MakesFolder:
    """Unpickling this object calls ``os.mkdir(path)``: code run by the loader."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def cli_args(recipe: str, out: Path, *pairs: str) -> list[str]:
    return [recipe, *[part for pair in [*SLICE, f"output.dir={out}", *pairs] for part in ("--set", pair)]]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(autouse=True)
def data_env(shared_data, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDEXPAND_DATA", str(shared_data))
    monkeypatch.setenv("KDEXPAND_CACHE", str(tmp_path_factory.getbasetemp() / "files_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def finished_run(shared_data, tmp_path_factory) -> Path:
    """A finished one-epoch run to damage (each test copies it)."""
    out = tmp_path_factory.mktemp("runs") / "finished"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDEXPAND_DATA", str(shared_data))
        patch.setenv("KDEXPAND_CACHE", str(tmp_path_factory.getbasetemp() / "files_cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        assert main(cli_args(STUDENT, out, "train.epochs=1")) == 0
    torch.use_deterministic_algorithms(False)
    return out


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_payload_runs_code_under_plain_pickle(tmp_path):
    # Proves the payload is live, so the rejections below are meaningful.
    pickle.loads(pickle.dumps(MakesFolder(tmp_path / "created")))
    assert (tmp_path / "created").is_dir()


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        ("torch_save", r"contains a pickled object \(posix\.mkdir\) other than tensors"),
        ("pickle_protocol_2", r"contains a pickled object \(posix\.mkdir\) other than tensors"),
        # torch rejects protocol 4 at an opcode before it reads the global, so none is named.
        ("pickle_protocol_4", r"contains a pickled object other than tensors"),
    ],
)
def test_load_torch_rejects_code(tmp_path, writer, message):
    path = tmp_path / "trainer.pt"
    payload = {"state": MakesFolder(tmp_path / "created")}
    if writer == "torch_save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=int(writer[-1])))

    with pytest.raises(UnsafeFileError, match=message):
        load_torch(path)
    assert not (tmp_path / "created").exists()


def test_truncated_files_are_reported(tmp_path):
    torch.save({"epoch": 3}, tmp_path / "state.pt")
    data = (tmp_path / "state.pt").read_bytes()
    (tmp_path / "state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableFileError, match="is truncated or not a torch file"):
        load_torch(tmp_path / "state.pt")
    (tmp_path / "weights.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UnreadableFileError, match="is not a readable safetensors file"):
        load_safetensors(tmp_path / "weights.safetensors")


def test_resume_rejects_malicious_trainer_state(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    torch.save({"state": MakesFolder(tmp_path / "created")}, run_dir / "checkpoints" / "epoch_0001" / "trainer.pt")

    assert main([*cli_args(STUDENT, run_dir, "train.epochs=2"), "--resume"]) == 1
    error = error_line(capsys.readouterr().err)
    assert "trainer.pt contains a pickled object (posix.mkdir)" in error
    assert "it was not loaded" in error
    assert not (tmp_path / "created").exists()


def test_resume_rejects_truncated_weights(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    weights = run_dir / "checkpoints" / "epoch_0001" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])

    assert main([*cli_args(STUDENT, run_dir, "train.epochs=2"), "--resume"]) == 1
    assert "model.safetensors is not a readable safetensors file" in error_line(capsys.readouterr().err)


@pytest.mark.parametrize("content", ["{garbage", '{"dir": 5}', '{"dir": "epoch_0001"}', "[]"])
def test_resume_rejects_damaged_pointer(finished_run, tmp_path, capsys, content):
    run_dir = copy_run(finished_run, tmp_path / "run")
    (run_dir / "checkpoints" / "last.json").write_text(content)

    assert main([*cli_args(STUDENT, run_dir, "train.epochs=2"), "--resume"]) == 1
    error = error_line(capsys.readouterr().err)
    assert "last.json is unreadable" in error
    assert "start the run again with --overwrite" in error


def test_resume_warns_on_thread_change(finished_run, tmp_path, caplog):
    run_dir = copy_run(finished_run, tmp_path / "run")
    saved = load_last(run_dir / "checkpoints" / "epoch_0001", 0, 1)[0]["torch_threads"]
    assert saved == torch.get_num_threads()

    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        with caplog.at_level(logging.WARNING, logger="kdexpand.trainer.run"):
            assert main([*cli_args(STUDENT, run_dir, "train.epochs=2"), "--resume"]) == 0
    finally:
        torch.set_num_threads(threads)
    warnings = [record.getMessage() for record in caplog.records if "torch threads" in record.getMessage()]
    assert warnings == [
        f"checkpoint was written with {threads} torch threads, this process has {threads + 1}, so CPU results "
        "may differ in the last bits from an uninterrupted run; set OMP_NUM_THREADS="
        f"{threads} for a bit-identical resume"
    ]


def test_pickle_as_teacher_weights_is_rejected(tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    torch.save({"fc.weight": MakesFolder(tmp_path / "created")}, teacher)

    assert main(cli_args(KD_STUDENT, tmp_path / "run", "train.epochs=1", f"teacher.checkpoint={teacher}")) == 2
    error = error_line(capsys.readouterr().err)
    assert "teacher.safetensors is not a readable safetensors file" in error
    assert not (tmp_path / "created").exists()
    assert not (tmp_path / "run").exists()


def test_existing_run_is_never_overwritten(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path / "run")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    assert main(cli_args(STUDENT, run_dir, "train.epochs=1")) == 1
    assert "already exists; pass --resume to continue it, --overwrite to start over" in capsys.readouterr().err
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before

    # --overwrite starts over in the same folder.
    assert main([*cli_args(STUDENT, run_dir, "train.epochs=1"), "--overwrite"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["last"]["epoch"] == 1


def test_full_disk_keeps_previous_checkpoint(monkeypatch, tmp_path, capsys):
    original = kdexpand.io.save_file

    def filling(tensors, path, metadata=None):
        # ``path`` is the temporary file inside the checkpoint folder being written.
        if "epoch_0002" not in str(path):
            return original(tensors, path, metadata=metadata)
        # Half a file reaches the disk, then the disk is full.
        original(tensors, path, metadata=metadata)
        Path(path).write_bytes(Path(path).read_bytes()[:100])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(kdexpand.io, "save_file", filling)
    run_dir = tmp_path / "run"
    assert main(cli_args(STUDENT, run_dir, "train.epochs=2")) == 1
    error = error_line(capsys.readouterr().err)

    checkpoints = run_dir / "checkpoints"
    assert f"writing checkpoint {checkpoints / 'epoch_0002'} failed" in error
    assert "No space left on device" in error
    assert f"the previous checkpoint {checkpoints / 'epoch_0001'} is intact" in error
    assert json.loads((checkpoints / "last.json").read_text())["dir"] == "epoch_0001"
    assert not (checkpoints / "epoch_0002").exists()
    assert not list(run_dir.rglob("*.tmp"))
    trainer, weights, _ = load_last(checkpoints / "epoch_0001", rank=0, world_size=1)
    assert trainer["state"]["epoch"] == 1
    assert load_file(checkpoints / "best.safetensors").keys() == weights.keys()

    # With space again, the run resumes from the intact checkpoint and finishes.
    monkeypatch.setattr(kdexpand.io, "save_file", original)
    assert main([*cli_args(STUDENT, run_dir, "train.epochs=2"), "--resume"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text())["last"]["epoch"] == 2


def test_atomic_write_uses_umask_mode(tmp_path):
    import os
    import stat

    from kdexpand.io import write_text

    mask = os.umask(0o022)
    try:
        path = write_text(tmp_path / "out.txt", "hello")
    finally:
        os.umask(mask)

    assert stat.S_IMODE(path.stat().st_mode) == 0o644
