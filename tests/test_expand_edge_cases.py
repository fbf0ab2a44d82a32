"""expand / contract on layers that plain model surgery would break: layers wrapped by
torch.nn.utils (spectral norm, weight norm, pruning, parametrizations), layers with hooks,
frozen layers, Conv2d subclasses, non-square hyper-parameters in the report and rates below 1.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import kdexpand
from kdexpand.expansion import ExpandedConv2d

SURGERY_LOGGER = "kdexpand.expansion.surgery"


def decisions(model: nn.Module) -> dict[str, str]:
    return {decision.name: decision.detail for decision in model.expansion_report.decisions}


def with_second_layer(layer: nn.Module) -> nn.Module:
    """A two-conv model whose second layer is ``layer``, in float64 and eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), layer).double().eval()


def old_weight_norm(layer: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook-based form
        return nn.utils.weight_norm(layer)


def spectral_norm_after_forward(layer: nn.Conv2d) -> nn.Module:
    """Spectral norm after one training forward, which leaves a non-leaf ``weight`` behind."""
    wrapped = nn.utils.spectral_norm(layer)
    wrapped(torch.randn(1, layer.in_channels, 8, 8))
    return wrapped


def pruned(layer: nn.Module, name: str = "weight") -> nn.Module:
    return prune.l1_unstructured(layer, name, 0.5)


def pruned_twice(layer: nn.Module) -> nn.Module:
    prune.l1_unstructured(layer, "weight", 0.5)
    return prune.random_unstructured(layer, "weight", 0.2)


WRAPPED_LAYERS = [
    pytest.param(
        lambda: nn.utils.spectral_norm(nn.Conv2d(4, 4, 5, padding=2)),
        "weight is reparameterized (spectral_norm); remove it with torch.nn.utils.remove_spectral_norm "
        "before expanding, or exclude the layer",
        id="spectral_norm",
    ),
    pytest.param(
        lambda: spectral_norm_after_forward(nn.Conv2d(4, 4, 5, padding=2)),
        "weight is reparameterized (spectral_norm); remove it with torch.nn.utils.remove_spectral_norm",
        id="spectral_norm_after_forward",
    ),
    pytest.param(
        lambda: old_weight_norm(nn.Conv2d(4, 4, 3, padding=1)),
        "weight is reparameterized (weight_norm); remove it with torch.nn.utils.remove_weight_norm",
        id="weight_norm",
    ),
    pytest.param(
        lambda: pruned(nn.Conv2d(4, 4, 3, padding=1)),
        "weight is pruned (L1Unstructured); make the pruning permanent with "
        "torch.nn.utils.prune.remove(layer, 'weight') before expanding, or exclude the layer",
        id="prune",
    ),
    pytest.param(
        lambda: pruned_twice(nn.Conv2d(4, 4, 3, padding=1)),
        "weight is pruned (L1Unstructured, RandomUnstructured)",
        id="prune_twice",
    ),
    pytest.param(
        lambda: pruned(nn.Conv2d(4, 4, 3, padding=1), "bias"),
        "bias is pruned (L1Unstructured); make the pruning permanent with "
        "torch.nn.utils.prune.remove(layer, 'bias')",
        id="prune_bias",
    ),
    pytest.param(
        lambda: parametrizations.spectral_norm(nn.Conv2d(4, 4, 5, padding=2)),
        "weight is reparameterized (spectral_norm, torch.nn.utils.parametrize); remove it with "
        "torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') before expanding, "
        "or exclude the layer",
        id="parametrizations.spectral_norm",
    ),
    pytest.param(
        lambda: parametrizations.weight_norm(nn.Conv2d(4, 4, 3, padding=1)),
        "weight is reparameterized (weight_norm, torch.nn.utils.parametrize)",
        id="parametrizations.weight_norm",
    ),
]


@pytest.mark.parametrize("make_layer, reason", WRAPPED_LAYERS)
def test_wrapped_conv_reported_and_kept(make_layer, reason, caplog):
    model = with_second_layer(make_layer())
    original_state = {key: tensor.clone() for key, tensor in model.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger=SURGERY_LOGGER):
        expanded = kdexpand.expand(model, conv="cl")
    details = decisions(expanded)

    assert details["0"].startswith("CL")
    assert details["1"].startswith("unsupported: " + reason), details["1"]
    assert [record.getMessage().split(" ")[1] for record in caplog.records] == ["1"]
    assert type(expanded[1]) is type(model[1])
    assert expanded[1].state_dict().keys() == model[1].state_dict().keys()

    # The input model is untouched and still runs.
    assert all(torch.equal(original_state[key], tensor) for key, tensor in model.state_dict().items())
    model(torch.randn(1, 3, 8, 8, dtype=torch.float64))

    # The contracted model loads strictly into the original one, wrapper tensors included.
    contracted = kdexpand.contract(expanded)
    model.load_state_dict(contracted.state_dict(), strict=True)


@pytest.mark.parametrize("make_layer", [
    pytest.param(lambda: old_weight_norm(nn.Conv2d(4, 4, 3, padding=1)), id="weight_norm"),
    pytest.param(lambda: pruned(nn.Conv2d(4, 4, 3, padding=1)), id="prune"),
    pytest.param(lambda: spectral_norm_after_forward(nn.Conv2d(4, 4, 3, padding=1)), id="spectral_norm"),
])
def test_wrapped_layer_copy_trains_its_own_tensors(make_layer):
    model = with_second_layer(make_layer())
    expanded = kdexpand.expand(model, conv="cl")
    wrapped = expanded[1]

    # The hook recomputes the copy's weight from the copy's own parameters.
    expanded.train()
    expanded(torch.randn(2, 3, 8, 8, dtype=torch.float64)).sum().backward()
    copied_parameters = dict(wrapped.named_parameters())
    assert all(parameter.grad is not None for parameter in copied_parameters.values())
    original_parameters = dict(model[1].named_parameters())
    assert all(original_parameters[name] is not parameter for name, parameter in copied_parameters.items())
    assert all(parameter.grad is None for parameter in original_parameters.values())


def test_wrapped_linear_reported_with_fc():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), parametrizations.orthogonal(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2)
    )
    expanded = kdexpand.expand(model, conv=None, fc=True, include=["1", "3"])
    details = decisions(expanded)

    assert details["1"].startswith("unsupported: weight is reparameterized (orthogonal, torch.nn.utils.parametrize)")
    assert details["3"].startswith("FC")


