"""Transfer losses: golden values from NumPy re-implementations, and properties.

The NumPy references below follow the papers' formulas directly (explicit loops, no
shared helpers with the library) and run in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from kdexpand.losses import LOSSES, HintLoss, build_loss

RNG_SEED = 1234


# NumPy references ---------------------------------------------------------------------


def np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two probability vectors, with 0 log 0 = 0."""
    mask = p > 0
    return float(np.sum(p[mask] * (np.log(p[mask]) - np.log(q[mask]))))


def np_block_mean(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Average-pool the last two axes by integer factors down to ``size``."""
    fh, fw = x.shape[-2] // size[0], x.shape[-1] // size[1]
    shape = x.shape[:-2] + (size[0], fh, size[1], fw)
    return x.reshape(shape).mean(axis=(-3, -1))


def np_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (N, C, H, W) with half-pixel centres (align_corners=False)."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        matrix = np.zeros((n_out, n_in))
        for i in range(n_out):
            source = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
            low = int(math.floor(source))
            high = min(low + 1, n_in - 1)
            frac = source - low
            matrix[i, low] += 1 - frac
            matrix[i, high] += frac
        return matrix

    rows, cols = weights(x.shape[2], size[0]), weights(x.shape[3], size[1])
    return np.einsum("ih,nchw,jw->ncij", rows, x, cols)


def np_pkt(student: np.ndarray, teacher: np.ndarray, eps: float = 1e-6) -> float:
    n = len(student)

    def probabilities(x: np.ndarray) -> np.ndarray:
        x = x.reshape(n, -1)
        kernel = np.zeros((n, n))
        for i in range(n):
            for j in range(n):
                ni = max(np.linalg.norm(x[i]), eps)
                nj = max(np.linalg.norm(x[j]), eps)
                kernel[i, j] = (1 + np.dot(x[i], x[j]) / (ni * nj)) / 2
        return kernel / kernel.sum(axis=1, keepdims=True)

    s, t = probabilities(student), probabilities(teacher)
    return sum(np_kl(t[i], s[i]) for i in range(n)) / n


def np_at(student: np.ndarray, teacher: np.ndarray, p: float = 2.0) -> float:
    qs = (np.abs(student) ** p).mean(axis=1)
    qt = (np.abs(teacher) ** p).mean(axis=1)
    size = (min(qs.shape[1], qt.shape[1]), min(qs.shape[2], qt.shape[2]))
    qs, qt = np_block_mean(qs, size), np_block_mean(qt, size)
    qs = qs.reshape(len(qs), -1)
    qt = qt.reshape(len(qt), -1)
    qs = qs / np.linalg.norm(qs, axis=1, keepdims=True)
    qt = qt / np.linalg.norm(qt, axis=1, keepdims=True)
    return float(np.mean((qs - qt) ** 2))


def np_huber(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 1, 0.5 * x**2, np.abs(x) - 0.5)


def np_rkd(student: np.ndarray, teacher: np.ndarray, wd: float = 25.0, wa: float = 50.0) -> float:
    n = len(student)
    s, t = student.reshape(n, -1), teacher.reshape(n, -1)

    def distances(x: np.ndarray) -> np.ndarray:
        d = np.array([np.linalg.norm(x[i] - x[j]) for i in range(n) for j in range(n) if i != j])
        return d / d.mean()

    def angles(x: np.ndarray) -> np.ndarray:
        values = []
        for j in range(n):
            for i in range(n):
                for k in range(n):
                    a, b = x[i] - x[j], x[k] - x[j]
                    na, nb = np.linalg.norm(a), np.linalg.norm(b)
                    values.append(0.0 if na == 0 or nb == 0 else np.dot(a, b) / (na * nb))
        return np.array(values)

    distance = np_huber(distances(s) - distances(t)).mean()
    angle = np_huber(angles(s) - angles(t)).mean()
    return float(wd * distance + wa * angle)


def np_sp(student: np.ndarray, teacher: np.ndarray) -> float:
    n = len(student)

    def gram(x: np.ndarray) -> np.ndarray:
        x = x.reshape(n, -1)
        g = x @ x.T
        return g / np.linalg.norm(g, axis=1, keepdims=True)

    return float(np.sum((gram(teacher) - gram(student)) ** 2) / n**2)


def np_kd(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T^2 * KL(p_t || p_s) summed over classes and averaged over samples (batchmean)."""
    total = 0.0
    for zs, zt in zip(student / temperature, teacher / temperature):
        total += np_kl(np_softmax(zt), np_softmax(zs))
    return float(temperature**2 * total / len(student))


def np_dkd(student, teacher, targets, alpha=1.0, beta=8.0, temperature=4.0) -> float:
    n = len(student)
    tckd = nckd = 0.0
    for zs, zt, label in zip(student / temperature, teacher / temperature, targets):
        ps, pt = np_softmax(zs), np_softmax(zt)
        tckd += np_kl(np.array([pt[label], 1 - pt[label]]), np.array([ps[label], 1 - ps[label]]))
        nckd += np_kl(np_softmax(np.delete(zt, label)), np_softmax(np.delete(zs, label)))
    return float(temperature**2 * (alpha * tckd + beta * nckd) / n)


def np_dkd_masked(student, teacher, targets, alpha=1.0, beta=8.0, temperature=4.0) -> float:
    """DKD as the authors' code computes it, with the 1000 masking constant (float64)."""
    n, c = student.shape
    gt = np.eye(c)[targets].astype(bool)
    ps, pt = np_softmax(student / temperature), np_softmax(teacher / temperature)
    bs = np.stack([(ps * gt).sum(1), (ps * ~gt).sum(1)], axis=1)
    bt = np.stack([(pt * gt).sum(1), (pt * ~gt).sum(1)], axis=1)
    tckd = np.sum(bt * (np.log(bt) - np.log(bs))) / n
    log_ps2 = np_log_softmax(student / temperature - 1000.0 * gt)
    log_pt2 = np_log_softmax(teacher / temperature - 1000.0 * gt)
    nckd = np.sum((np.exp(log_pt2) * (log_pt2 - log_ps2))[~gt]) / n
    return float(temperature**2 * (alpha * tckd + beta * nckd))


def np_hint_conv1x1(student, teacher, weight, bias) -> float:
    regressed = np.einsum("oc,nchw->nohw", weight, student) + bias[None, :, None, None]
    return float(np.mean((regressed - teacher) ** 2))


# Golden values --------------------------------------------------------------------------


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(RNG_SEED)


def as_torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array)


