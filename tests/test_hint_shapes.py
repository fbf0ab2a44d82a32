"""Hint regressors between every pair of stages of real teacher and student networks.

Teacher: timm resnet18. Students: the 3x3 SmallNet and timm mobilenetv2_100. On 32x32
inputs their stages differ in channels (8 to 512) and in spatial size (15x15 to 1x1),
in both directions.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from kdexpand.losses import build_loss
from kdexpand.models import SmallNet
from kdexpand.taps import FeatureTaps

TEACHER_STAGES = ["layer1", "layer2", "layer3", "layer4"]
STUDENT_STAGES = {
    "smallnet": ["features.3", "features.7", "features.11"],
    "mobilenetv2_100": [f"blocks.{index}" for index in range(7)],
}
REGRESSOR_SETTINGS = [
    {"spatial": "interpolate", "kernel_size": 1, "batch_norm": False},
    {"spatial": "pool", "kernel_size": 3, "batch_norm": True},
]


def build_student(name: str) -> nn.Module:
    if name == "smallnet":
        return SmallNet(kernel_size=3)
    return timm.create_model(name, pretrained=False, num_classes=10)


def tapped_features(model: nn.Module, names: list[str], images: torch.Tensor) -> dict:
    with FeatureTaps(model, names) as taps:
        model(images)
        return taps.pop()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def teacher_features(images) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    with torch.no_grad():
        return tapped_features(teacher, TEACHER_STAGES, images)


@pytest.mark.parametrize("settings", REGRESSOR_SETTINGS, ids=lambda s: s["spatial"])
@pytest.mark.parametrize("student_name", sorted(STUDENT_STAGES))
def test_hint_every_stage_pair(student_name, settings, images, teacher_features):
    torch.manual_seed(0)
    student = build_student(student_name).train()
    student_features = tapped_features(student, STUDENT_STAGES[student_name], images)
    shape_pairs = set()

    for student_stage, student_feature in student_features.items():
        for teacher_stage, teacher_feature in teacher_features.items():
            pair = f"{student_stage} -> {teacher_stage}"
            student_shape, teacher_shape = student_feature.shape[1:], teacher_feature.shape[1:]
            loss = build_loss("hint", settings, student_shape, teacher_shape)
            value = loss(student_feature, teacher_feature)
            inputs = [student_feature, *loss.parameters()]
            gradients = torch.autograd.grad(value, inputs, retain_graph=True)
            shape_pairs.add((tuple(student_shape), tuple(teacher_shape)))

            assert torch.isfinite(value), pair
            for gradient in gradients:
                assert torch.isfinite(gradient).all(), pair
                assert gradient.abs().sum() > 0, pair
            regressed = loss.regressor(student_feature)
            assert regressed.shape[1] == teacher_feature.shape[1], pair
            if settings["spatial"] == "interpolate":
                assert regressed.shape[2:] == teacher_feature.shape[2:], pair

    heights = [(student[1], teacher[1]) for student, teacher in shape_pairs]
    assert any(student > teacher for student, teacher in heights)
    assert any(student < teacher for student, teacher in heights)
    assert any(student[0] != teacher[0] for student, teacher in shape_pairs)


def test_hint_gradient_reaches_lower_student_layers(images, teacher_features):
    torch.manual_seed(0)
    student = SmallNet(kernel_size=3).train()
    feature = tapped_features(student, ["features.7"], images)["features.7"]
    teacher_feature = teacher_features["layer3"]
    loss = build_loss("hint", {}, feature.shape[1:], teacher_feature.shape[1:])
    loss(feature, teacher_feature).backward()

    assert student.features[0].weight.grad.abs().sum() > 0
    assert student.features[4].weight.grad.abs().sum() > 0
    assert student.features[8].weight.grad is None
    assert student.fc.weight.grad is None
    assert loss.regressor.layers[0].weight.grad.abs().sum() > 0


def test_hint_changed_input_size_rejected(teacher_features):
    feature = torch.randn(2, 16, 6, 6)
    teacher_feature = teacher_features["layer2"]
    loss = build_loss("hint", {}, feature.shape[1:], teacher_feature.shape[1:])
    with pytest.raises(ValueError, match="rebuild the loss for the new input size"):
        loss(feature, torch.randn(2, 128, 8, 8))