def hook_twice(module, inputs, output):
    return output * 2


def hook_identity_inputs(module, inputs):
    return inputs


def hook_backward(module, grad_input, grad_output):
    return None


@pytest.mark.parametrize("register, reason", [
    pytest.param(
        lambda layer: layer.register_forward_hook(hook_twice),
        "forward hook hook_twice is registered on the layer",
        id="forward_hook",
    ),
    pytest.param(
        lambda layer: layer.register_forward_pre_hook(hook_identity_inputs),
        "forward pre-hook hook_identity_inputs is registered on the layer",
        id="forward_pre_hook",
    ),
    pytest.param(
        lambda layer: layer.register_full_backward_hook(hook_backward),
        "backward hook hook_backward is registered on the layer",
        id="backward_hook",
    ),
])
def test_hooked_layer_reported_and_kept(register, reason):
    layer = nn.Conv2d(4, 4, 3, padding=1)
    register(layer)
    model = with_second_layer(layer)
    expanded = kdexpand.expand(model, conv="cl")
    details = decisions(expanded)

    assert details["1"].startswith("unsupported: " + reason), details["1"]
    assert details["1"].endswith("remove the hook before expanding, or exclude the layer")
    assert type(expanded[1]) is nn.Conv2d
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(expanded[1](model[0](x)), model[1](model[0](x)))


def test_plain_tensor_weight_reported():
    layer = nn.Linear(4, 4)
    weight = layer.weight.detach().clone()
    del layer.weight
    layer.weight = weight  # a plain tensor attribute, not a registered parameter
    model = nn.Sequential(layer, nn.Linear(4, 2))
    expanded = kdexpand.expand(model, conv=None, fc=True, include="0")

    assert decisions(expanded)["0"] == (
        "unsupported: weight is a Tensor, not an nn.Parameter; register it with "
        "nn.Parameter before expanding, or exclude the layer"
    )
    assert expanded[0].weight is not weight
    assert torch.equal(expanded[0].weight, weight)


class CachedProduct(nn.Module):
    """A module that keeps a non-leaf tensor as an attribute, which no deep copy accepts."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.cached = self.scale * 2


def test_uncopyable_model_raises_value_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sequential(CachedProduct()))
    message = (
        r"expand: 1.0.cached is a tensor computed by autograd \(not a graph leaf\), which torch "
        r"cannot deep-copy; detach it, or compute it in forward instead of storing it"
    )
    with pytest.raises(ValueError, match=message):
        kdexpand.expand(model, conv="cl")


def test_frozen_layers_left_alone():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    model[0].requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[4].requires_grad_(False)
    expanded = kdexpand.expand(model, conv="cl", fc=True, include=["0", "1", "2", "4", "5"])
    details = decisions(expanded)

    assert details["0"] == "frozen (requires_grad=False)"
    assert details["1"].startswith("CL")
    assert details["2"] == "bias frozen (requires_grad=False)"
    assert details["4"] == "frozen (requires_grad=False)"
    assert details["5"].startswith("FC")
    for name in ("0", "2", "4"):
        assert type(expanded.get_submodule(name)) is type(model.get_submodule(name))
    assert not expanded[0].weight.requires_grad
    assert not expanded[0].bias.requires_grad
    assert expanded[2].weight.requires_grad
    assert not expanded[2].bias.requires_grad
    assert not expanded[4].weight.requires_grad


@pytest.mark.parametrize("layer, description", [
    (nn.Conv2d(4, 4, 3, stride=(1, 2), dilation=(1, 3), padding=(0, 2)), "Conv2d 4→4 3x3 s1x2 d1x3 p0x2"),
    (nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=1), "Conv2d 4→4 3x3 s2 d2 p1"),
    (nn.Conv2d(4, 4, (1, 5), padding="same"), "Conv2d 4→4 1x5 p=same"),
    (nn.Conv2d(4, 8, 3, groups=2), "Conv2d 4→8 3x3 g2"),
])
def test_report_describes_conv_settings(layer, description):
    expanded = kdexpand.expand(nn.Sequential(layer), conv="cl", pointwise=True)

    assert expanded.expansion_report.decisions[0].layer == description


class PlainSubclassConv(nn.Conv2d):
    """A Conv2d subclass that changes only its constructor defaults."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)