def test_pkt_golden(rng):
    student, teacher = rng.normal(size=(5, 3, 2, 2)), rng.normal(size=(5, 7))
    got = build_loss("pkt")(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_pkt(student, teacher), rel=1e-10)


def test_pkt_hand_value_two_samples():
    # Orthogonal student vectors: kernel [[1, .5], [.5, 1]] -> rows [2/3, 1/3].
    # Parallel teacher vectors: kernel all 1 -> rows [1/2, 1/2].
    # KL per row = 1/2 log((1/2)/(2/3)) + 1/2 log((1/2)/(1/3)) = 1/2 log(9/8).
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[1.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    got = build_loss("pkt")(student, teacher).item()
    assert got == pytest.approx(0.5 * math.log(9 / 8), rel=1e-12)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape", "p"),
    [
        ((4, 3, 4, 4), (4, 6, 4, 4), 2.0),
        ((4, 3, 8, 8), (4, 5, 4, 4), 2.0),
        ((3, 2, 2, 6), (3, 4, 4, 3), 3.0),
    ],
)
def test_at_golden(rng, student_shape, teacher_shape, p):
    student, teacher = rng.normal(size=student_shape), rng.normal(size=teacher_shape)
    got = build_loss("at", {"p": p})(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_at(student, teacher, p), rel=1e-10)


