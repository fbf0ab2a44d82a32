"""One run per run directory: the lock on the run marker, in-process and across processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdexpand.trainer import lock as lock_module
from kdexpand.trainer.lock import MARKER_FILE, RunDirectoryBusy, RunDirectoryLock, check_not_in_use

REPO = Path(__file__).resolve().parents[1]

HOLD_LOCK = """
import sys, time
from pathlib import Path
from kdexpand.trainer.lock import RunDirectoryLock
held = RunDirectoryLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


@pytest.fixture(autouse=True)
def short_wait(monkeypatch):
    monkeypatch.setattr(lock_module, "_ACQUIRE_SECONDS", 0.2)


def test_second_lock_rejected_with_pid(tmp_path):
    held = RunDirectoryLock(tmp_path).acquire()
    try:
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another run \(PID {os.getpid()}\)"):
            RunDirectoryLock(tmp_path).acquire()
        with pytest.raises(RunDirectoryBusy, match="set output.dir to another folder"):
            check_not_in_use(tmp_path)
    finally:
        held.release()


def test_released_lock_can_be_taken(tmp_path):
    RunDirectoryLock(tmp_path).acquire().release()
    check_not_in_use(tmp_path)
    again = RunDirectoryLock(tmp_path).acquire()

    assert (tmp_path / MARKER_FILE).read_text().strip() == str(os.getpid())
    again.release()
    again.release()


def test_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryBusy, match=f"PID {holder.pid}"):
            check_not_in_use(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)

    RunDirectoryLock(tmp_path).acquire().release()


def test_second_run_rejected_while_first_trains(env, tmp_path):
    """A second run with --overwrite on a training run's folder fails and changes nothing."""
    out = tmp_path / "run"
    pairs = ["data.train_limit=512", "data.eval_limit=100", "train.epochs=500", f"output.dir={out}",
             "output.tensorboard=false"]
    command = [sys.executable, "-m", "kdexpand.train", "recipes/cifar10_ck.yaml"]
    for pair in pairs:
        command += ["--set", pair]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints").is_dir() and time.monotonic() < deadline:
            time.sleep(0.2)
        second = subprocess.run(
            [*command, "--overwrite", "--set", "train.epochs=1"], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=300,
        )
        first.send_signal(signal.SIGINT)
        _, first_err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()

    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 1
    assert len(errors) == 1
    assert f"is in use by another run (PID {first.pid})" in errors[0]
    assert "Traceback" not in second.stderr
    # The first run stops on SIGINT with a checkpoint, as usual, and its recipe is untouched.
    assert first.returncode == 130, first_err[-3000:]
    assert "epochs: 500" in (out / "recipe.yaml").read_text()
