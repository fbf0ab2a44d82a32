"""Kill safety: SIGKILL during an epoch, an evaluation and a checkpoint write, SIGTERM and
SIGINT at a step boundary, then --resume. Deterministic CPU runs on 128 CIFAR-10 images.

The killed runs are real ``python`` processes running :func:`kdexpand.train.main` through
this file's ``__main__`` block. That block patches one function to send the signal at a
chosen call, so nothing in the package reads a test hook. Interrupted and resumed runs must end with
bit-identical weights to an uninterrupted run (``torch.equal``; no tolerance).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "recipes" / "cifar10_ck.yaml")
# 128 images: 115 train (8 batches of 16, the last of 3) and 13 validation; 2 epochs.
BATCHES_PER_EPOCH = 8
SLICE = [
    "data.train_limit=128", "data.eval_limit=32", "train.batch_size=16", "train.epochs=2",
    "train.deterministic=true", "output.tensorboard=false",
]


def cli_args(out: Path, *extra: str) -> list[str]:
    sets = [part for pair in [*SLICE, f"output.dir={out}"] for part in ("--set", pair)]
    return [RECIPE, *sets, *extra]


def _signal_on_call(owner, name: str, call: int, number: int, when=lambda *args, **kwargs: True) -> None:
    """Patch ``owner.name`` to send ``number`` to this process on its ``call``-th matching call."""
    original = getattr(owner, name)
    count = 0

    def wrapper(*args, **kwargs):
        nonlocal count
        if when(*args, **kwargs):
            count += 1
            if count == call:
                os.kill(os.getpid(), number)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _kill_in_write(file_name: str) -> None:
    """Patch the atomic writer to die half-way through the first write of ``file_name``."""
    import kdexpand.io

    original = kdexpand.io.atomic_write

    def dying(path, write):
        if Path(path).name != file_name:
            return original(path, write)

        def torn(temp: Path) -> None:
            write(temp)
            data = temp.read_bytes()
            temp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        return original(path, torn)

    kdexpand.io.atomic_write = dying


def run_with_fault(fault: str, argv: list[str]) -> int:
    """Install the fault ``kind:argument`` and run the command line."""
    from kdexpand import train
    from kdexpand.tasks.classification import ClassificationTask

    # The package exports a function named run, so the module is looked up by its full name.
    run_module = importlib.import_module("kdexpand.trainer.run")

    kind, _, argument = fault.partition(":")
    is_training = lambda self, batch, train, generator=None: train  # noqa: E731
    if kind in ("kill-step", "term-step", "int-step"):
        number = {"kill-step": signal.SIGKILL, "term-step": signal.SIGTERM, "int-step": signal.SIGINT}[kind]
        _signal_on_call(ClassificationTask, "prepare_batch", int(argument), number, is_training)
    elif kind == "kill-eval":
        _signal_on_call(run_module, "evaluate", int(argument), signal.SIGKILL)
    elif kind == "kill-write":
        _kill_in_write(argument)
    else:
        raise ValueError(f"unknown fault {fault!r}")
    return train.main(argv)


def launch(fault: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, fault, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def last_checkpoint(run_dir: Path) -> str:
    return json.loads((run_dir / "checkpoints" / "last.json").read_text())["dir"]


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory) -> dict[str, str]:
    return dict(
        os.environ, KDEXPAND_DATA=str(shared_data), KDEXPAND_CACHE=str(tmp_path_factory.mktemp("cache")),
        HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
    )


@pytest.fixture(scope="module")
def in_process(env):
    """Run :func:`kdexpand.train.main` in this process with the subprocesses' environment."""
    with pytest.MonkeyPatch.context() as patch:
        for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
            patch.setenv(name, env[name])
        yield
    # train.deterministic switched torch's global flag on.
    torch.use_deterministic_algorithms(False)


@pytest.fixture(scope="module")
def reference(in_process, tmp_path_factory) -> Path:
    """The uninterrupted run, in this process (the same numbers as a separate process)."""
    from kdexpand.train import main

    out = tmp_path_factory.mktemp("runs") / "reference"
    assert main(cli_args(out)) == 0
    return out


