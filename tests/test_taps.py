"""Feature taps: what a tap records, its errors, its lifetime, and names after expansion."""

from __future__ import annotations

import gc
import weakref

import pytest
import timm
import torch
import torchvision
from torch import nn

import kdexpand
from kdexpand.models import SmallNet
from kdexpand.taps import FeatureTaps, resolve_tap_modules


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture
def smallnet() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet(kernel_size=3).eval()


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=10).eval()


def test_tap_equals_module_output(smallnet, images):
    with FeatureTaps(smallnet, ["features.3", "fc"]) as taps:
        smallnet(images)
        features = taps.pop()
    expected = smallnet.features[:4](images)
    torch.testing.assert_close(features["features.3"], expected, rtol=0, atol=0)
    assert features["fc"].shape == (2, 64)


def test_tap_sees_output_before_inplace_relu(resnet18, images):
    # timm's ResNet runs ReLU(inplace=True) on the output of bn1 right after bn1 returns.
    with FeatureTaps(resnet18, ["bn1"]) as taps:
        resnet18(images)
        tapped = taps.pop()["bn1"]
    expected = resnet18.bn1(resnet18.conv1(images))
    assert (expected < 0).any()
    torch.testing.assert_close(tapped, expected, rtol=0, atol=0)


def test_tap_without_clone_detects_inplace_change(resnet18, images):
    with FeatureTaps(resnet18, ["bn1"], clone=False) as taps:
        resnet18(images)
        with pytest.raises(RuntimeError, match="in-place op.*clone=True"):
            taps.pop()


def test_tap_without_clone_returns_same_values(resnet18, images):
    with FeatureTaps(resnet18, ["layer2"], clone=True) as cloned:
        resnet18(images)
        expected = cloned.pop()["layer2"]
    with FeatureTaps(resnet18, ["layer2"], clone=False) as taps:
        resnet18(images)
        tapped = taps.pop()["layer2"]
    torch.testing.assert_close(tapped, expected, rtol=0, atol=0)


def test_tap_without_clone_under_inference_mode(resnet18, images):
    with FeatureTaps(resnet18, ["layer3"], clone=False) as taps:
        with torch.inference_mode():
            resnet18(images)
        assert taps.pop()["layer3"].shape == (2, 256, 2, 2)


def test_unknown_tap_lists_choices(smallnet):
    with pytest.raises(KeyError, match=r"Did you mean 'features.3'\?.*Valid choices: features, "):
        FeatureTaps(smallnet, ["features.33"], role="student")


def test_unknown_tap_in_large_model_lists_shallow_names(resnet18):
    with pytest.raises(KeyError, match=r"teacher tap 'layer5'.*layer4\.1, .*93 in all") as error:
        resolve_tap_modules(resnet18, ["layer5"], role="teacher")
    assert "layer4.1.conv1" not in str(error.value)


def test_empty_tap_name_rejected(smallnet):
    with pytest.raises(KeyError, match="unknown model tap ''"):
        FeatureTaps(smallnet, [""])


def test_duplicate_tap_rejected(smallnet):
    with pytest.raises(ValueError, match=r"\['fc'\] are listed more than once"):
        FeatureTaps(smallnet, ["fc", "features.3", "fc"])


def test_tap_not_run_raises(resnet18, images):
    with FeatureTaps(resnet18, ["layer4", "fc"]) as taps:
        resnet18.forward_features(images)
        with pytest.raises(RuntimeError, match="'fc' recorded nothing"):
            taps.pop()


def test_tap_called_twice_raises(images):
    # torchvision's BasicBlock calls its one ReLU module twice per forward pass.
    model = torchvision.models.resnet18(weights=None).eval()
    with FeatureTaps(model, ["layer1.0.relu"]) as taps:
        model(images)
        with pytest.raises(RuntimeError, match="ran 2 times"):
            taps.pop()