def test_rkd_golden(rng):
    student, teacher = rng.normal(size=(5, 6)), rng.normal(size=(5, 2, 2, 2))
    got = build_loss("rkd")(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_rkd(student, teacher), rel=1e-8)


def test_rkd_golden_weights(rng):
    student, teacher = rng.normal(size=(4, 3)) * 3, rng.normal(size=(4, 5))
    params = {"distance_weight": 1.0, "angle_weight": 0.0}
    got = build_loss("rkd", params)(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_rkd(student, teacher, 1.0, 0.0), rel=1e-8)
    params = {"distance_weight": 0.0, "angle_weight": 1.0}
    got = build_loss("rkd", params)(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_rkd(student, teacher, 0.0, 1.0), rel=1e-8)


def test_sp_golden(rng):
    student, teacher = rng.normal(size=(6, 4, 3, 3)), rng.normal(size=(6, 10))
    got = build_loss("sp")(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_sp(student, teacher), rel=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_golden(rng, temperature):
    student, teacher = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    loss = build_loss("kd", {"temperature": temperature})
    got = loss(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_kd(student, teacher, temperature), rel=1e-10)


def test_kd_hand_value_t_squared_batchmean():
    # One sample with two classes: p_t = [1/2, 1/2]; student logits [2 ln 3, 0] at T = 2
    # give p_s = [3/4, 1/4]. KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3); times T^2 = 4.
    # A second, identical pair adds 0, so batchmean halves the sum.
    student = torch.tensor([[2 * math.log(3), 0.0], [1.0, 1.0]], dtype=torch.float64)
    teacher = torch.tensor([[5.0, 5.0], [1.0, 1.0]], dtype=torch.float64)
    got = build_loss("kd", {"temperature": 2.0})(student, teacher).item()
    assert got == pytest.approx(4 * 0.5 * math.log(4 / 3) / 2, rel=1e-12)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("linear", [4.0, 3.25, 2.5, 1.75, 1.0]),
        # T1 + (T0 - T1) * (1 + cos(pi * p)) / 2 at p = 0, 1/4, 1/2, 3/4, 1.
        ("cosine", [4.0, 1 + 3 * (1 + math.sqrt(0.5)) / 2, 2.5, 1 + 3 * (1 - math.sqrt(0.5)) / 2, 1.0]),
    ],
)
def test_kd_temperature_schedule(rng, schedule, expected):
    student, teacher = rng.normal(size=(4, 6)) * 2, rng.normal(size=(4, 6)) * 2
    params = {"temperature": 4.0, "schedule": schedule, "final_temperature": 1.0}
    loss = build_loss("kd", params)
    for epoch, temperature in enumerate(expected):
        loss.set_epoch(epoch, len(expected))
        assert loss.temperature == pytest.approx(temperature, rel=1e-12)
        got = loss(as_torch(student), as_torch(teacher)).item()
        assert got == pytest.approx(np_kd(student, teacher, temperature), rel=1e-10)


def test_kd_constant_temperature_ignores_epoch():
    loss = build_loss("kd", {"temperature": 3.0})
    loss.set_epoch(7, 10)
    assert loss.temperature == 3.0


def test_kd_schedule_without_final_rejected():
    with pytest.raises(ValidationError, match="needs final_temperature"):
        build_loss("kd", {"schedule": "cosine"})


def test_kd_final_without_schedule_rejected():
    with pytest.raises(ValidationError, match="needs schedule: linear or cosine"):
        build_loss("kd", {"final_temperature": 1.0})


def test_dkd_golden(rng):
    student, teacher = rng.normal(size=(6, 5)) * 3, rng.normal(size=(6, 5)) * 3
    targets = rng.integers(0, 5, size=6)
    loss = build_loss("dkd", {"alpha": 0.5, "beta": 2.0, "temperature": 2.0})
    got = loss(as_torch(student), as_torch(teacher), torch.from_numpy(targets)).item()
    expected = np_dkd(student, teacher, targets, 0.5, 2.0, 2.0)
    assert got == pytest.approx(expected, rel=1e-10)
    assert got == pytest.approx(np_dkd_masked(student, teacher, targets, 0.5, 2.0, 2.0), rel=1e-8)