@pytest.fixture(scope="module")
def killed_chain(env, tmp_path_factory) -> dict[str, object]:
    """One run killed at three points and stopped by SIGTERM, each session resuming the last."""
    out = tmp_path_factory.mktemp("runs") / "chain"
    record: dict[str, object] = {"dir": out}

    # Epoch 2, third batch: the process dies inside the training step.
    result = launch(f"kill-step:{BATCHES_PER_EPOCH + 3}", cli_args(out), env)
    record["step"] = (result, last_checkpoint(out))

    # Epoch 2 trains again from the epoch-1 checkpoint and dies while it is validated.
    result = launch("kill-eval:1", cli_args(out, "--resume"), env)
    record["eval"] = (result, last_checkpoint(out), sorted(p.name for p in (out / "checkpoints").iterdir()))

    # Epoch 2 trains and validates again; the process dies half-way through writing trainer.pt.
    result = launch("kill-write:trainer.pt", cli_args(out, "--resume"), env)
    torn = out / "checkpoints" / "epoch_0002"
    record["write"] = (result, last_checkpoint(out), sorted(p.name for p in torn.iterdir()) if torn.is_dir() else [])

    # Epoch 2 trains again; SIGTERM arrives during its third batch.
    result = launch("term-step:3", cli_args(out, "--resume"), env)
    record["term"] = (result, last_checkpoint(out))
    return record


def test_sigkill_in_epoch_keeps_last_epoch(killed_chain):
    result, checkpoint = killed_chain["step"]
    assert result.returncode == -signal.SIGKILL
    assert checkpoint == "epoch_0001"


def test_sigkill_in_evaluation_keeps_last_epoch(killed_chain):
    result, checkpoint, names = killed_chain["eval"]
    assert result.returncode == -signal.SIGKILL
    assert "resumed" in result.stderr
    assert checkpoint == "epoch_0001"
    assert names == ["best.safetensors", "epoch_0001", "last.json"]


def test_sigkill_in_checkpoint_write_keeps_previous(killed_chain):
    result, checkpoint, torn_files = killed_chain["write"]
    assert result.returncode == -signal.SIGKILL
    assert checkpoint == "epoch_0001"
    assert "model.safetensors" in torn_files
    assert "trainer.pt" not in torn_files
    assert any(name.startswith(".trainer.pt.") for name in torn_files)


