"""Gradient confusion: golden cosines, independence from the model state, training runs."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import kdexpand
from kdexpand.analysis.gradients import batch_gradient, gradient_confusion, pairwise_cosine_similarities
from kdexpand.models import SmallNet

REPO = Path(__file__).resolve().parents[1]


def mse(outputs, targets):
    return F.mse_loss(outputs.squeeze(1), targets)


def test_linear_gradients_golden():
    # y = w·x with w = 0, loss = mean((y - t)^2), so the gradient is -2/B Σ t_i x_i.
    # Batch 1: x = [1, 0], t = 1 gives [-2, 0]; batch 2: x = [1, 1], t = -1 gives [2, 2];
    # batch 3: x = [0, 1], t = 1 gives [0, -2]. Cosines: -1/√2, 0, -1/√2 (pairs 12, 13, 23).
    model = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(model.weight)
    batches = [
        (torch.tensor([[1.0, 0.0]]), torch.tensor([1.0])),
        (torch.tensor([[1.0, 1.0]]), torch.tensor([-1.0])),
        (torch.tensor([[0.0, 1.0]]), torch.tensor([1.0])),
    ]
    result = gradient_confusion(model, mse, batches)

    assert batch_gradient(model, mse, *batches[0]).tolist() == [-2.0, 0.0]
    assert result.similarities.tolist() == pytest.approx([-1 / math.sqrt(2), 0.0, -1 / math.sqrt(2)])
    assert result.minimum == pytest.approx(-1 / math.sqrt(2))
    assert result.mean == pytest.approx(-math.sqrt(2) / 3)
    assert result.pairs == 3


def test_pairwise_cosines_match_numpy():
    generator = np.random.default_rng(0)
    gradients = generator.standard_normal((6, 40))
    expected = [
        gradients[i] @ gradients[j] / (np.linalg.norm(gradients[i]) * np.linalg.norm(gradients[j]))
        for i in range(6) for j in range(i + 1, 6)
    ]

    actual = pairwise_cosine_similarities(torch.from_numpy(gradients))

    assert actual.tolist() == pytest.approx(expected, abs=1e-12)


def test_zero_gradient_pairs_left_out():
    gradients = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    similarities = pairwise_cosine_similarities(gradients)

    assert similarities[:2].isnan().all()
    assert not similarities[2].isnan()


def test_batch_gradient_matches_backward():
    torch.manual_seed(0)
    model = SmallNet(kernel_size=3)
    inputs, targets = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    flat = batch_gradient(model, F.cross_entropy, inputs, targets)
    F.cross_entropy(model(inputs), targets).backward()
    expected = torch.cat([parameter.grad.reshape(-1) for parameter in model.parameters()])

    assert torch.allclose(flat, expected, atol=1e-7)


def _cifar_like_batches(count: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 3, 32, 32, generator=generator), torch.randint(0, 10, (16,), generator=generator))
        for _ in range(count)
    ]


def test_model_state_left_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(SmallNet(kernel_size=3), nn.Dropout(0.5)).eval()
    before = copy.deepcopy(model.state_dict())
    rng_before = torch.get_rng_state()

    gradient_confusion(model, F.cross_entropy, _cifar_like_batches(3))

    assert not model.training
    assert all(parameter.grad is None for parameter in model.parameters())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_collapsed_and_sequential_agree():
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True).double()
    batches = [(inputs.double(), targets) for inputs, targets in _cifar_like_batches(4)]
    collapsed = gradient_confusion(kdexpand.set_mode(expanded, "collapsed"), F.cross_entropy, batches)
    sequential = gradient_confusion(kdexpand.set_mode(expanded, "sequential"), F.cross_entropy, batches)

    assert torch.allclose(collapsed.similarities, sequential.similarities, atol=1e-6)


def test_one_batch_rejected():
    with pytest.raises(ValueError, match="at least 2 mini-batches, got 1"):
        gradient_confusion(nn.Linear(2, 1), mse, [(torch.ones(1, 2), torch.ones(1))])


def _train(env, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdexpand.train", "recipes/cifar10_ck.yaml"]
    pairs = ("data.train_limit=256", "data.eval_limit=100", "train.epochs=2", "train.deterministic=true",
             f"output.dir={out}", "output.tensorboard=false", *extra)
    for pair in pairs:
        command += ["--set", pair]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_run_logs_confusion_and_same_weights(env, tmp_path):
    """Measuring confusion after each epoch leaves the trained weights bit-identical."""
    plain = _train(env, tmp_path / "plain", "train.batch_size=64")
    measured = _train(env, tmp_path / "measured", "analysis.gradient_confusion_batches=3", "train.batch_size=64")
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert measured.returncode == 0, measured.stderr[-3000:]
    history = json.loads((tmp_path / "measured" / "metrics.json").read_text())["history"]
    plain_weights = load_file(tmp_path / "plain" / "expanded.safetensors")
    measured_weights = load_file(tmp_path / "measured" / "expanded.safetensors")

    assert [entry["grad_pairs"] for entry in history] == [3, 3]
    assert all(-1.0 <= entry["grad_cos_min"] <= entry["grad_cos_mean"] <= 1.0 for entry in history)
    for name, tensor in plain_weights.items():
        assert torch.equal(tensor, measured_weights[name]), name


def test_too_many_confusion_batches_rejected(env, tmp_path):
    # 230 training images in batches of 128 give 2 mini-batches.
    result = _train(env, tmp_path / "bad", "analysis.gradient_confusion_batches=3")

    assert result.returncode == 2
    assert "analysis.gradient_confusion_batches=3 is more than the 2 training mini-batches" in result.stderr
    assert not (tmp_path / "bad").exists()


def test_one_confusion_batch_rejected(env, tmp_path):
    result = _train(env, tmp_path / "bad", "analysis.gradient_confusion_batches=1")

    assert result.returncode == 2
    assert "analysis.gradient_confusion_batches" in result.stderr
    assert "Traceback" not in result.stderr
