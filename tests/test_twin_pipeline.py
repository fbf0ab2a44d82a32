"""Nonlinear-twin initialization through the real entry point on a 512-image slice of CIFAR-10.

The interrupted runs are real ``python`` processes running :func:`kdexpand.train.main` through
this file's ``__main__`` block. That block patches one function to SIGKILL the process at the
start of a chosen stage or epoch, so nothing in the package reads a test hook.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kdexpand
from kdexpand.models import SmallNet
from kdexpand.recipe import RecipeError, load_recipe
from kdexpand.train import main
from kdexpand.trainer.pipeline import decide_twin

REPO = Path(__file__).resolve().parents[1]
RECIPE = "recipes/cifar_ck_fc_init.yaml"
EVAL_LIMIT = 256
# Batches of 32 give 15 steps per epoch, enough for the predictions to leave a single class.
SLICE = [
    "data.train_limit=512", f"data.eval_limit={EVAL_LIMIT}", "train.deterministic=true", "train.lr=0.05",
    "train.batch_size=32", "init.twin.epochs=1",
]
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])
TWIN_KD = "{ce_weight: 0.1, losses: [{name: kd, weight: 0.9, params: {temperature: 4.0}}]}"
# One image of EVAL_LIMIT is 0.39 points; torchmetrics accumulates in float32.
ACCURACY_TOLERANCE = 1e-4


def train(
    out: Path, env: dict[str, str], *pairs: str, resume: bool = False, kill_at: str | None = None
) -> subprocess.CompletedProcess:
    """Run the command line on RECIPE with SLICE, ``output.dir=out`` and ``pairs``.

    Without ``kill_at`` this is ``python -m kdexpand.train`` and must succeed. With it, this
    file's ``__main__`` block runs the command line and SIGKILLs it at ``kill_at``.
    """
    sets = [part for pair in (*SLICE, f"output.dir={out}", *pairs) for part in ("--set", pair)]
    arguments = [RECIPE, *sets, *(["--resume"] if resume else [])]
    entry = ["-m", "kdexpand.train"] if kill_at is None else [str(Path(__file__).resolve()), kill_at]
    result = subprocess.run(
        [sys.executable, *entry, *arguments], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    expected = 0 if kill_at is None else -signal.SIGKILL
    assert result.returncode == expected, result.stderr[-3000:]
    return result


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def checkpoint(run_dir: Path, stage: str, name: str) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / stage / name)


def cifar_test_slice(shared_data: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and normalize the first EVAL_LIMIT test images with PIL and NumPy only."""
    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(0, EVAL_LIMIT)
    images = np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"])).convert("RGB")) for c in table["img"].to_pylist()])
    normalized = (images / 255.0 - CIFAR_MEAN) / CIFAR_STD  # N, H, W, C
    inputs = torch.from_numpy(normalized.transpose(0, 3, 1, 2).astype(np.float32))
    return inputs, np.asarray(table["label"].to_pylist())


def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model.eval()(inputs).argmax(1).numpy()
    return 100.0 * float((predictions == labels).mean())


def expanded_smallnet(weights: dict[str, torch.Tensor], nonlinear: bool) -> torch.nn.Module:
    model = kdexpand.expand(SmallNet(10, 7), conv="ck", fc=True, rate=4.0, nonlinear=nonlinear)
    model.load_state_dict(weights, strict=True)
    return model


