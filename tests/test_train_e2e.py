"""The real entry point on a 512-image slice of CIFAR-10: teacher, KD student, run directory, resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import kdexpand
from kdexpand.models import SmallNet
from kdexpand.recipe import load_recipe

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
EVAL_LIMIT = 256
SLICE = ["data.train_limit=512", f"data.eval_limit={EVAL_LIMIT}", "train.deterministic=true", "train.lr=0.05"]
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])


def train(args: list[str], env: dict[str, str], launcher: str = "python") -> subprocess.CompletedProcess:
    """Run the entry point as a user would and return the finished process."""
    if launcher == "accelerate":
        command = [str(Path(sys.executable).parent / "accelerate"), "launch", "--cpu", "--num_processes", "1"]
        command += ["-m", "kdexpand.train", *args]
    else:
        command = [sys.executable, "-m", "kdexpand.train", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def overrides(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


@pytest.fixture(scope="module")
def teacher_dir(env, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "teacher"
    result = train(["teachers/resnet18_cifar10.yaml", *overrides(*SLICE, "train.epochs=1", f"output.dir={out}")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def student_args(teacher_dir: Path, out: Path, epochs: int) -> list[str]:
    return [
        "recipes/cifar_ck_kd.yaml",
        *overrides(
            *SLICE, f"train.epochs={epochs}", f"output.dir={out}", "output.onnx=true",
            f"teacher.checkpoint={teacher_dir / 'compact.safetensors'}",
        ),
    ]


@pytest.fixture(scope="module")
def student_run(env, teacher_dir, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs") / "student"
    result = train(student_args(teacher_dir, out, epochs=2), env, launcher="accelerate")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_run_directory_files(student_run):
    run_dir, _ = student_run
    for name in ("recipe.yaml", "compact.safetensors", "expanded.safetensors", "compact.onnx", "metrics.json"):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert (run_dir / "checkpoints" / "best.safetensors").is_file()
    last = json.loads((run_dir / "checkpoints" / "last.json").read_text())
    assert last["dir"] == "epoch_0002"
    for name in ("model.safetensors", "trainer.pt", "rng_rank0.pt"):
        assert (run_dir / "checkpoints" / "epoch_0002" / name).is_file(), name
    assert not list((run_dir / "checkpoints").glob("epoch_0001"))


def test_resolved_recipe_saved(student_run, teacher_dir):
    run_dir, _ = student_run
    saved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    expected = load_recipe(REPO / "recipes/cifar_ck_kd.yaml", student_args(teacher_dir, run_dir, 2)[2::2])
    assert saved == expected.model_dump(mode="json")
    assert saved["train"]["epochs"] == 2
    assert saved["expand"]["conv"] == "ck"


def test_metrics_contents(student_run):
    run_dir, result = student_run
    metrics = metrics_of(run_dir)
    for key in ("teacher_top1", "params_compact", "params_expanded", "macs_compact", "macs_expanded", "wall_seconds"):
        assert key in metrics, key
    for tag in ("best", "last"):
        for key in ("expanded_top1", "compact_top1", "expanded_top5", "contraction_max_abs_diff", "epoch"):
            assert key in metrics[tag], f"{tag}.{key}"
    assert metrics["last"]["epoch"] == 2
    assert metrics["params_compact"] == sum(p.numel() for p in SmallNet(10, 7).parameters())
    assert metrics["params_expanded"] > metrics["params_compact"]
    assert metrics["macs_expanded"] > metrics["macs_compact"]
    assert "teacher            test top1" in result.stdout
    assert "compact test top1" in result.stdout


def test_contracted_and_expanded_agree(student_run):
    metrics = metrics_of(student_run[0])
    for tag in ("best", "last"):
        result = metrics[tag]
        assert result["contraction_max_abs_diff"] < 1e-4
        # One flipped prediction out of EVAL_LIMIT images is allowed for float rounding at ties.
        assert abs(result["expanded_top1"] - result["compact_top1"]) <= 100 / EVAL_LIMIT + 1e-9


def test_accuracies_count_whole_images(student_run):
    metrics = metrics_of(student_run[0])
    for value in (metrics["teacher_top1"], metrics["best"]["compact_top1"], metrics["last"]["expanded_top1"]):
        assert value * EVAL_LIMIT / 100 == pytest.approx(round(value * EVAL_LIMIT / 100), abs=1e-3)


def cifar_test_slice(shared_data: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Normalize the first EVAL_LIMIT test images with PIL and NumPy (independent of kdexpand.data)."""
    table = pq.read_table(shared_data / "cifar10" / "test.parquet").slice(0, EVAL_LIMIT)
    images = np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"])).convert("RGB")) for c in table["img"].to_pylist()])
    normalized = (images / 255.0 - CIFAR_MEAN) / CIFAR_STD  # N, H, W, C
    inputs = torch.from_numpy(normalized.transpose(0, 3, 1, 2).astype(np.float32))
    return inputs, np.asarray(table["label"].to_pylist())


def test_compact_weights_standalone(student_run, shared_data):
    run_dir, _ = student_run
    compact = SmallNet(num_classes=10, kernel_size=7)
    compact.load_state_dict(load_file(run_dir / "compact.safetensors"), strict=True)
    inputs, labels = cifar_test_slice(shared_data)
    with torch.no_grad():
        predictions = compact.eval()(inputs).argmax(1).numpy()
    accuracy = 100.0 * (predictions == labels).mean()
    # torchmetrics accumulates in float32; 1e-4 points is far below one image (0.39 points).
    assert accuracy == pytest.approx(metrics_of(run_dir)["best"]["compact_top1"], abs=1e-4)


