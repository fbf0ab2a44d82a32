"""The expand / contract API: arguments, name filters, report, errors and the twin."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdexpand
from kdexpand.expansion import ExpandedConv2d, ExpandedLinear
from kdexpand.models import SmallNet


class CustomConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) * 2


def _decisions(model):
    return {decision.name: decision for decision in model.expansion_report.decisions}


def test_expand_leaves_input_untouched():
    compact = SmallNet(kernel_size=7)
    before = {k: v.clone() for k, v in compact.state_dict().items()}
    expanded = kdexpand.expand(compact, conv="ck", fc=True)

    assert type(compact.features[0]) is nn.Conv2d
    assert type(expanded.features[0]) is ExpandedConv2d
    assert all(torch.equal(before[k], v) for k, v in compact.state_dict().items())


def test_replaced_modules_keep_names():
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True)
    names = dict(expanded.named_modules())

    assert isinstance(names["features.0"], ExpandedConv2d)
    assert isinstance(names["fc"], ExpandedLinear)
    assert type(names["classifier"]) is nn.Linear


def test_classifier_expanded_only_when_included():
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv=None, fc=True, include=["fc", "classifier"])
    decisions = _decisions(expanded)

    assert decisions["classifier"].expanded
    assert decisions["fc"].expanded
    assert decisions["features.0"].detail == "conv=None"


def test_include_and_exclude_patterns():
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv="cl", include="features.*", exclude="features.8")
    decisions = _decisions(expanded)

    assert decisions["features.0"].expanded
    assert decisions["features.4"].expanded
    assert decisions["features.8"].detail == "matched by exclude"
    assert decisions["fc"].detail == "fc=False"


def test_ck_small_kernels_reported():
    expanded = kdexpand.expand(SmallNet(kernel_size=3), conv="ck")
    decisions = _decisions(expanded)

    assert not decisions["features.0"].expanded
    assert "fallback='cl'" in decisions["features.0"].detail

    with_fallback = _decisions(kdexpand.expand(SmallNet(kernel_size=3), conv="ck", fallback="cl"))
    assert with_fallback["features.0"].expanded
    assert with_fallback["features.0"].detail.startswith("CL fallback")


def test_report_lists_every_layer_in_text():
    text = str(kdexpand.expand(SmallNet(kernel_size=7), conv="ck").expansion_report)

    assert text.splitlines()[0] == "3 expanded, 2 left alone"
    for name in ("features.0", "features.4", "features.8", "fc", "classifier"):
        assert name in text


def test_unsupported_layers_are_reported():
    model = nn.Sequential(
        CustomConv(3, 4, 3), nn.Conv1d(4, 4, 3), nn.LazyConv2d(4, 3), nn.Conv2d(3, 4, 3)
    )
    expanded = kdexpand.expand(model, conv="cl")
    decisions = _decisions(expanded)

    assert decisions["0"].detail.startswith("unsupported: test_expand_api.CustomConv subclasses nn.Conv2d")
    assert decisions["1"].detail.startswith("unsupported: Conv1d")
    assert "lazy" in decisions["2"].detail
    assert decisions["3"].expanded


@pytest.mark.parametrize("arguments, message", [
    (dict(conv="xx"), "unknown conv strategy 'xx'"),
    (dict(rate=0), "rate must be a positive number, got 0"),
    (dict(rate=-1.5), "rate must be a positive number, got -1.5"),
    (dict(rate=float("nan")), "rate must be a positive number"),
    (dict(fc_rate=0.0), "fc_rate must be a positive number"),
    (dict(mode="fast"), "unknown mode 'fast'"),
    (dict(fallback="ck"), "fallback must be None or 'cl'"),
    (dict(include="head.*"), "pattern 'head.*' matches no Conv2d or Linear layer"),
    (dict(exclude=[""]), "exclude patterns must be non-empty strings"),
    (dict(conv="acnet", nonlinear=True), "no nonlinear twin"),
    (dict(nonlinear=True, mode="collapsed"), "cannot run collapsed"),
])
def test_invalid_arguments_raise(arguments, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.").replace("*", r"\*")):
        kdexpand.expand(SmallNet(kernel_size=7), **arguments)


def test_expanding_twice_raises():
    expanded = kdexpand.expand(SmallNet(kernel_size=7))
    with pytest.raises(ValueError, match="already contains expanded units"):
        kdexpand.expand(expanded)


def test_set_mode_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode"):
        kdexpand.set_mode(kdexpand.expand(SmallNet()), "fused")


def test_twin_has_linear_parameter_names_and_shapes():
    compact = SmallNet(kernel_size=7)
    twin = kdexpand.expand(compact, conv="ck", fc=True, nonlinear=True)
    linear = kdexpand.expand(compact, conv="ck", fc=True)
    twin_shapes = {k: v.shape for k, v in twin.state_dict().items()}
    linear_shapes = {k: v.shape for k, v in linear.state_dict().items()}

    assert twin_shapes == linear_shapes
    assert all(unit.mode == "sequential" for _, unit in kdexpand.expanded_units(twin))


def test_twin_is_nonlinear_and_cannot_be_contracted():
    torch.manual_seed(0)
    compact = SmallNet(kernel_size=7).eval()
    twin = kdexpand.expand(compact, conv="ck", fc=True, nonlinear=True).eval()
    linear = kdexpand.expand(compact, conv="ck", fc=True).eval()
    linear.load_state_dict(twin.state_dict())
    x = torch.randn(4, 3, 32, 32)

    assert not torch.allclose(twin(x), linear(x))
    with pytest.raises(ValueError, match="nonlinear twin"):
        kdexpand.contract(twin)


def test_transfer_twin_copies_every_tensor():
    torch.manual_seed(0)
    compact = SmallNet(kernel_size=7)
    twin = kdexpand.expand(compact, conv="ck", fc=True, nonlinear=True)
    linear = kdexpand.expand(compact, conv="ck", fc=True)
    with torch.no_grad():
        for tensor in twin.state_dict().values():
            if tensor.is_floating_point():
                tensor.normal_()

    kdexpand.transfer_twin(twin, linear)

    source, target = twin.state_dict(), linear.state_dict()
    assert set(source) == set(target)
    for key in source:
        assert torch.equal(source[key], target[key]), key


def test_transfer_twin_rejects_mismatch():
    compact = SmallNet(kernel_size=7)
    twin = kdexpand.expand(compact, conv="ck", fc=True, nonlinear=True)
    other_rate = kdexpand.expand(compact, conv="ck", fc=True, rate=2.0)
    other_layers = kdexpand.expand(compact, conv="ck")

    with pytest.raises(ValueError, match="shape mismatches"):
        kdexpand.transfer_twin(twin, other_rate)
    with pytest.raises(ValueError, match="extra in twin"):
        kdexpand.transfer_twin(twin, other_layers)
    with pytest.raises(ValueError, match="not a nonlinear twin"):
        kdexpand.transfer_twin(other_rate, twin)


class SharedConvNet(nn.Module):
    """A conv applied twice under two names, as in weight-tied models."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = self.a
        self.loop = nn.Sequential(self.a, nn.ReLU(), self.a)

    def forward(self, x):
        return self.loop(self.b(x))


def test_shared_module_stays_shared():
    torch.manual_seed(0)
    compact = SharedConvNet().double()
    expanded = kdexpand.expand(compact, conv="cl")
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)

    assert expanded.a is expanded.b
    assert expanded.loop[0] is expanded.a
    assert expanded.loop[2] is expanded.a
    assert isinstance(expanded.a, ExpandedConv2d)
    assert "shared, also used as b, loop.0, loop.2" in expanded.expansion_report.decisions[0].detail

    contracted = kdexpand.contract(expanded)
    assert contracted.a is contracted.b
    assert contracted.loop[2] is contracted.a
    fresh = SharedConvNet().double()
    fresh.load_state_dict(contracted.state_dict(), strict=True)
    assert torch.allclose(fresh(x), expanded(x), rtol=0, atol=1e-12)