def twin_files(run_dir: Path) -> dict[Path, int]:
    """Return the modification time in ns of every file of the twin stage."""
    return {path: path.stat().st_mtime_ns for path in (run_dir / "checkpoints" / "twin").rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def full_run(env, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs") / "full"
    return out, train(out, env, "train.epochs=2")


@pytest.mark.slow
def test_metrics_cover_every_stage(full_run):
    run_dir, _ = full_run
    metrics = metrics_of(run_dir)
    stages = metrics["init"]["stages"]

    assert set(stages) == {"twin", "transfer", "linear", "contract"}
    for key in ("val_top1", "test_top1", "test_top5", "best_epoch", "history"):
        assert key in stages["twin"], f"twin.{key}"
    assert stages["twin"]["epochs"] == 1
    for key in ("val_top1", "val_top5", "test_top1", "test_top5"):
        assert key in stages["transfer"], f"transfer.{key}"
    assert stages["transfer"]["source"] == "twin"
    assert stages["linear"]["epochs"] == 2
    assert stages["linear"]["test_top1"] == metrics["best"]["expanded_top1"]
    assert stages["contract"]["test_top1"] == metrics["best"]["compact_top1"]
    assert stages["contract"]["contraction_max_abs_diff"] < 1e-4
    assert [entry["epoch"] for entry in metrics["history"]] == [1, 2]


@pytest.mark.slow
def test_keep_always_decision_logged(full_run):
    run_dir, result = full_run
    decision = metrics_of(run_dir)["init"]["decision"]

    assert decision["keep"] == "always"
    assert decision["used_twin"] is True
    assert decision["baseline_val_top1"] is None
    assert "twin initialization kept" in result.stderr
    assert "initialization kept: init.twin.keep is 'always'" in result.stdout


@pytest.mark.slow
def test_stage_folders_and_markers(full_run):
    run_dir, _ = full_run
    folder = run_dir / "checkpoints"

    assert (folder / "initial.safetensors").is_file()
    for stage in ("twin", "linear"):
        for name in ("done.json", "best.safetensors", "last.json"):
            assert (folder / stage / name).is_file(), f"{stage}/{name}"
    assert (folder / "transfer" / "done.json").is_file()
    assert (folder / "transfer" / "model.safetensors").is_file()
    assert not (folder / "baseline").exists()
    assert not (folder / "last.json").exists()


@pytest.mark.slow
def test_transfer_copies_twin_best(full_run):
    run_dir, _ = full_run
    twin = checkpoint(run_dir, "twin", "best.safetensors")
    start = checkpoint(run_dir, "transfer", "model.safetensors")
    initial = load_file(run_dir / "checkpoints" / "initial.safetensors")

    assert start.keys() == twin.keys() == initial.keys()
    for key, tensor in twin.items():
        assert torch.equal(start[key], tensor), key
    assert not torch.equal(twin["features.0.layers.0.weight"], initial["features.0.layers.0.weight"])


@pytest.mark.slow
def test_stage_accuracies_match_models(full_run, shared_data):
    run_dir, _ = full_run
    stages = metrics_of(run_dir)["init"]["stages"]
    weights = checkpoint(run_dir, "twin", "best.safetensors")
    twin = expanded_smallnet(weights, nonlinear=True)
    linear = expanded_smallnet(weights, nonlinear=False)
    inputs, labels = cifar_test_slice(shared_data)

    # The twin stage trained the model with ReLUs; the transfer stage scores it without them.
    with torch.no_grad():
        assert not torch.allclose(twin.eval()(inputs[:16]), linear.eval()(inputs[:16]), atol=1e-3)
    assert accuracy(twin, inputs, labels) == pytest.approx(stages["twin"]["test_top1"], abs=ACCURACY_TOLERANCE)
    assert accuracy(linear, inputs, labels) == pytest.approx(stages["transfer"]["test_top1"], abs=ACCURACY_TOLERANCE)


@pytest.mark.slow
def test_compact_loads_strictly(full_run, shared_data):
    run_dir, _ = full_run
    compact = SmallNet(num_classes=10, kernel_size=7)
    compact.load_state_dict(load_file(run_dir / "compact.safetensors"), strict=True)
    inputs, labels = cifar_test_slice(shared_data)

    expected = metrics_of(run_dir)["best"]["compact_top1"]
    assert accuracy(compact, inputs, labels) == pytest.approx(expected, abs=ACCURACY_TOLERANCE)


@pytest.mark.slow
def test_tensorboard_stage_prefixes(full_run):
    run_dir, _ = full_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    for tag in ("twin/train/loss_total", "twin/train/lr", "twin/val/top1", "twin/test/top1", "twin/step/loss_total",
                "transfer/val/top1", "transfer/test/top1", "linear/train/loss_total", "linear/val/top1",
                "linear/step/loss_total"):
        assert tag in tags, tag
    assert "val/top1" not in tags
    assert [event.step for event in events.Scalars("linear/val/top1")] == [1, 2]
    assert [event.step for event in events.Scalars("twin/val/top1")] == [1]


@pytest.mark.slow
def test_killed_runs_resume_by_stage(full_run, env, tmp_path):
    out = tmp_path / "killed"

    # Killed when the transfer stage starts: the twin stage has finished.
    first = train(out, env, "train.epochs=2", kill_at="transfer")
    assert "twin/epoch 1/1:" in first.stderr
    assert (out / "checkpoints" / "twin" / "done.json").is_file()
    assert not (out / "checkpoints" / "transfer").exists()
    twin_before = twin_files(out)

    # Resumed after the twin stage, then killed when the second linear epoch starts.
    second = train(out, env, "train.epochs=2", resume=True, kill_at="linear-epoch-2")
    assert "stage twin finished in an earlier session" in second.stderr
    assert "twin/epoch" not in second.stderr
    assert "linear/epoch 1/2:" in second.stderr
    assert json.loads((out / "checkpoints" / "linear" / "last.json").read_text())["dir"] == "epoch_0001"

    # Resumed in the linear stage.
    third = train(out, env, "train.epochs=2", resume=True)
    for stage in ("twin", "transfer"):
        assert f"stage {stage} finished in an earlier session" in third.stderr, stage
    assert "stage linear: 1 of 2 epochs done" in third.stderr
    assert "twin/epoch" not in third.stderr
    assert "linear/epoch 1/2:" not in third.stderr
    assert twin_files(out) == twin_before

    # Deterministic training: the interrupted run ends exactly where the uninterrupted one does.
    reference, resumed = metrics_of(full_run[0]), metrics_of(out)
    assert [entry["epoch"] for entry in resumed["history"]] == [1, 2]
    for before, after in zip(reference["history"], resumed["history"]):
        assert after["loss_total"] == before["loss_total"]
        assert after["val_top1"] == before["val_top1"]
    for key in ("val_top1", "test_top1", "best_epoch"):
        assert resumed["init"]["stages"]["twin"][key] == reference["init"]["stages"]["twin"][key], key
    compact, expected = load_file(out / "compact.safetensors"), load_file(full_run[0] / "compact.safetensors")
    for key, tensor in expected.items():
        assert torch.equal(compact[key], tensor), key


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    """Save a randomly initialized timm resnet18: the tests check where KD applies, not its accuracy."""
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.safetensors"
    save_file({name: value.contiguous() for name, value in teacher.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def if_better_run(env, teacher_checkpoint, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """Run ``keep: if_better`` with KD in the twin and baseline stages only, on 256 images."""
    out = tmp_path_factory.mktemp("runs") / "if_better"
    result = train(
        out, env, "data.train_limit=256", "train.epochs=1", "init.twin.keep=if_better", "teacher.model=resnet18",
        f"teacher.checkpoint={teacher_checkpoint}", f"init.twin.distill={TWIN_KD}",
    )
    return out, result


@pytest.mark.slow
def test_keep_if_better_logs_decision(if_better_run):
    out, result = if_better_run
    init = metrics_of(out)["init"]
    decision, stages = init["decision"], init["stages"]

    assert set(stages) == {"twin", "baseline", "transfer", "linear", "contract"}
    assert decision["keep"] == "if_better"
    assert decision["twin_val_top1"] == stages["twin"]["val_top1"]
    assert decision["baseline_val_top1"] == stages["baseline"]["val_top1"]
    assert decision["used_twin"] == (stages["twin"]["val_top1"] > stages["baseline"]["val_top1"])
    assert ("twin initialization kept" in result.stderr) == decision["used_twin"]
    assert "twin val top1" in decision["reason"]

    source = "twin/best.safetensors" if decision["used_twin"] else "initial.safetensors"
    expected = load_file(out / "checkpoints" / source)
    start = checkpoint(out, "transfer", "model.safetensors")
    for key, tensor in expected.items():
        assert torch.equal(start[key], tensor), key


@pytest.mark.slow
def test_twin_distill_stays_in_twin_stages(if_better_run):
    out, _ = if_better_run
    metrics = metrics_of(out)
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])

    for stage in ("twin", "baseline"):
        assert f"{stage}/train/loss_kd" in tags, stage
        assert f"{stage}/step/loss_kd" in tags, stage
        assert "loss_kd" in metrics["init"]["stages"][stage]["history"][0], stage
    assert "linear/train/loss_task" in tags
    assert "linear/train/loss_kd" not in tags
    assert "loss_kd" not in metrics["history"][0]


def test_decide_twin_rules():
    assert decide_twin("always", "top1", 10.0, None)["used_twin"] is True
    assert decide_twin("if_better", "top1", 50.5, 50.0)["used_twin"] is True
    assert decide_twin("if_better", "top1", 50.0, 50.0)["used_twin"] is False
    assert decide_twin("if_better", "top1", 49.0, 50.0)["used_twin"] is False
    assert decide_twin("if_better", "top1", 49.0, 50.0)["reason"] == "twin val top1 49.00 <= plain ExpandNet val top1 50.00"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("init.twin.epoch=3", "init.twin.epoch: unknown key; did you mean 'epochs'?"),
        ("init.twin={epochs: 2, keep: sometimes}", "init.twin.keep: Input should be 'always' or 'if_better'"),
        ("init.twinn={epochs: 2}", "init.twinn: unknown key; did you mean 'twin'?"),
        ("init.twin={epochs: 2, warmup_epochs: 2}", "init.twin.warmup_epochs=2 must be < init.twin.epochs=2"),
        ("init.twin={epochs: 2, distill: {losses: [{name: kd}]}}", "init.twin.distill.losses ['kd'] need a teacher"),
        ("init.twin={epochs: 2, batch_size: 64}", "init.twin.batch_size: unknown key"),
    ],
)
def test_bad_init_keys_rejected(override, message):
    with pytest.raises(RecipeError, match="invalid recipe") as error:
        load_recipe(REPO / "recipes" / "cifar10_ckfc.yaml", [override])
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        ("cifar10_smallnet7.yaml", "init.twin needs an expanded student"),
        ("cifar10_acnet.yaml", "ACNet branches are parallel"),
    ],
)
def test_init_needs_linear_expansion(recipe, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(REPO / "recipes" / recipe, ["init.twin.epochs=2"])


def test_twin_settings_inherit_train(recipes_dir):
    recipe = load_recipe(recipes_dir / "cifar_ck_fc_kd_init.yaml", ["init.twin.lr=0.1"])
    twin = recipe.init.twin.train_config(recipe.train)

    assert twin.epochs == 150
    assert twin.lr == 0.1
    assert twin.milestones == recipe.train.milestones == [50, 100]
    assert twin.weight_decay == recipe.train.weight_decay == 5e-4
    assert recipe.init.twin.distill.losses == []
    assert [term.name for term in recipe.distill.losses] == ["kd"]


def test_cli_rejects_bad_init_key(tmp_path, capsys):
    status = main([RECIPE, "--set", "init.twin.kep=always", "--set", f"output.dir={tmp_path}/run"])

    assert status == 2
    assert "init.twin.kep: unknown key; did you mean 'keep'?" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def _kill_on_call(owner, name: str, when) -> None:
    """Patch ``owner.name`` to SIGKILL this process on its first call for which ``when`` holds."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        if when(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(owner, name, wrapper)


if __name__ == "__main__":
    # import_module returns the modules themselves: kdexpand.trainer re-exports a function named run.
    pipeline = importlib.import_module("kdexpand.trainer.pipeline")
    train_loop = importlib.import_module("kdexpand.trainer.run")

    point, argv = sys.argv[1], sys.argv[2:]
    if point == "transfer":
        _kill_on_call(pipeline, "_transfer_stage", lambda *args: True)
    elif point == "linear-epoch-2":
        _kill_on_call(train_loop, "train_epoch", lambda ctx, epoch, *rest: ctx.stage == "linear" and epoch == 1)
    else:
        raise SystemExit(f"unknown kill point {point!r}; use transfer or linear-epoch-2")
    sys.exit(main(argv))
