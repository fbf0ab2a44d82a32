"""Hinton KD: golden values from NumPy, gradient path to the student, the distiller's sum."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from kdexpand.distill import Distiller
from kdexpand.losses import build_loss
from kdexpand.losses.kd import kd_loss
from kdexpand.models import SmallNet
from kdexpand.recipe import DistillConfig


def numpy_log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * mean over samples of sum over classes p_t * (log p_t - log p_s), in float64."""
    log_ps = numpy_log_softmax(student / temperature)
    log_pt = numpy_log_softmax(teacher / temperature)
    per_sample = (np.exp(log_pt) * (log_pt - log_ps)).sum(axis=1)
    return float(temperature**2 * per_sample.mean())


@pytest.fixture
def logits() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(16, 10, generator=generator, dtype=torch.float64) * 3
    return student, teacher


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0, 8.0])
def test_kd_matches_numpy(logits, temperature):
    student, teacher = logits
    value = kd_loss(student, teacher, temperature)
    assert value.item() == pytest.approx(numpy_kd(student.numpy(), teacher.numpy(), temperature), rel=1e-12)


def test_kd_hand_computed_two_classes():
    # p_t = softmax([0, 0]) = [0.5, 0.5]; p_s = softmax([ln 3, 0]) = [0.75, 0.25], T = 1:
    # KL = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4 / 3)
    student = torch.tensor([[np.log(3.0), 0.0]], dtype=torch.float64)
    teacher = torch.zeros(1, 2, dtype=torch.float64)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(0.5 * np.log(4 / 3), rel=1e-12)


def test_kd_scales_by_temperature_squared(logits):
    student, teacher = logits
    plain_kl = F.kl_div(F.log_softmax(student / 4, 1), F.log_softmax(teacher / 4, 1), reduction="batchmean", log_target=True)
    assert kd_loss(student, teacher, 4.0).item() == pytest.approx(16 * plain_kl.item(), rel=1e-12)


def test_kd_is_batchmean_not_mean(logits):
    student, teacher = logits
    log_ps = numpy_log_softmax(student.numpy())
    log_pt = numpy_log_softmax(teacher.numpy())
    per_element = np.exp(log_pt) * (log_pt - log_ps)  # N, C
    value = kd_loss(student, teacher, 1.0).item()
    assert value == pytest.approx(per_element.sum() / 16, rel=1e-12)
    assert value == pytest.approx(10 * per_element.mean(), rel=1e-12)


def test_kd_gradient_reaches_student(logits):
    # d/dz_s [T^2 KL(p_t || softmax(z_s / T))] / N = T (p_s - p_t) / N
    student, teacher = logits
    student = student.clone().requires_grad_(True)
    teacher = teacher.clone().requires_grad_(True)
    loss = build_loss("kd", {"temperature": 4.0})
    loss(student, teacher).backward()

    p_s = np.exp(numpy_log_softmax(student.detach().numpy() / 4))
    p_t = np.exp(numpy_log_softmax(teacher.detach().numpy() / 4))
    np.testing.assert_allclose(student.grad.numpy(), 4 * (p_s - p_t) / 16, rtol=1e-10, atol=1e-14)
    assert teacher.grad is None


def test_kd_float32_under_bf16_autocast(logits):
    student, teacher = (tensor.to(torch.bfloat16) for tensor in logits)
    loss = build_loss("kd", {"temperature": 4.0})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(student, teacher)
    assert value.dtype == torch.float32
    expected = numpy_kd(student.double().numpy(), teacher.double().numpy(), 4.0)
    assert value.item() == pytest.approx(expected, rel=1e-5)


def test_kd_rejects_class_mismatch():
    with pytest.raises(ValueError, match="teacher must have the student's classes"):
        build_loss("kd")(torch.zeros(2, 10), torch.zeros(2, 100))


def test_kd_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature"):
        build_loss("kd", {"temperature": 0})


def kd_config(ce_weight: float, kd_weight: float) -> DistillConfig:
    return DistillConfig(ce_weight=ce_weight, losses=[{"name": "kd", "weight": kd_weight, "params": {"temperature": 4}}])


def test_distiller_weighted_sum(logits):
    student, teacher = logits
    targets = torch.arange(16) % 10
    distiller = Distiller(kd_config(0.1, 0.9), lambda outputs, labels: F.cross_entropy(outputs, labels))
    total, parts = distiller(student, targets, teacher)

    assert sorted(parts) == ["kd", "task"]
    assert parts["task"].item() == pytest.approx(F.cross_entropy(student, targets).item(), rel=1e-12)
    assert parts["kd"].item() == pytest.approx(numpy_kd(student.numpy(), teacher.numpy(), 4.0), rel=1e-12)
    assert total.item() == pytest.approx(0.1 * parts["task"].item() + 0.9 * parts["kd"].item(), rel=1e-12)


def test_distiller_kd_alone_trains_student():
    torch.manual_seed(0)
    student, teacher = SmallNet(), SmallNet().eval()
    images = torch.randn(8, 3, 32, 32)
    distiller = Distiller(kd_config(0.0, 1.0), lambda outputs, labels: F.cross_entropy(outputs, labels))
    with torch.no_grad():
        teacher_logits = teacher(images)
    total, _ = distiller(student(images), torch.zeros(8, dtype=torch.long), teacher_logits)
    total.backward()

    for name, parameter in student.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_distiller_needs_teacher_outputs():
    distiller = Distiller(kd_config(0.1, 0.9), F.cross_entropy)
    with pytest.raises(ValueError, match="needs teacher outputs"):
        distiller(torch.zeros(2, 10), torch.zeros(2, dtype=torch.long))


def test_distiller_repeated_term_keys(logits):
    student, teacher = logits
    config = DistillConfig(losses=[{"name": "kd", "params": {"temperature": 1}}, {"name": "kd", "params": {"temperature": 4}}])
    _, parts = Distiller(config, F.cross_entropy)(student, torch.zeros(16, dtype=torch.long), teacher)
    assert sorted(parts) == ["kd.0", "kd.1", "task"]
    assert parts["kd.0"].item() == pytest.approx(numpy_kd(student.numpy(), teacher.numpy(), 1.0), rel=1e-12)


def test_distiller_unknown_loss():
    # The recipe schema rejects unknown loss names before a distiller is built.
    with pytest.raises(ValidationError, match="Did you mean 'kd'"):
        DistillConfig(losses=[{"name": "kdd"}])


def test_distiller_kd_rejects_taps():
    with pytest.raises(ValidationError, match="takes no student/teacher tap"):
        DistillConfig(losses=[{"name": "kd", "student": "features.0"}])