class ScaledSubclassConv(nn.Conv2d):
    """A Conv2d subclass with an extra parameter, which the contracted nn.Conv2d would lose."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(in_channels, out_channels, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(()))


class OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 2 * weight, bias)


@torch.no_grad()
def test_conv_subclass_without_forward_expanded():
    torch.manual_seed(0)
    model = nn.Sequential(PlainSubclassConv(3, 4), nn.ReLU(), PlainSubclassConv(4, 4)).double()
    expanded = kdexpand.expand(model, conv="cl")

    assert list(decisions(expanded).values()) == ["CL r=4", "CL r=4"]
    assert isinstance(expanded[0], ExpandedConv2d)

    contracted = kdexpand.contract(expanded)
    assert type(contracted[0]) is nn.Conv2d
    assert contracted.state_dict().keys() == model.state_dict().keys()
    model.load_state_dict(contracted.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    reference = kdexpand.set_mode(expanded, "sequential")(x)
    assert torch.allclose(model(x), reference, rtol=0, atol=1e-10)


def test_conv_subclass_rejected_with_reason():
    model = nn.Sequential(ScaledSubclassConv(3, 4), OwnConvForward(4, 4, 3))
    details = decisions(kdexpand.expand(model, conv="cl"))

    assert details["0"] == (
        "unsupported: test_expand_edge_cases.ScaledSubclassConv subclasses nn.Conv2d and adds "
        "parameters, buffers or submodules (scale)"
    )
    assert details["1"] == "unsupported: test_expand_edge_cases.OwnConvForward subclasses nn.Conv2d and overrides _conv_forward"


def test_linear_subclass_reason_is_accurate():
    model = nn.Sequential(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4), nn.Linear(4, 2))
    details = decisions(kdexpand.expand(model, conv=None, fc=True, include="*"))

    assert details["0"].startswith(
        "unsupported: torch.nn.modules.linear.NonDynamicallyQuantizableLinear subclasses nn.Linear; "
        "only plain nn.Linear layers are expanded"
    )
    assert "own behaviour" not in details["0"]


def rate_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "over-parameterization" in record.getMessage()]


def test_rate_below_one_warns_once(caplog):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    with caplog.at_level(logging.WARNING, logger=SURGERY_LOGGER):
        expanded = kdexpand.expand(model, conv="cl", rate=0.5)

    assert decisions(expanded)["1"] == "CL r=0.5"
    assert len(expanded[1].layers[0].weight) == 4
    messages = rate_warnings(caplog)
    assert len(messages) == 1
    assert "rate=0.5" in messages[0]
    assert "fc_rate" not in messages[0]


def test_fc_rate_below_one_warns(caplog):
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 8), nn.Linear(8, 2))
    with caplog.at_level(logging.WARNING, logger=SURGERY_LOGGER):
        kdexpand.expand(model, conv="cl", rate=0.25, fc=True, fc_rate=0.25)

    messages = rate_warnings(caplog)
    # No convolution is expanded, so only the linear layers' rate is narrow.
    assert len(messages) == 1
    assert "fc_rate=0.25" in messages[0]


def test_rate_of_four_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger=SURGERY_LOGGER):
        kdexpand.expand(nn.Sequential(nn.Conv2d(3, 8, 3)), conv="cl", rate=4)

    assert caplog.records == []


def test_recipe_check_names_unsupported_reason():
    """The trainer's preflight quotes the reason for a wrapped conv, not only plain ones."""
    from kdexpand.recipe import ExpandConfig, RecipeError
    from kdexpand.trainer.preflight import check_expansion

    model = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Conv2d(3, 4, 7)), nn.Flatten())
    expanded = kdexpand.expand(model, conv="ck")

    with pytest.raises(RecipeError, match=r"expands no convolution of this model \(0: unsupported: weight is reparameterized"):
        check_expansion(ExpandConfig(conv="ck"), expanded)
