"""Numeric failures, with in-process runs on 128 CIFAR-10 images.

A NaN or inf loss stops the run or skips the step. A failed contraction check fails the run
and keeps the trained ExpandNet.

Non-finite values are injected by patching the task loss or the KD loss for one call, so
the failing step is known exactly.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import kdexpand
from kdexpand.losses.kd import KDLoss
from kdexpand.models import SmallNet
from kdexpand.tasks.classification import ClassificationTask
from kdexpand.train import main
from kdexpand.trainer import nonfinite_parts

REPO = Path(__file__).resolve().parents[1]
STUDENT = str(REPO / "recipes" / "cifar10_ck.yaml")
KD_STUDENT = str(REPO / "recipes" / "cifar10_ck_kd.yaml")
BATCHES_PER_EPOCH = 8  # 115 training images in batches of 16
SLICE = [
    "data.train_limit=128", "data.eval_limit=32", "train.batch_size=16", "train.deterministic=true",
    "output.tensorboard=false",
]


def cli_args(recipe: str, out: Path, *pairs: str, flags: tuple[str, ...] = ()) -> list[str]:
    return [recipe, *[part for pair in [*SLICE, f"output.dir={out}", *pairs] for part in ("--set", pair)], *flags]


@pytest.fixture(autouse=True)
def data_env(shared_data, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KDEXPAND_DATA", str(shared_data))
    monkeypatch.setenv("KDEXPAND_CACHE", str(tmp_path_factory.getbasetemp() / "numeric_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield
    torch.use_deterministic_algorithms(False)


def poison(monkeypatch, owner: type, name: str, call: int, value: float) -> None:
    """Make the ``call``-th call of ``owner.name`` return ``value`` (a NaN or inf loss)."""
    original = getattr(owner, name)
    count = 0

    def patched(*args, **kwargs):
        nonlocal count
        count += 1
        result = original(*args, **kwargs)
        return torch.full_like(result, value) if count == call else result

    monkeypatch.setattr(owner, name, patched)


def error_line(stderr: str) -> str:
    """Return the one ``error:`` line among progress bars (``splitlines`` also splits at ``\\r``)."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "last.json").read_text())["dir"]


class _OneProcess:
    num_processes = 1


def test_nonfinite_parts_names_terms():
    parts = {"task": torch.tensor(1.0), "kd": torch.tensor(math.inf), "total": torch.tensor(math.nan)}
    assert nonfinite_parts(parts, _OneProcess()) == ["kd", "total"]
    assert nonfinite_parts({"task": torch.tensor(2.0)}, _OneProcess()) == []


def test_nan_stops_naming_step_term_checkpoint(monkeypatch, tmp_path, capsys):
    run_dir = tmp_path / "nan"
    poison(monkeypatch, ClassificationTask, "loss", BATCHES_PER_EPOCH + 3, math.nan)
    assert main(cli_args(STUDENT, run_dir, "train.epochs=2")) == 1
    error = error_line(capsys.readouterr().err)

    assert error.startswith("error: non-finite loss at epoch 2 step 3")
    assert "task=nan" in error
    assert f"the last good checkpoint is {run_dir / 'checkpoints' / 'epoch_0001'}" in error
    assert "--set train.on_nonfinite=skip" in error
    assert last_checkpoint(run_dir).name == "epoch_0001"
    assert not (run_dir / "metrics.json").exists()

    # The advice works: resumed with skip, the same batch is skipped and the run finishes.
    poison(monkeypatch, ClassificationTask, "loss", 3, math.nan)
    assert main([*cli_args(STUDENT, run_dir, "train.epochs=2", "train.on_nonfinite=skip"), "--resume"]) == 0
    history = json.loads((run_dir / "metrics.json").read_text())["history"]
    assert "skipped_steps" not in history[0]
    assert history[1]["skipped_steps"] == 1
    assert all(math.isfinite(entry["loss_total"]) for entry in history)


