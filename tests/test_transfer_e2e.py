"""Knowledge-transfer runs through the real entry point on a 512-image slice of CIFAR-10.

Two runs of ``python -m kdexpand.train``. The first trains the 3x3 SmallNet as
ExpandNet-CL+FC with two-stage FitNets (a hint stage, then KD) and resumes it for one more
epoch. The second combines cross-entropy, KD and PKT.
The teacher is a randomly initialized timm resnet18 saved as a checkpoint, because these
tests check the transfer machinery, not the accuracy a trained teacher gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kdexpand.models import SmallNet

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SLICE = ["data.train_limit=512", "data.eval_limit=256", "train.deterministic=true", "train.log_every=1"]
REGRESSOR_KEYS = {"losses.0.regressor.layers.0.weight", "losses.0.regressor.layers.0.bias"}


def train(recipe: str, settings: list[str], env: dict[str, str], *flags: str) -> subprocess.CompletedProcess:
    """Run the entry point as a user would and return the finished process."""
    command = [sys.executable, "-m", "kdexpand.train", recipe, *flags]
    for setting in [*SLICE, *settings]:
        command += ["--set", setting]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Return every TensorBoard scalar of the run as (step, value) pairs sorted by step.

    A resumed run writes one event file per session; their scalars are merged.
    """
    merged: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "tensorboard").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            merged.setdefault(tag, []).extend((event.step, event.value) for event in accumulator.Scalars(tag))
    return {tag: sorted(values) for tag, values in merged.items()}


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "metrics.json").read_text())["history"]


@pytest.fixture(scope="module")
def teacher_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path_factory.mktemp("teacher") / "resnet18.safetensors"
    save_file({name: value.contiguous() for name, value in teacher.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def fitnet_run(env, teacher_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """Two epochs (one hint epoch), then a resume to three; return the run and a copy of epoch 2."""
    run_dir = tmp_path_factory.mktemp("runs") / "fitnet"
    settings = [
        "train.epochs=2",
        "train.milestones=[1]",
        "distill.hint_stage.epochs=1",
        f"teacher.checkpoint={teacher_checkpoint}",
        f"output.dir={run_dir}",
    ]
    result = train("recipes/cifar10_smallnet3_clfc_hint.yaml", settings, env)
    assert result.returncode == 0, result.stderr[-3000:]
    epoch2 = tmp_path_factory.mktemp("epoch2") / "distiller.safetensors"
    epoch2.write_bytes((run_dir / "checkpoints" / "epoch_0002" / "distiller.safetensors").read_bytes())

    result = train("recipes/cifar10_smallnet3_clfc_hint.yaml", [*settings, "train.epochs=3"], env, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, epoch2


def test_fitnet_stages_in_history(fitnet_run):
    run_dir, _ = fitnet_run
    epochs = history(run_dir)
    assert [entry["epoch"] for entry in epochs] == [1, 2, 3]

    hint_epoch = epochs[0]
    assert "loss_hint_stage.hint" in hint_epoch
    assert "loss_kd" not in hint_epoch
    assert hint_epoch["loss_total"] == pytest.approx(hint_epoch["loss_hint_stage.hint"], rel=1e-6)
    for entry in epochs[1:]:
        assert "loss_hint_stage.hint" not in entry
        expected = 0.1 * entry["loss_task"] + 0.9 * entry["loss_kd"]
        assert entry["loss_total"] == pytest.approx(expected, rel=1e-5)


def test_fitnet_terms_logged_separately(fitnet_run):
    run_dir, _ = fitnet_run
    logged = scalars(run_dir)
    hint_steps = [step for step, _ in logged["step/loss_hint_stage.hint"]]
    kd_steps = [step for step, _ in logged["step/loss_kd"]]
    # 461 training images after the validation hold-out: 4 batches of 128 per epoch.
    assert hint_steps == [0, 1, 2, 3]
    assert kd_steps == list(range(4, 12))
    assert len(logged["step/loss_task"]) == 12
    assert len(logged["step/loss_total"]) == 12
    assert [step for step, _ in logged["train/loss_hint_stage.hint"]] == [1]


def test_fitnet_regressor_checkpointed_and_resumed(fitnet_run):
    run_dir, epoch2 = fitnet_run
    before = load_file(str(epoch2))
    after = load_file(str(run_dir / "checkpoints" / "epoch_0003" / "distiller.safetensors"))
    assert set(before) == REGRESSOR_KEYS
    assert set(after) == REGRESSOR_KEYS
    # The regressor trains only in the hint stage, so a resumed run carries it unchanged.
    for key in REGRESSOR_KEYS:
        assert torch.equal(before[key], after[key]), key


def test_fitnet_export_drops_regressor(fitnet_run):
    run_dir, _ = fitnet_run
    compact = load_file(str(run_dir / "compact.safetensors"))
    expanded = load_file(str(run_dir / "expanded.safetensors"))
    assert not any("regressor" in key for key in [*compact, *expanded])
    SmallNet(10, kernel_size=3).load_state_dict(compact, strict=True)


@pytest.fixture(scope="module")
def kd_pkt_run(env, teacher_checkpoint, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "kd_pkt"
    losses = (
        "distill.losses=[{name: pkt, weight: 234.375, student: relu, teacher: global_pool},"
        " {name: kd, weight: 0.9, params: {temperature: 4.0}}]"
    )
    settings = [
        "train.epochs=2",
        "distill.ce_weight=0.1",
        losses,
        f"teacher.checkpoint={teacher_checkpoint}",
        f"output.dir={run_dir}",
    ]
    result = train("recipes/cifar10_smallnet3_clfc_pkt.yaml", settings, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_kd_pkt_terms_logged_separately(kd_pkt_run):
    logged = scalars(kd_pkt_run)
    for tag in ("step/loss_total", "step/loss_task", "step/loss_kd", "step/loss_pkt"):
        assert [step for step, _ in logged[tag]] == list(range(8)), tag
    for tag in ("train/loss_total", "train/loss_task", "train/loss_kd", "train/loss_pkt"):
        assert [step for step, _ in logged[tag]] == [1, 2], tag

    parts = {tag: dict(logged[f"step/loss_{tag}"]) for tag in ("total", "task", "kd", "pkt")}
    for step in range(8):
        expected = 0.1 * parts["task"][step] + 0.9 * parts["kd"][step] + 234.375 * parts["pkt"][step]
        assert parts["total"][step] == pytest.approx(expected, rel=1e-5), step
        assert parts["pkt"][step] > 0, step


def test_kd_pkt_run_finishes(kd_pkt_run):
    metrics = json.loads((kd_pkt_run / "metrics.json").read_text())
    assert metrics["last"]["epoch"] == 2
    assert metrics["last"]["contraction_max_abs_diff"] < 1e-4
    assert not (kd_pkt_run / "checkpoints" / "epoch_0002" / "distiller.safetensors").exists()