def test_sigterm_saves_step_and_names_resume(killed_chain):
    result, checkpoint = killed_chain["term"]
    assert result.returncode == 128 + signal.SIGTERM
    assert checkpoint == "epoch_0001_step_000003"
    assert "training stopped by SIGTERM" in result.stderr
    assert "resume with: python -m kdexpand.train" in result.stderr
    assert result.stderr.rstrip().endswith("--resume")
    assert "Traceback" not in result.stderr


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Bit-identical final weights and equal per-epoch losses and accuracies."""
    for name in ("expanded.safetensors", "compact.safetensors"):
        expected, actual = load_file(reference / name), load_file(run_dir / name)
        assert expected.keys() == actual.keys()
        for key in expected:
            assert torch.equal(expected[key], actual[key]), f"{name}: {key}"
    last = load_file(reference / "checkpoints" / "epoch_0002" / "model.safetensors")
    resumed_last = load_file(run_dir / "checkpoints" / "epoch_0002" / "model.safetensors")
    for key in last:
        assert torch.equal(last[key], resumed_last[key]), key

    expected = json.loads((reference / "metrics.json").read_text())
    actual = json.loads((run_dir / "metrics.json").read_text())
    for before, after in zip(expected["history"], actual["history"], strict=True):
        assert after["loss_total"] == before["loss_total"]
        assert after["val_top1"] == before["val_top1"]
    assert actual["best"]["epoch"] == expected["best"]["epoch"]
    assert actual["best"]["compact_top1"] == expected["best"]["compact_top1"]


def test_resumed_chain_matches_uninterrupted(killed_chain, reference, in_process):
    from kdexpand.train import main

    run_dir = killed_chain["dir"]
    assert main(cli_args(run_dir, "--resume")) == 0
    assert_same_run(run_dir, reference)
    # Incomplete folders are gone; only the final checkpoint remains.
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("epoch_*")) == ["epoch_0002"]
    assert not list(run_dir.rglob("*.tmp"))


def test_sigint_mid_epoch_resumes_identically(reference, in_process, tmp_path, capsys):
    from kdexpand.tasks.classification import ClassificationTask
    from kdexpand.train import main

    run_dir = tmp_path / "sigint"
    original = ClassificationTask.prepare_batch
    calls = 0

    def interrupting(self, batch, train, generator=None):
        nonlocal calls
        calls += train
        if train and calls == BATCHES_PER_EPOCH + 5:
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, train, generator)

    handler_before = signal.getsignal(signal.SIGINT)
    ClassificationTask.prepare_batch = interrupting
    try:
        status = main(cli_args(run_dir))
    finally:
        ClassificationTask.prepare_batch = original
    error = capsys.readouterr().err
    assert status == 128 + signal.SIGINT
    assert last_checkpoint(run_dir) == "epoch_0001_step_000005"
    assert "training stopped by SIGINT" in error
    assert "--resume" in error

    # The handler is removed after training, so Ctrl-C acts as before again.
    assert signal.getsignal(signal.SIGINT) is handler_before
    assert main(cli_args(run_dir, "--resume")) == 0
    assert_same_run(run_dir, reference)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ("student.model=smallnet3", "student.model"),
        ("data.train_limit=96", "data.train_limit"),
        ("expand.rate=2.0", "expand.rate"),
        ("train.lr=0.5", "train.lr"),
    ],
)
def test_resume_rejects_changed_recipe(reference, in_process, change, key, capsys):
    from kdexpand.train import main

    status = main([*cli_args(reference, "--resume"), "--set", change, "--set", "expand.fallback=cl"])
    error = capsys.readouterr().err
    assert status == 1
    assert error.startswith("error: cannot resume")
    assert f"{key}: " in error
    assert "expand.fallback: None -> 'cl'" in error


def test_resume_accepts_more_epochs_and_logging(reference, in_process, tmp_path, capsys):
    from kdexpand.train import main

    run_dir = tmp_path / "extended"
    shutil.copytree(reference, run_dir)
    changes = ["--set", "train.epochs=3", "--set", "train.log_every=7", "--set", "train.on_nonfinite=skip"]
    assert main([*cli_args(run_dir, "--resume"), *changes]) == 0
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert [entry["epoch"] for entry in history] == [1, 2, 3]


def test_resume_rejects_fewer_epochs(reference, in_process, capsys):
    from kdexpand.train import main

    assert main([*cli_args(reference, "--resume"), "--set", "train.epochs=1"]) == 1
    assert "train.epochs=1 is below the 2 epochs already trained" in capsys.readouterr().err


def test_resume_rejects_changed_cosine_length(reference, in_process, tmp_path, capsys):
    from kdexpand.train import main

    run_dir = tmp_path / "cosine"
    assert main([*cli_args(run_dir), "--set", "train.schedule=cosine", "--set", "train.epochs=1"]) == 0
    assert main([*cli_args(run_dir, "--resume"), "--set", "train.schedule=cosine", "--set", "train.epochs=3"]) == 1
    assert "cosine schedule was built for other train.epochs" in capsys.readouterr().err


def test_resume_without_run_is_rejected(in_process, tmp_path, capsys):
    from kdexpand.train import main

    assert main(cli_args(tmp_path / "nothing", "--resume")) == 1
    assert "contains no run" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


if __name__ == "__main__":
    sys.exit(run_with_fault(sys.argv[1], sys.argv[2:]))


def test_sigterm_to_accelerate_launcher_stops_training(tmp_path, shared_data):
    """SIGTERM to a one-process ``accelerate launch`` reaches training, which saves and exits."""
    import time

    out = tmp_path / "launched"
    log = tmp_path / "launch.log"
    sets = [part for pair in ["data.train_limit=512", "data.eval_limit=32", "train.epochs=500",
                              "output.tensorboard=false", f"output.dir={out}"] for part in ("--set", pair)]
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "1",
               "-m", "kdexpand.train", RECIPE, *sets]
    env = {**os.environ, "KDEXPAND_DATA": str(shared_data), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as output:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while not (out / "checkpoints" / "last.json").is_file() and time.monotonic() < deadline:
                time.sleep(0.2)
            trainer_pid = int((out / ".kdexpand-run").read_text())
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(timeout=60)
            deadline = time.monotonic() + 120
            while _alive(trainer_pid) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            if launcher.poll() is None:
                launcher.kill()

    assert not _alive(trainer_pid)
    text = log.read_text()
    assert "stopped by SIGTERM" in text or "--resume" in text, text[-3000:]
    assert "--resume" in text
    assert "run directory:" not in text  # training did not run on to the end


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # kill(pid, 0) also succeeds for a zombie, so /proc tells a finished process apart.
    status = Path(f"/proc/{pid}/status")
    return not status.is_file() or "State:\tZ" not in status.read_text()


def test_repeated_signal_within_a_second_counts_once():
    from kdexpand.trainer.interrupt import StopRequest

    with StopRequest() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        recorded = stop.signal_number

    assert recorded == signal.SIGTERM


def test_later_second_signal_acts_at_once(monkeypatch):
    from kdexpand.trainer import interrupt

    monkeypatch.setattr(interrupt, "_REPEAT_SECONDS", 0.0)
    with pytest.raises(KeyboardInterrupt):
        with interrupt.StopRequest():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