def test_inf_in_transfer_term_is_named(monkeypatch, tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=10).state_dict(), str(teacher))
    poison(monkeypatch, KDLoss, "forward", 2, math.inf)
    args = cli_args(KD_STUDENT, tmp_path / "kd", "train.epochs=1", "teacher.model=test_resnet", f"teacher.checkpoint={teacher}")
    assert main(args) == 1
    error = error_line(capsys.readouterr().err)

    assert error.startswith("error: non-finite loss at epoch 1 step 2")
    assert "kd=inf" in error
    assert "total=inf" in error
    assert "task=" not in error
    assert "no checkpoint was saved yet" in error


def test_skip_keeps_weights_finite(monkeypatch, tmp_path, caplog):
    run_dir = tmp_path / "skip"
    poison(monkeypatch, ClassificationTask, "loss", 4, math.nan)
    with caplog.at_level(logging.WARNING, logger="kdexpand.trainer.step"):
        assert main(cli_args(STUDENT, run_dir, "train.epochs=1", "train.on_nonfinite=skip")) == 0

    assert any("non-finite loss at epoch 1 step 4" in record.getMessage() for record in caplog.records)
    assert any("1 steps of this epoch were skipped" in record.getMessage() for record in caplog.records)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["history"][0]["skipped_steps"] == 1
    for key, tensor in load_file(run_dir / "expanded.safetensors").items():
        assert torch.isfinite(tensor).all(), key


def test_contraction_failure_keeps_expanded(monkeypatch, tmp_path, capsys):
    import importlib

    # The package exports a function named finish_run; patch the module's comparison.
    finish = importlib.import_module("kdexpand.trainer.finish")
    monkeypatch.setattr(finish, "max_logit_difference", lambda expanded, compact, inputs: (1.0, 1.0))
    run_dir = tmp_path / "contract"
    assert main(cli_args(STUDENT, run_dir, "train.epochs=1")) == 1
    error = error_line(capsys.readouterr().err)

    assert error.startswith("error: contraction check failed")
    assert f"is kept in {run_dir / 'expanded.safetensors'}" in error
    assert not (run_dir / "compact.safetensors").exists()
    assert not (run_dir / "metrics.json").exists()

    kept = load_file(run_dir / "expanded.safetensors")
    best = load_file(last_checkpoint(run_dir) / "best.safetensors")
    assert kept.keys() == best.keys()
    for key in kept:
        assert torch.equal(kept[key], best[key]), key
    model = kdexpand.expand(SmallNet(10, 7), conv="ck", rate=4.0)
    model.load_state_dict(kept, strict=True)


def test_skip_drops_batchnorm_update_of_nan_batch(monkeypatch, tmp_path):
    """A NaN input batch updates no running statistics when its step is skipped."""
    original = ClassificationTask.prepare_batch
    calls = 0

    def nan_third_training_batch(self, batch, train, generator=None):
        nonlocal calls
        inputs, targets = original(self, batch, train, generator)
        if train:
            calls += 1
            if calls == 3:
                inputs = torch.full_like(inputs, math.nan)
        return inputs, targets

    monkeypatch.setattr(ClassificationTask, "prepare_batch", nan_third_training_batch)
    run_dir = tmp_path / "nan_input"
    assert main(cli_args(STUDENT, run_dir, "train.epochs=1", "train.on_nonfinite=skip")) == 0

    weights = load_file(run_dir / "expanded.safetensors")
    running = [key for key in weights if key.endswith(("running_mean", "running_var"))]
    assert running
    for key in running:
        assert torch.isfinite(weights[key]).all(), key
    assert json.loads((run_dir / "metrics.json").read_text())["history"][0]["skipped_steps"] == 1


def _poison_gradient(monkeypatch, call: int) -> None:
    """Make the ``call``-th backward pass leave an infinite gradient behind a finite loss."""
    from accelerate import Accelerator

    original = Accelerator.backward
    count = 0

    def backward(self, loss, **kwargs):
        nonlocal count
        original(self, loss, **kwargs)
        count += 1
        if count == call:
            for parameter in self._models[0].parameters():
                if parameter.grad is not None:
                    parameter.grad.fill_(math.inf)
                    return

    monkeypatch.setattr(Accelerator, "backward", backward)


