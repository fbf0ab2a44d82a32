"""Two CPU processes over gloo give the same metrics as one process evaluating the same weights."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kdexpand
from kdexpand.models import SmallNet

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TRAIN_LIMIT, EVAL_LIMIT = 2048, 255  # odd, so the two processes get uneven evaluation shards
VAL_START, VAL_COUNT = 1843, 205  # validation rows of train.parquet for train_limit=2048
CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465])
CIFAR_STD = np.array([0.2470, 0.2435, 0.2616])
# torchmetrics accumulates accuracy in float32; 1e-4 points is far below one image (0.39 points).


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_rows(path: Path, start: int, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """Decode and normalize parquet rows with PIL and NumPy only."""
    table = pq.read_table(path).slice(start, count)
    images = np.stack([np.asarray(Image.open(io.BytesIO(c["bytes"])).convert("RGB")) for c in table["img"].to_pylist()])
    normalized = ((images / 255.0 - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2).astype(np.float32)
    return torch.from_numpy(normalized), np.asarray(table["label"].to_pylist())


def accuracy(model: torch.nn.Module, inputs: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        predictions = model.eval()(inputs).argmax(1).numpy()
    return 100.0 * float((predictions == labels).mean())


@pytest.fixture(scope="module")
def two_process_run(shared_data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("runs") / "ddp"
    env = dict(os.environ, KDEXPAND_DATA=str(shared_data), KDEXPAND_CACHE=str(tmp_path_factory.mktemp("cache")), HF_HUB_OFFLINE="1")
    sets = [f"data.train_limit={TRAIN_LIMIT}", f"data.eval_limit={EVAL_LIMIT}", "train.epochs=2", "train.lr=0.05", f"output.dir={out}"]
    command = [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", str(free_port()), "-m", "kdexpand.train", "recipes/cifar10_ckfc.yaml",
        *[part for pair in sets for part in ("--set", pair)],
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_two_processes_ran(two_process_run):
    run_dir, result = two_process_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["processes"] == 2
    assert "effective batch 256 = 128 per process x 2 processes" in result.stderr
    assert (run_dir / "checkpoints" / "epoch_0002" / "rng_rank1.pt").is_file()


def test_test_metrics_equal_single_process(two_process_run, shared_data):
    run_dir, _ = two_process_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    inputs, labels = load_rows(shared_data / "cifar10" / "test.parquet", 0, EVAL_LIMIT)

    compact = SmallNet(10, 7)
    compact.load_state_dict(load_file(run_dir / "compact.safetensors"), strict=True)
    expanded = kdexpand.expand(SmallNet(10, 7), conv="ck", fc=True, rate=4.0)
    expanded.load_state_dict(load_file(run_dir / "expanded.safetensors"), strict=True)

    assert metrics["best"]["compact_top1"] == pytest.approx(accuracy(compact, inputs, labels), abs=1e-4)
    assert metrics["best"]["expanded_top1"] == pytest.approx(accuracy(expanded, inputs, labels), abs=1e-4)


def test_validation_metric_equals_single_process(two_process_run, shared_data):
    run_dir, _ = two_process_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    inputs, labels = load_rows(shared_data / "cifar10" / "train.parquet", VAL_START, VAL_COUNT)

    expanded = kdexpand.expand(SmallNet(10, 7), conv="ck", fc=True, rate=4.0)
    expanded.load_state_dict(load_file(run_dir / "expanded.safetensors"), strict=True)
    assert metrics["best"]["val_top1"] == pytest.approx(accuracy(expanded, inputs, labels), abs=1e-4)

    # The comparison means something only if the predictions vary between images.
    with torch.no_grad():
        assert len(expanded.eval()(inputs).argmax(1).unique()) >= 3
    best = metrics["best"]["epoch"]
    assert metrics["history"][best - 1]["val_top1"] == pytest.approx(metrics["best"]["val_top1"], abs=1e-9)
