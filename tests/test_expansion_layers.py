"""Layer-level exactness of expansion and contraction.

Every configuration compares the expanded unit (sequential and collapsed) with its
contraction on inputs of odd spatial size, so border pixels are checked. Tolerances:
float64 relative error <= 1e-10; float32 max-abs error <= 1e-5 times the output's magnitude.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import kdexpand
from kdexpand.expansion import ACNetConv2d, ExpandedConv2d, ExpandedLinear

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5
KERNELS = [(1, 1), (3, 3), (5, 5), (7, 7), (9, 9), (11, 11), (3, 5), (1, 7)]


def _variations(kernel):
    """Yield conv keyword sets: a base configuration and one change of each kind from it."""
    kh, kw = kernel
    base = dict(stride=1, padding=(kh // 2, kw // 2), dilation=1, groups=1, bias=True, padding_mode="zeros", rate=4.0)
    changes = [
        {},
        {"stride": 2},
        {"stride": 3},
        {"stride": (1, 2)},
        {"padding": 0},
        {"padding": "same"},
        {"padding": "valid"},
        {"padding": (kh // 2, 0)},
        {"dilation": 2},
        {"dilation": 2, "stride": 2, "padding": (kh // 2 * 2, kw // 2 * 2)},
        {"groups": 2},
        {"groups": "depthwise"},
        {"bias": False},
        {"padding_mode": "reflect"},
        {"padding_mode": "replicate"},
        {"padding_mode": "circular"},
        {"padding_mode": "reflect", "padding": "same"},
        {"rate": 0.25},
        {"rate": 1.0},
        {"groups": 2, "bias": False, "stride": 2, "rate": 0.25},
    ]
    for change in changes:
        yield {**base, **change}


def _case_id(kernel, strategy, config):
    parts = [f"{strategy}", f"k{kernel[0]}x{kernel[1]}"]
    parts += [f"{key}={value}" for key, value in config.items()]
    return "-".join(str(part).replace(" ", "") for part in parts)


def _applicable(kernel, strategy):
    kh, kw = kernel
    if strategy == "cl":
        return True
    if strategy == "ck":
        return kh % 2 == 1 and kw % 2 == 1 and max(kh, kw) > 3
    return kh % 2 == 1 and kw % 2 == 1 and min(kh, kw) > 1


def _meaningful(kernel, config):
    """Dilation does nothing on a 1x1 kernel, so that case would only repeat another."""
    return not (kernel == (1, 1) and config["dilation"] == 2)


# Only the configurations a strategy applies to; the layers it leaves alone are covered by
# the expansion-report tests in test_expand_api.py.
CONV_CASES = [
    pytest.param(kernel, strategy, config, id=_case_id(kernel, strategy, config))
    for kernel in KERNELS
    for strategy in ("cl", "ck", "acnet")
    if _applicable(kernel, strategy)
    for config in _variations(kernel)
    if _meaningful(kernel, config)
]


def _build_conv(kernel, config, dtype):
    in_channels, out_channels = 4, 6
    groups = config["groups"]
    if groups == "depthwise":
        groups = in_channels = out_channels = 4
    return nn.Conv2d(
        in_channels, out_channels, kernel, stride=config["stride"], padding=config["padding"],
        dilation=config["dilation"], groups=groups, bias=config["bias"],
        padding_mode=config["padding_mode"], dtype=dtype,
    )


def _unit(conv, strategy, rate):
    if strategy == "acnet":
        return ACNetConv2d(conv)
    return ExpandedConv2d(conv, strategy, rate)


def _relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def _input_for(conv, dtype):
    # Odd sizes, large enough for reflect padding of an 11x11 kernel with dilation 2.
    height, width = 23, 25
    return torch.randn(2, conv.in_channels, height, width, dtype=dtype)


@pytest.mark.parametrize("kernel, strategy, config", CONV_CASES)
def test_conv_unit_matches_contraction(kernel, strategy, config):
    torch.manual_seed(0)
    conv = _build_conv(kernel, config, torch.float64)
    unit = _unit(conv, strategy, config["rate"])
    x = _input_for(conv, torch.float64)

    contracted = unit.contract()
    reference = contracted(x)
    unit.set_mode("sequential")
    sequential = unit(x)
    unit.set_mode("collapsed")
    collapsed = unit(x)

    assert type(contracted) is nn.Conv2d
    for attribute in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(contracted, attribute) == getattr(conv, attribute), attribute
    assert set(contracted.state_dict()) == set(conv.state_dict())
    assert sequential.shape == conv(x).shape
    assert _relative_error(sequential, reference) <= FLOAT64_TOLERANCE
    assert _relative_error(collapsed, reference) <= FLOAT64_TOLERANCE


@pytest.mark.parametrize("kernel, strategy, config", CONV_CASES[:: 3])
def test_conv_unit_float32_bound(kernel, strategy, config):
    torch.manual_seed(1)
    conv = _build_conv(kernel, config, torch.float32)
    unit = _unit(conv, strategy, config["rate"])
    x = _input_for(conv, torch.float32)

    reference = unit.contract()(x)
    unit.set_mode("sequential")
    sequential = unit(x)
    unit.set_mode("collapsed")
    collapsed = unit(x)

    assert _relative_error(sequential, reference) <= FLOAT32_TOLERANCE
    assert _relative_error(collapsed, reference) <= FLOAT32_TOLERANCE


@pytest.mark.parametrize("kernel", [(2, 2), (4, 4), (2, 3)])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_even_kernel_same_padding_cl(kernel, padding_mode):
    # An even kernel with padding="same" pads asymmetrically (the extra pixel right/bottom).
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, kernel, padding="same", padding_mode=padding_mode, dtype=torch.float64)
    unit = ExpandedConv2d(conv, "cl", 2.0)
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64)

    reference = unit.contract()(x)
    for mode in ("sequential", "collapsed"):
        unit.set_mode(mode)
        output = unit(x)
        assert output.shape == x.shape[:1] + (5,) + x.shape[2:]
        assert _relative_error(output, reference) <= FLOAT64_TOLERANCE


LINEAR_CASES = list(itertools.product([(7, 5), (13, 1), (1, 9)], [True, False], [0.25, 1.0, 4.0]))


@pytest.mark.parametrize("features, bias, rate", LINEAR_CASES)
def test_linear_unit_matches_contraction(features, bias, rate):
    torch.manual_seed(3)
    linear = nn.Linear(*features, bias=bias, dtype=torch.float64)
    unit = ExpandedLinear(linear, rate)
    x = torch.randn(6, features[0], dtype=torch.float64)

    contracted = unit.contract()
    reference = contracted(x)
    unit.set_mode("sequential")
    sequential = unit(x)
    unit.set_mode("collapsed")
    collapsed = unit(x)

    assert type(contracted) is nn.Linear
    assert set(contracted.state_dict()) == set(linear.state_dict())
    assert [layer.out_features for layer in unit.layers] == [
        max(1, round(rate * features[0])), max(1, round(rate * features[1])), features[1]
    ]
    assert _relative_error(sequential, reference) <= FLOAT64_TOLERANCE
    assert _relative_error(collapsed, reference) <= FLOAT64_TOLERANCE


def test_widths_follow_rate_and_groups():
    conv = nn.Conv2d(8, 16, 7, padding=3, groups=2)
    cl = ExpandedConv2d(conv, "cl", 4.0)
    ck = ExpandedConv2d(conv, "ck", 4.0)
    tiny = ExpandedConv2d(conv, "cl", 0.01)

    assert [layer.out_channels for layer in cl.layers] == [32, 64, 16]
    assert [layer.kernel_size for layer in cl.layers] == [(1, 1), (7, 7), (1, 1)]
    assert [layer.out_channels for layer in ck.layers] == [32, 64, 16]
    assert [layer.kernel_size for layer in ck.layers] == [(3, 3)] * 3
    # Rounded to at least one channel per group.
    assert [layer.out_channels for layer in tiny.layers] == [2, 2, 16]


def test_stride_and_padding_placement():
    conv = nn.Conv2d(4, 6, 9, stride=2, padding=4, dilation=1)
    cl = ExpandedConv2d(conv, "cl", 2.0)
    ck = ExpandedConv2d(conv, "ck", 2.0)

    assert [layer.stride for layer in cl.layers] == [(1, 1), (2, 2), (1, 1)]
    assert [layer.stride for layer in ck.layers] == [(1, 1), (1, 1), (1, 1), (2, 2)]
    # The unit pads its input once; no sub-layer pads.
    assert all(layer.padding == (0, 0) for layer in cl.layers + ck.layers)
    assert cl.input_padding == (4, 4, 4, 4)


def _numpy_correlate(x, weight, bias, stride, dilation, groups):
    """Cross-correlate an already padded (C, H, W) array, as a plain NumPy reference."""
    out_channels, in_per_group, kh, kw = weight.shape
    _, height, width = x.shape
    out_h = (height - dilation * (kh - 1) - 1) // stride + 1
    out_w = (width - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((out_channels, out_h, out_w))
    out_per_group = out_channels // groups
    for o in range(out_channels):
        g = o // out_per_group
        channels = x[g * in_per_group : (g + 1) * in_per_group]
        for i in range(out_h):
            for j in range(out_w):
                rows = i * stride + dilation * np.arange(kh)
                cols = j * stride + dilation * np.arange(kw)
                patch = channels[:, rows][:, :, cols]
                out[o, i, j] = np.sum(patch * weight[o]) + (0.0 if bias is None else bias[o])
    return out


def _affine_matrix(function, in_shape):
    """Return the (n_out, n_in + 1) matrix of an affine map, built column by column."""
    size = int(np.prod(in_shape))
    offset = function(np.zeros(in_shape)).ravel()
    columns = [function(np.eye(size)[k].reshape(in_shape)).ravel() - offset for k in range(size)]
    return np.concatenate([np.stack(columns, axis=1), offset[:, None]], axis=1)


@pytest.mark.parametrize("strategy, kernel, stride, dilation, groups", [
    ("cl", 3, 1, 1, 1),
    ("cl", 3, 2, 1, 2),
    ("ck", 5, 1, 1, 1),
    ("ck", 5, 2, 2, 1),
    ("ck", 7, 1, 1, 2),
])
def test_matrix_view_matches_numpy_reference(strategy, kernel, stride, dilation, groups):
    # The matrix view of the ExpandNets paper (Guo et al., NeurIPS 2020): each sub-layer is an
    # affine map of the flattened (padded) input, and their product must equal the map of the
    # contracted kernel. Both are computed
    # with the NumPy correlation above, independently of torch's convolution.
    torch.manual_seed(4)
    conv = nn.Conv2d(2, 4, kernel, stride=stride, dilation=dilation, groups=groups, dtype=torch.float64)
    unit = ExpandedConv2d(conv, strategy, 1.5)
    contracted = unit.contract()
    in_shape = (2, 2 * kernel * dilation + 1, 2 * kernel * dilation)

    def homogeneous(matrix):
        return np.vstack([matrix, np.eye(1, matrix.shape[1], matrix.shape[1] - 1)])

    product = None
    shape = in_shape
    for layer in unit.layers:
        weight = layer.weight.detach().numpy()
        bias = layer.bias.detach().numpy()
        layer_stride = layer.stride[0]

        def step(x, weight=weight, bias=bias, layer_stride=layer_stride):
            return _numpy_correlate(x, weight, bias, layer_stride, dilation, groups)

        matrix = homogeneous(_affine_matrix(step, shape))
        product = matrix if product is None else matrix @ product
        shape = step(np.zeros(shape)).shape

    def contracted_step(x):
        return _numpy_correlate(
            x, contracted.weight.detach().numpy(), contracted.bias.detach().numpy(), stride, dilation, groups
        )

    expected = homogeneous(_affine_matrix(contracted_step, in_shape))
    np.testing.assert_allclose(product, expected, rtol=0, atol=1e-10 * np.abs(expected).max())


def test_nonlinear_twin_unit_refuses_contraction():
    conv = nn.Conv2d(3, 4, 5, padding=2)
    twin = ExpandedConv2d(conv, "ck", 2.0, mode="sequential", nonlinear=True)

    with pytest.raises(ValueError, match="nonlinear"):
        twin.contract()
    with pytest.raises(ValueError, match="sequential"):
        twin.set_mode("collapsed")


def test_twin_differs_from_linear_unit():
    torch.manual_seed(5)
    conv = nn.Conv2d(3, 4, 5, padding=2)
    twin = ExpandedConv2d(conv, "ck", 2.0, mode="sequential", nonlinear=True)
    linear = ExpandedConv2d(conv, "ck", 2.0, mode="sequential")
    linear.load_state_dict(twin.state_dict())
    x = torch.randn(2, 3, 9, 9)

    assert not torch.allclose(twin(x), linear(x))


def test_kdexpand_exports_api():
    for name in ("expand", "contract", "set_mode", "transfer_twin", "is_expanded"):
        assert hasattr(kdexpand, name)


def test_compose_chain_picks_cheapest_order():
    from kdexpand.expansion.algebra import compose_chain, compose_linear, linear_composition_cost

    torch.manual_seed(6)
    widths = [512, 2048, 256, 64]
    factors = [
        (torch.randn(b, a, dtype=torch.float64), torch.randn(b, dtype=torch.float64))
        for a, b in zip(widths[:-1], widths[1:])
    ]
    calls = []

    def compose(first, second):
        calls.append((tuple(first[0].shape), tuple(second[0].shape)))
        return compose_linear(*first, *second)

    weight, bias = compose_chain(factors, compose, linear_composition_cost)
    expected_weight, expected_bias = factors[0]
    for next_weight, next_bias in factors[1:]:
        expected_weight, expected_bias = compose_linear(expected_weight, expected_bias, next_weight, next_bias)

    # Right to left: (256 -> 64) after (2048 -> 256) first, then after (512 -> 2048).
    assert calls == [((256, 2048), (64, 256)), ((2048, 512), (64, 2048))]
    assert _relative_error(weight, expected_weight) <= FLOAT64_TOLERANCE
    assert _relative_error(bias, expected_bias) <= FLOAT64_TOLERANCE