def test_inf_gradient_stops_naming_step(monkeypatch, tmp_path, capsys):
    _poison_gradient(monkeypatch, 3)
    assert main(cli_args(STUDENT, tmp_path / "grad", "train.epochs=1")) == 1
    error = error_line(capsys.readouterr().err)

    assert error.startswith("error: non-finite gradient at epoch 1 step 3")
    assert "every loss term was finite" in error


def test_inf_gradient_skipped(monkeypatch, tmp_path):
    _poison_gradient(monkeypatch, 3)
    run_dir = tmp_path / "grad_skip"
    assert main(cli_args(STUDENT, run_dir, "train.epochs=1", "train.on_nonfinite=skip")) == 0

    assert json.loads((run_dir / "metrics.json").read_text())["history"][0]["skipped_steps"] == 1
    for key, tensor in load_file(run_dir / "expanded.safetensors").items():
        assert torch.isfinite(tensor).all(), key


def test_diverged_run_fails_contraction(tmp_path, capsys):
    """lr=1e38 with skip: every later loss is NaN and skipped, and the final check fails the run."""
    run_dir = tmp_path / "overflow"
    assert main(cli_args(STUDENT, run_dir, "train.epochs=1", "train.lr=1e38", "train.on_nonfinite=skip")) == 1
    error = error_line(capsys.readouterr().err)

    assert error.startswith("error: contraction check failed: the logits are not finite")
    assert not (run_dir / "compact.safetensors").exists()
    assert not (run_dir / "metrics.json").exists()


def test_nonfinite_parameters_stop_before_save(tmp_path):
    from types import SimpleNamespace

    from kdexpand.trainer import LossCheckError
    from kdexpand.trainer.step import check_parameters_finite

    student = SmallNet(10, 7)
    with torch.no_grad():
        student.fc.weight[0, 0] = math.inf
    ctx = SimpleNamespace(student=student, distiller=torch.nn.Module(), log_prefix="", checkpoint_dir=tmp_path)
    with pytest.raises(LossCheckError, match=r"parameters became non-finite in epoch 2 \(fc.weight\)"):
        check_parameters_finite(ctx, 1)

    with torch.no_grad():
        student.fc.weight[0, 0] = 0.0
    check_parameters_finite(ctx, 1)


def test_nonfinite_contraction_difference_fails():
    finish = importlib.import_module("kdexpand.trainer.finish")
    with pytest.raises(finish.ContractionError, match="the logits are not finite"):
        finish._check_difference(math.nan, math.nan, 1e-4)
    with pytest.raises(finish.ContractionError, match="the logits are not finite"):
        finish._check_difference(0.0, math.inf, 1e-4)


def test_metrics_json_writes_nan_as_null(tmp_path):
    from kdexpand.io import write_json

    path = write_json(tmp_path / "metrics.json", {"a": math.nan, "b": [1.5, math.inf], "c": {"d": -math.inf}})

    assert json.loads(path.read_text()) == {"a": None, "b": [1.5, None], "c": {"d": None}}
    assert "NaN" not in path.read_text()


def test_epoch_of_only_skipped_steps_stops(monkeypatch, tmp_path, capsys):
    """With skip, an epoch in which every loss was non-finite stops with one line, not a KeyError."""
    original = ClassificationTask.loss
    monkeypatch.setattr(
        ClassificationTask, "loss", lambda self, outputs, targets: torch.full_like(original(self, outputs, targets), math.nan)
    )
    status = main(cli_args(STUDENT, tmp_path / "all_skipped", "train.epochs=1", "train.on_nonfinite=skip"))
    error = error_line(capsys.readouterr().err)

    assert status == 1
    assert error.startswith("error: every step of epoch 1 had a non-finite loss and was skipped")
    assert "Traceback" not in error