def test_dkd_warmup_scales_loss(rng):
    student, teacher = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    targets = torch.from_numpy(rng.integers(0, 5, size=4))
    loss = build_loss("dkd", {"warmup_epochs": 4})
    full = np_dkd(student, teacher, targets.numpy())
    loss.set_epoch(0, 10)
    assert loss(as_torch(student), as_torch(teacher), targets).item() == pytest.approx(full / 4)
    loss.set_epoch(5, 10)
    assert loss(as_torch(student), as_torch(teacher), targets).item() == pytest.approx(full)


def test_dkd_fp16_large_logits_finite():
    student = torch.tensor([[60000.0, -60000.0, 0.0]], dtype=torch.float16, requires_grad=True)
    teacher = torch.tensor([[-60000.0, 60000.0, 0.0]], dtype=torch.float16)
    value = build_loss("dkd")(student, teacher, torch.tensor([0]))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()


def test_hint_identity_golden(rng):
    student, teacher = rng.normal(size=(3, 4, 5, 5)), rng.normal(size=(3, 4, 5, 5))
    loss = build_loss("hint", {"regressor": "identity"}, (4, 5, 5), (4, 5, 5))
    got = loss(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(float(np.mean((student - teacher) ** 2)), rel=1e-12)


def test_hint_conv1x1_golden(rng):
    student, teacher = rng.normal(size=(2, 3, 4, 4)), rng.normal(size=(2, 5, 4, 4))
    loss = build_loss("hint", {}, (3, 4, 4), (5, 4, 4)).double()
    conv = loss.regressor.layers[0]
    weight = conv.weight.detach().numpy()[:, :, 0, 0]
    bias = conv.bias.detach().numpy()
    got = loss(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(np_hint_conv1x1(student, teacher, weight, bias), rel=1e-10)


def test_hint_interpolate_golden(rng):
    student, teacher = rng.normal(size=(2, 3, 3, 5)), rng.normal(size=(2, 3, 7, 4))
    loss = build_loss("hint", {"regressor": "identity"}, (3, 3, 5), (3, 7, 4))
    got = loss(as_torch(student), as_torch(teacher)).item()
    expected = float(np.mean((np_bilinear(student, (7, 4)) - teacher) ** 2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_hint_pool_golden(rng):
    student, teacher = rng.normal(size=(2, 3, 8, 2)), rng.normal(size=(2, 3, 4, 4))
    params = {"regressor": "identity", "spatial": "pool"}
    loss = build_loss("hint", params, (3, 8, 2), (3, 4, 4))
    got = loss(as_torch(student), as_torch(teacher)).item()
    expected = np.mean((np_block_mean(student, (4, 2)) - np_block_mean(teacher, (4, 2))) ** 2)
    assert got == pytest.approx(float(expected), rel=1e-10)


def test_hint_vector_features_golden(rng):
    student, teacher = rng.normal(size=(4, 6)), rng.normal(size=(4, 3))
    loss = build_loss("hint", {}, (6,), (3,)).double()
    linear = loss.regressor.layers[0]
    regressed = student @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()
    got = loss(as_torch(student), as_torch(teacher)).item()
    assert got == pytest.approx(float(np.mean((regressed - teacher) ** 2)), rel=1e-10)


# Properties ---------------------------------------------------------------------------

# name -> (params, student shape, teacher shape) of a mismatched pair, per sample.
FEATURE_CASES = {
    "hint": ({"kernel_size": 3, "batch_norm": True}, (4, 6, 6), (8, 3, 3)),
    "pkt": ({}, (4, 6, 6), (8, 3, 3)),
    "at": ({}, (4, 6, 6), (8, 3, 3)),
    "rkd": ({}, (4, 6, 6), (8, 3, 3)),
    "sp": ({}, (4, 6, 6), (8, 3, 3)),
}
LOGIT_CASES = {"dkd": {}, "kd": {}}
EQUAL_PARAMS = {"hint": {"regressor": "identity"}}
NUM_CLASSES = 5


def test_registry_holds_every_loss():
    for name in [*FEATURE_CASES, *LOGIT_CASES]:
        assert name in LOSSES


def test_unknown_loss_lists_choices():
    with pytest.raises(KeyError, match=r"Did you mean 'pkt'\?.*Valid choices: .*hint.*pkt"):
        build_loss("pktt")


def test_unknown_param_rejected():
    with pytest.raises(ValidationError, match="temprature"):
        build_loss("dkd", {"temprature": 4.0})


def test_out_of_range_param_rejected():
    with pytest.raises(ValidationError, match="eps"):
        build_loss("pkt", {"eps": 0.0})


def test_rkd_without_terms_rejected():
    with pytest.raises(ValidationError, match="both 0"):
        build_loss("rkd", {"distance_weight": 0.0, "angle_weight": 0.0})


def test_hint_without_shapes_rejected():
    with pytest.raises(ValueError, match="student_shape"):
        build_loss("hint")


def test_hint_identity_channel_mismatch_rejected():
    with pytest.raises(ValueError, match="regressor='conv'"):
        build_loss("hint", {"regressor": "identity"}, (3, 4, 4), (5, 4, 4))


def test_hint_rank_mismatch_rejected():
    with pytest.raises(ValueError, match=r"\(C, H, W\) maps or both \(D,\) vectors"):
        build_loss("hint", {}, (3, 4, 4), (5,))


def test_hint_kernel3_on_vectors_rejected():
    with pytest.raises(ValueError, match="kernel_size=1"):
        build_loss("hint", {"kernel_size": 3}, (3,), (5,))


def test_dkd_without_targets_rejected():
    with pytest.raises(ValueError, match="targets="):
        build_loss("dkd")(torch.randn(2, 3), torch.randn(2, 3))


def test_batch_size_mismatch_rejected():
    with pytest.raises(ValueError, match="batch size 3 differs from teacher batch size 2"):
        build_loss("pkt")(torch.randn(3, 4), torch.randn(2, 4))


def build_feature_loss(name: str, params: dict | None = None):
    default_params, student_shape, teacher_shape = FEATURE_CASES[name]
    params = default_params if params is None else params
    return build_loss(name, params, torch.Size(student_shape), torch.Size(teacher_shape))


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_feature_loss_zero_when_equal(name):
    _, shape, _ = FEATURE_CASES[name]
    loss = build_loss(name, EQUAL_PARAMS.get(name, {}), torch.Size(shape), torch.Size(shape))
    features = torch.randn(4, *shape, dtype=torch.float64)
    assert loss(features, features.clone()).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_logit_loss_zero_when_equal(name):
    logits = torch.randn(6, NUM_CLASSES, dtype=torch.float64) * 3
    targets = torch.arange(6) % NUM_CLASSES
    loss = build_loss(name, LOGIT_CASES[name])
    assert loss(logits, logits.clone(), targets).item() == pytest.approx(0.0, abs=1e-12)


def feature_pair(name: str, batch: int, fill: str) -> tuple[torch.Tensor, torch.Tensor]:
    _, student_shape, teacher_shape = FEATURE_CASES[name]
    make_student = torch.randn if fill == "random" else torch.zeros
    make_teacher = torch.zeros if fill == "zeros" else torch.randn
    student = make_student(batch, *student_shape).requires_grad_(True)
    return student, make_teacher(batch, *teacher_shape)


@pytest.mark.parametrize("fill", ["zeros", "student_zeros", "random"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_feature_loss_finite(name, batch, fill):
    loss = build_feature_loss(name)
    student, teacher = feature_pair(name, batch, fill)
    value = loss(student, teacher)
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()
    for parameter in loss.parameters():
        assert torch.isfinite(parameter.grad).all()


@pytest.mark.parametrize("fill", ["zeros", "random"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_logit_loss_finite(name, batch, fill):
    make = torch.zeros if fill == "zeros" else torch.randn
    student = make(batch, NUM_CLASSES).requires_grad_(True)
    loss = build_loss(name, LOGIT_CASES[name])
    value = loss(student, make(batch, NUM_CLASSES), torch.arange(batch))
    value.backward()
    assert torch.isfinite(value)
    assert torch.isfinite(student.grad).all()


def bf16_matches_fp32(loss, student, teacher, targets=None):
    """Check that a bf16-autocast loss equals the float32 loss of the same rounded inputs."""
    student_bf16, teacher_bf16 = student.bfloat16(), teacher.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(student_bf16, teacher_bf16, targets)
    reference = loss(student_bf16.float(), teacher_bf16.float(), targets)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    assert value.item() == pytest.approx(reference.item(), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_feature_loss_bf16_autocast(name):
    torch.manual_seed(0)
    loss = build_feature_loss(name)
    student, teacher = feature_pair(name, 4, "random")
    bf16_matches_fp32(loss, student.detach(), teacher)


@pytest.mark.parametrize("name", sorted(LOGIT_CASES))
def test_logit_loss_bf16_autocast(name):
    torch.manual_seed(0)
    loss = build_loss(name, LOGIT_CASES[name])
    student, teacher = torch.randn(4, NUM_CLASSES) * 5, torch.randn(4, NUM_CLASSES) * 5
    bf16_matches_fp32(loss, student, teacher, torch.arange(4) % NUM_CLASSES)


@pytest.mark.parametrize("name", sorted(FEATURE_CASES))
def test_feature_loss_fp16_zero_inputs_finite(name):
    loss = build_feature_loss(name)
    student, teacher = feature_pair(name, 2, "zeros")
    value = loss(student.detach().half().requires_grad_(True), teacher.half())
    assert torch.isfinite(value)


class TinyNet(nn.Module):
    """A conv feature extractor with a linear head, standing in for student and teacher."""

    def __init__(self, channels: int, size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(size)
        self.head = nn.Linear(channels * size * size, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.pool(self.conv(x))
        return features, self.head(features.flatten(1))


@pytest.mark.parametrize("name", sorted([*FEATURE_CASES, *LOGIT_CASES]))
def test_gradient_reaches_student_not_teacher(name):
    torch.manual_seed(0)
    _, student_shape, teacher_shape = FEATURE_CASES.get(name, ({}, (4, 6, 6), (8, 3, 3)))
    student_net = TinyNet(student_shape[0], student_shape[1])
    teacher_net = TinyNet(teacher_shape[0], teacher_shape[1])  # parameters require grad
    images, targets = torch.randn(4, 3, 8, 8), torch.arange(4) % NUM_CLASSES
    student_features, student_logits = student_net(images)
    teacher_features, teacher_logits = teacher_net(images)

    if name in FEATURE_CASES:
        loss = build_feature_loss(name)
        value = loss(student_features, teacher_features)
    else:
        loss = build_loss(name, LOGIT_CASES[name])
        value = loss(student_logits, teacher_logits, targets)
    value.backward()

    for parameter in teacher_net.parameters():
        assert parameter.grad is None
    assert student_net.conv.weight.grad is not None
    assert student_net.conv.weight.grad.abs().sum() > 0
    for parameter in loss.parameters():
        assert parameter.grad is not None
        assert parameter.grad.abs().sum() > 0


def test_hint_regressor_is_part_of_loss_state():
    loss = build_feature_loss("hint")
    assert isinstance(loss, HintLoss)
    keys = set(loss.state_dict())
    assert {"regressor.layers.0.weight", "regressor.layers.1.weight"} <= keys
    assert "regressor.layers.1.running_mean" in keys