def test_expanded_weights_contract(student_run):
    run_dir, _ = student_run
    expanded = kdexpand.expand(SmallNet(10, 7), conv="ck", rate=4.0)
    expanded.load_state_dict(load_file(run_dir / "expanded.safetensors"), strict=True)
    contracted = kdexpand.contract(expanded).state_dict()
    saved = load_file(run_dir / "compact.safetensors")
    assert contracted.keys() == saved.keys()
    for key, tensor in saved.items():
        torch.testing.assert_close(contracted[key], tensor, rtol=1e-5, atol=1e-6, msg=key)


def test_onnx_matches_pytorch(student_run, shared_data):
    run_dir, _ = student_run
    compact = SmallNet(num_classes=10, kernel_size=7)
    compact.load_state_dict(load_file(run_dir / "compact.safetensors"), strict=True)
    inputs, _ = cifar_test_slice(shared_data)
    session = onnxruntime.InferenceSession(str(run_dir / "compact.onnx"), providers=["CPUExecutionProvider"])
    (outputs,) = session.run(None, {"input": inputs[:64].numpy()})
    with torch.no_grad():
        expected = compact.eval()(inputs[:64]).numpy()
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-4)


def test_tensorboard_logs_terms(student_run):
    run_dir, _ = student_run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss_total", "train/loss_task", "train/loss_kd", "train/lr", "train/images_per_s",
                "val/top1", "val/top5", "teacher_top1", "step/loss_kd"):
        assert tag in tags, tag
    assert [event.step for event in events.Scalars("val/top1")] == [1, 2]


def test_teacher_evaluated_once(student_run):
    _, result = student_run
    log = result.stdout + result.stderr
    assert log.count("teacher resnet18:") == 1


def test_resume_continues_from_epoch(env, teacher_dir, student_run, tmp_path):
    out = tmp_path / "resumed"
    first = train(student_args(teacher_dir, out, epochs=1), env, launcher="accelerate")
    assert first.returncode == 0, first.stderr[-3000:]
    assert metrics_of(out)["last"]["epoch"] == 1

    resumed = train([*student_args(teacher_dir, out, epochs=2), "--resume"], env, launcher="accelerate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "1 of 2 epochs done" in resumed.stderr
    assert "epoch 1/2:" not in resumed.stderr

    # Deterministic training: stopping after epoch 1 and resuming gives the uninterrupted run.
    reference, continued = metrics_of(student_run[0]), metrics_of(out)
    assert [h["epoch"] for h in continued["history"]] == [1, 2]
    for before, after in zip(reference["history"], continued["history"]):
        assert after["loss_total"] == pytest.approx(before["loss_total"], rel=1e-6)
        assert after["val_top1"] == pytest.approx(before["val_top1"], abs=1e-9)
    assert continued["last"]["compact_top1"] == pytest.approx(reference["last"]["compact_top1"], abs=1e-9)


def train_in_process(args: list[str], env: dict[str, str], monkeypatch, capsys) -> tuple[int, str]:
    """Run ``kdexpand.train.main`` in this process (no interpreter start-up); return (status, stderr)."""
    from kdexpand.train import main

    monkeypatch.chdir(REPO)
    for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    status = main(args)
    return status, capsys.readouterr().err


def test_resume_rejects_changed_recipe(env, student_run, monkeypatch, capsys):
    run_dir, _ = student_run
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    args = [str(run_dir / "recipe.yaml"), "--resume", *overrides("train.lr=0.5", f"output.dir={run_dir}")]
    status, stderr = train_in_process(args, env, monkeypatch, capsys)
    assert status == 1
    assert f"train.lr: {recipe['train']['lr']!r} -> 0.5" in stderr


def test_existing_run_dir_rejected(env, student_run, monkeypatch, capsys):
    run_dir, _ = student_run
    status, stderr = train_in_process([str(run_dir / "recipe.yaml"), *overrides(f"output.dir={run_dir}")], env, monkeypatch, capsys)
    assert status == 1
    assert "already exists; pass --resume" in stderr


def test_missing_teacher_names_command(env, tmp_path, monkeypatch, capsys):
    args = ["recipes/cifar_ck_kd.yaml", *overrides(f"teacher.checkpoint={tmp_path}/none.safetensors", f"output.dir={tmp_path}/run")]
    status, stderr = train_in_process(args, env, monkeypatch, capsys)
    assert status == 1
    assert "accelerate launch -m kdexpand.train teachers/resnet18_cifar10.yaml" in stderr
    assert not (tmp_path / "run").exists()


def test_bad_recipe_key_fails_fast(env, tmp_path):
    # A real process: the exit status and the message are what a user sees.
    result = train(["recipes/cifar_ck_kd.yaml", *overrides("train.lrr=0.1", f"output.dir={tmp_path}/run")], env)
    assert result.returncode == 2
    assert "train.lrr: unknown key; did you mean 'lr'?" in result.stderr
    assert not (tmp_path / "run").exists()


def test_bf16_accumulation_contracts(env, tmp_path):
    out = tmp_path / "bf16"
    sets = [
        "data.train_limit=256", "data.eval_limit=64", "train.epochs=1", "train.mixed_precision=bf16",
        "train.grad_accum_steps=2", "train.max_grad_norm=5", f"output.dir={out}",
    ]
    result = train(["recipes/cifar10_ckfc.yaml", *overrides(*sets)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "effective batch 256 = 128 per process x 1 processes x 2 accumulation steps; precision bf16" in result.stderr
    metrics = metrics_of(out)
    # The check runs in float32 although training used bf16 autocast.
    assert metrics["best"]["contraction_max_abs_diff"] < 1e-5
    assert metrics["best"]["expanded_top1"] == pytest.approx(metrics["best"]["compact_top1"], abs=100 / 64 + 1e-9)