def test_tap_non_tensor_output_raises():
    model = nn.Sequential(nn.LSTM(4, 3, batch_first=True))
    with FeatureTaps(model, ["0"]) as taps:
        with pytest.raises(TypeError, match="returned tuple, not a tensor"):
            model(torch.randn(2, 5, 4))
        taps.clear()


def test_pop_forgets_features(smallnet, images):
    with FeatureTaps(smallnet, ["fc"]) as taps:
        smallnet(images)
        taps.pop()
        with pytest.raises(RuntimeError, match="recorded nothing"):
            taps.pop()


def test_clear_forgets_features(smallnet, images):
    with FeatureTaps(smallnet, ["fc"]) as taps:
        smallnet(images)
        taps.clear()
        smallnet(images)
        assert taps.pop()["fc"].shape == (2, 64)


def test_no_feature_alive_after_step(images):
    torch.manual_seed(0)
    student = SmallNet(kernel_size=3).train()
    with FeatureTaps(student, ["features.7"]) as taps:
        logits = student(images)
        features = taps.pop()
        reference = weakref.ref(features["features.7"])
        loss = features["features.7"].pow(2).mean() + logits.logsumexp(1).mean()
        loss.backward()
        del features, loss, logits
        gc.collect()
        assert reference() is None
        assert taps._records == {}


def test_paused_records_nothing(smallnet, images):
    with FeatureTaps(smallnet, ["fc"]) as taps:
        with taps.paused():
            smallnet(images)
        assert taps.enabled
        with pytest.raises(RuntimeError, match="recorded nothing"):
            taps.pop()


def test_remove_detaches_hooks(smallnet, images):
    taps = FeatureTaps(smallnet, ["fc", "features.3"])
    taps.remove()
    assert len(smallnet.fc._forward_hooks) == 0
    assert len(smallnet.features[3]._forward_hooks) == 0
    smallnet(images)
    assert taps._records == {}


def test_gradient_flows_through_cloned_tap(images):
    torch.manual_seed(0)
    student = SmallNet(kernel_size=3).train()
    with FeatureTaps(student, ["features.2"]) as taps:
        student(images)
        taps.pop()["features.2"].sum().backward()
    assert student.features[0].weight.grad.abs().sum() > 0
    assert student.classifier.weight.grad is None


@pytest.mark.parametrize("mode", ["collapsed", "sequential"])
def test_compact_tap_names_work_after_expand(smallnet, images, mode):
    names = ["features.0", "features.3", "features.8", "fc", "classifier"]
    expanded = kdexpand.expand(smallnet, conv="cl", fc=True, mode=mode).eval()
    contracted = kdexpand.contract(expanded).eval()
    with FeatureTaps(expanded, names) as expanded_taps, FeatureTaps(contracted, names) as taps:
        expanded(images)
        contracted(images)
        expanded_features, contracted_features = expanded_taps.pop(), taps.pop()
    for name in names:
        torch.testing.assert_close(
            expanded_features[name], contracted_features[name], rtol=1e-4, atol=1e-5
        )


def test_compact_tap_names_work_on_expanded_timm(resnet18, images):
    names = [
        "conv1",
        "bn1",
        "layer1.0.conv1",
        "layer2.0.downsample.0",
        "layer2",
        "layer4.1.conv2",
        "fc",
    ]
    expanded_layers = ["conv1", "layer1.0.conv1", "layer2.0.downsample.0", "layer4.1.conv2", "fc"]
    expanded = kdexpand.expand(
        resnet18, conv="cl", fc=True, include=expanded_layers, pointwise=True
    ).eval()
    assert [decision.name for decision in expanded.expansion_report.expanded] == expanded_layers
    contracted = kdexpand.contract(expanded).eval()
    with FeatureTaps(expanded, names) as expanded_taps, FeatureTaps(contracted, names) as taps:
        expanded(images)
        contracted(images)
        expanded_features, contracted_features = expanded_taps.pop(), taps.pop()
    for name in names:
        torch.testing.assert_close(
            expanded_features[name], contracted_features[name], rtol=1e-3, atol=1e-4
        )
