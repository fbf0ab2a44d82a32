"""Expanded units: linear sub-networks that replace one conv or linear layer.

Each unit runs in one of two modes, switchable at any time:

- ``"sequential"``: the sub-layers one after another, as in the ExpandNets paper.
- ``"collapsed"``: compose the sub-layers' weights into one kernel and bias
  (differentiably, in float32 or higher even under autocast) and run a single conv or
  linear. Forward and gradients equal the sequential mode up to rounding, at the compact
  layer's activation cost.

``contract()`` returns the plain ``nn.Conv2d`` / ``nn.Linear`` that the unit equals, rebuilt
by keyword from every hyper-parameter of the layer it replaced.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdexpand.expansion.algebra import (
    compose_chain,
    compose_conv,
    compose_linear,
    compose_parallel_kernels,
    conv_composition_cost,
    linear_composition_cost,
)

__all__ = ["Mode", "ExpandedUnit", "ExpandedConv2d", "ExpandedLinear", "ACNetConv2d", "expanded_width"]

Mode = Literal["collapsed", "sequential"]
MODES = ("collapsed", "sequential")


def expanded_width(channels: int, rate: float, groups: int = 1) -> int:
    """Return ``rate * channels`` rounded to a multiple of ``groups``, at least ``groups``."""
    per_group = max(1, round(rate * channels / groups))
    return per_group * groups


def _composition_dtype(dtype: torch.dtype) -> torch.dtype:
    """Compose in float64 when the factors are float64, else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Return the (left, right, top, bottom) padding that ``conv`` applies to its input."""
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0, 0, 0)
        # "same": torch pads dilation * (k - 1) in total per dimension, the extra pixel of an
        # odd total going to the right / bottom.
        amounts = []
        for dilation, size in zip(reversed(conv.dilation), reversed(conv.kernel_size)):
            total = dilation * (size - 1)
            amounts += [total // 2, total - total // 2]
        return tuple(amounts)  # type: ignore[return-value]
    ph, pw = conv.padding
    return (pw, pw, ph, ph)


class ExpandedUnit(nn.Module):
    """Base class of every unit that contracts to one standard layer.

    Attributes:
        mode: ``"collapsed"`` or ``"sequential"``.
        nonlinear: True for the nonlinear twin (a ReLU after every sub-layer but the last),
            which always runs sequentially and cannot be contracted.
    """

    def __init__(self, mode: Mode, nonlinear: bool) -> None:
        super().__init__()
        self.nonlinear = nonlinear
        self.mode: Mode = "sequential"
        self.set_mode(mode)

    def set_mode(self, mode: Mode) -> None:
        """Switch between the sequential and the collapsed forward pass."""
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; use one of {MODES}")
        if self.nonlinear and mode == "collapsed":
            raise ValueError(
                "the nonlinear twin has ReLUs between its sub-layers, so it cannot run "
                "collapsed; use mode='sequential'"
            )
        self.mode = mode

    def equivalent_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return the differentiable weight and bias of the single layer the unit equals."""
        raise NotImplementedError

    def contract(self) -> nn.Module:
        """Return the standard layer that the unit equals, with its own storage."""
        raise NotImplementedError

    def _check_linear(self) -> None:
        if self.nonlinear:
            raise ValueError(
                f"cannot contract a nonlinear-twin {type(self).__name__}: the ReLUs between its "
                "sub-layers make it nonlinear; copy its weights into the linear ExpandNet with "
                "kdexpand.transfer_twin and contract that"
            )

    def _composed_in(self, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Compose with autocast disabled, in ``dtype`` or the factors' composition dtype."""
        first = next(self.parameters())
        target = dtype or _composition_dtype(first.dtype)
        if not torch.is_autocast_enabled(first.device.type):
            return self._compose(target)
        with torch.autocast(device_type=first.device.type, enabled=False):
            return self._compose(target)

    def _compose(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}" + (", nonlinear=True" if self.nonlinear else "")


def _cast(tensor: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(dtype)


def _compose_conv_chain(layers: nn.ModuleList, groups: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    factors = [(layer.weight.to(dtype), _cast(layer.bias, dtype)) for layer in layers]
    return compose_chain(
        factors,
        lambda first, second: compose_conv(*first, *second, groups),
        lambda first, second: conv_composition_cost(first, second, groups),
    )


class _ConvUnit(ExpandedUnit):
    """Shared machinery of the units that contract to one ``nn.Conv2d``."""

    def _copy_hyperparameters(self, source: nn.Conv2d) -> None:
        self.in_channels = source.in_channels
        self.out_channels = source.out_channels
        self.kernel_size = source.kernel_size
        self.stride = source.stride
        self.padding = source.padding
        self.dilation = source.dilation
        self.groups = source.groups
        self.padding_mode = source.padding_mode
        self.has_bias = source.bias is not None
        self.input_padding = _conv_padding(source)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.input_padding):
            return x
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        return F.pad(x, self.input_padding, mode=mode)

    def _collapsed_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._composed_in(None)
        if not torch.is_autocast_enabled(x.device.type):
            weight = weight.to(x.dtype)
        bias = _cast(bias, weight.dtype)
        left, right, top, bottom = self.input_padding
        if self.padding_mode == "zeros" and left == right and top == bottom:
            # Let the convolution pad: it avoids a padded copy of the input.
            return F.conv2d(x, weight, bias, self.stride, (top, left), self.dilation, self.groups)
        return F.conv2d(self._pad(x), weight, bias, self.stride, 0, self.dilation, self.groups)

    def equivalent_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._composed_in(None)

    @torch.no_grad()
    def contract(self) -> nn.Conv2d:
        self._check_linear()
        reference = next(self.parameters())
        weight, bias = self._composed_in(_contraction_dtype(reference))
        conv = nn.Conv2d(
            in_channels=self.in_channels, out_channels=self.out_channels,
            kernel_size=self.kernel_size, stride=self.stride, padding=self.padding,
            dilation=self.dilation, groups=self.groups, bias=self.has_bias,
            padding_mode=self.padding_mode, device=reference.device, dtype=reference.dtype,
        )
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
        return conv


class ExpandedConv2d(_ConvUnit):
    """A chain of convolutions (CL or CK expansion) equal to one ``nn.Conv2d``.

    All of the source layer's padding is applied once, before the first sub-layer, and no
    later sub-layer pads. The chain is therefore an affine map of the once-padded input, so
    its contraction is exact at the borders and for every padding mode. The stride sits on the
    k×k sub-layer (CL) or on the last sub-layer (CK); every sub-layer keeps the dilation.

    Args:
        source: The compact convolution to replace.
        strategy: ``"cl"`` (1×1 → k×k → 1×1) or ``"ck"`` (a chain of 3×3 convolutions).
        rate: Expansion rate r of the intermediate channel counts.
        mode: Initial forward mode.
        nonlinear: Build the nonlinear twin instead of the linear unit.
    """

    def __init__(
        self,
        source: nn.Conv2d,
        strategy: Literal["cl", "ck"],
        rate: float,
        mode: Mode = "collapsed",
        nonlinear: bool = False,
    ) -> None:
        super().__init__(mode, nonlinear)
        self.strategy = strategy
        self.rate = rate
        self._copy_hyperparameters(source)

        factory = {"device": source.weight.device, "dtype": source.weight.dtype}
        specs = cl_layer_specs(source, rate) if strategy == "cl" else ck_layer_specs(source, rate)
        self.layers = nn.ModuleList(
            nn.Conv2d(
                in_ch, out_ch, kernel, stride=stride, dilation=self.dilation,
                groups=self.groups, bias=self.has_bias, **factory,
            )
            for in_ch, out_ch, kernel, stride in specs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "collapsed":
            return self._collapsed_forward(x)
        x = self._pad(x)
        last = len(self.layers) - 1
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if self.nonlinear and index < last:
                x = F.relu(x)
        return x

    def _compose(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        return _compose_conv_chain(self.layers, self.groups, dtype)

    def extra_repr(self) -> str:
        widths = " → ".join([str(self.in_channels)] + [str(layer.out_channels) for layer in self.layers])
        return f"{self.strategy.upper()} r={self.rate:g}, channels {widths}, " + super().extra_repr()


def _contraction_dtype(reference: torch.Tensor) -> torch.dtype:
    """Contract in float64 where the device supports it, for the most exact result."""
    return torch.float32 if reference.device.type == "mps" else torch.float64


def cl_layer_specs(source: nn.Conv2d, rate: float) -> list[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """Return (in, out, kernel, stride) of CL's 1×1 → k×k → 1×1 sub-layers."""
    m, n, g = source.in_channels, source.out_channels, source.groups
    p, q = expanded_width(m, rate, g), expanded_width(n, rate, g)
    return [
        (m, p, (1, 1), (1, 1)),
        (p, q, source.kernel_size, source.stride),
        (q, n, (1, 1), (1, 1)),
    ]


def ck_layer_specs(source: nn.Conv2d, rate: float) -> list[tuple[int, int, tuple[int, int], tuple[int, int]]]:
    """Return (in, out, kernel, stride) of CK's chain of 3×3 sub-layers.

    A kh×kw kernel (both odd) becomes max((kh-1)/2, (kw-1)/2) layers. A dimension that needs
    fewer 3-wide layers uses width 1 in the rest, so the composed kernel is exactly kh×kw.
    Channels are r·m, r·n, …, r·n, n; the stride sits on the last layer.
    """
    m, n, g = source.in_channels, source.out_channels, source.groups
    kh, kw = source.kernel_size
    lh, lw = (kh - 1) // 2, (kw - 1) // 2
    count = max(lh, lw)
    outs = [expanded_width(m, rate, g)] + [expanded_width(n, rate, g)] * (count - 2) + [n]
    specs = []
    in_ch = m
    for index, out_ch in enumerate(outs):
        kernel = (3 if index < lh else 1, 3 if index < lw else 1)
        stride = source.stride if index == count - 1 else (1, 1)
        specs.append((in_ch, out_ch, kernel, stride))
        in_ch = out_ch
    return specs


class ExpandedLinear(ExpandedUnit):
    """Linear layers m → r·m → r·n → n equal to one ``nn.Linear`` (the FC expansion).

    Args:
        source: The compact linear layer to replace.
        rate: Expansion rate r of the hidden widths.
        mode: Initial forward mode.
        nonlinear: Build the nonlinear twin instead of the linear unit.
    """

    def __init__(self, source: nn.Linear, rate: float, mode: Mode = "collapsed", nonlinear: bool = False) -> None:
        super().__init__(mode, nonlinear)
        self.rate = rate
        self.in_features = source.in_features
        self.out_features = source.out_features
        self.has_bias = source.bias is not None
        factory = {"device": source.weight.device, "dtype": source.weight.dtype}
        m, n = source.in_features, source.out_features
        widths = [m, expanded_width(m, rate), expanded_width(n, rate), n]
        self.layers = nn.ModuleList(
            nn.Linear(a, b, bias=self.has_bias, **factory) for a, b in zip(widths[:-1], widths[1:])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "sequential":
            last = len(self.layers) - 1
            for index, layer in enumerate(self.layers):
                x = layer(x)
                if self.nonlinear and index < last:
                    x = F.relu(x)
            return x
        weight, bias = self._composed_in(None)
        weight = weight.to(x.dtype) if not torch.is_autocast_enabled(x.device.type) else weight
        return F.linear(x, weight, _cast(bias, weight.dtype))

    def _compose(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        factors = [(layer.weight.to(dtype), _cast(layer.bias, dtype)) for layer in self.layers]
        return compose_chain(factors, lambda first, second: compose_linear(*first, *second), linear_composition_cost)

    def equivalent_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._composed_in(None)

    @torch.no_grad()
    def contract(self) -> nn.Linear:
        self._check_linear()
        reference = self.layers[0].weight
        weight, bias = self._composed_in(_contraction_dtype(reference))
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.has_bias,
            device=reference.device, dtype=reference.dtype,
        )
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear

    def extra_repr(self) -> str:
        widths = " → ".join([str(self.in_features)] + [str(layer.out_features) for layer in self.layers])
        return f"FC r={self.rate:g}, features {widths}, " + super().extra_repr()


class ACNetConv2d(_ConvUnit):
    """ACNet's asymmetric branches (Ding et al., ICCV 2019) without their batch norms.

    A k×k, a 1×k and a k×1 convolution read the same once-padded input in parallel, and their
    outputs are summed. The asymmetric kernels sit on the centre row and column of the k×k
    window, so the sum equals one k×k convolution. Needs odd kernel sides larger than 1.
    """

    def __init__(self, source: nn.Conv2d, mode: Mode = "collapsed") -> None:
        super().__init__(mode, nonlinear=False)
        self._copy_hyperparameters(source)
        kh, kw = source.kernel_size
        factory = {"device": source.weight.device, "dtype": source.weight.dtype}
        common = {"stride": self.stride, "dilation": self.dilation, "groups": self.groups, "bias": self.has_bias}
        m, n = self.in_channels, self.out_channels
        self.square = nn.Conv2d(m, n, (kh, kw), **common, **factory)
        self.horizontal = nn.Conv2d(m, n, (1, kw), **common, **factory)
        self.vertical = nn.Conv2d(m, n, (kh, 1), **common, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "collapsed":
            return self._collapsed_forward(x)
        x = self._pad(x)

        # The asymmetric branches see the window's centre row / column: crop the padded
        # input by the dilated half-kernel on the side where their kernel is 1 wide.
        row = self.dilation[0] * (self.kernel_size[0] // 2)
        col = self.dilation[1] * (self.kernel_size[1] // 2)
        height, width = x.shape[-2:]
        out = self.square(x)
        out = out + self.horizontal(x[..., row : height - row, :])
        return out + self.vertical(x[..., :, col : width - col])

    def _compose(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        branches = (self.square, self.horizontal, self.vertical)
        weight = compose_parallel_kernels([branch.weight.to(dtype) for branch in branches], self.kernel_size)
        bias = None
        if self.has_bias:
            bias = sum(branch.bias.to(dtype) for branch in branches)
        return weight, bias

    def extra_repr(self) -> str:
        return f"ACNet {self.kernel_size[0]}x{self.kernel_size[1]} + 1x{self.kernel_size[1]} + {self.kernel_size[0]}x1, " + super().extra_repr()
