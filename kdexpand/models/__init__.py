"""Compact models that kdexpand trains, and the registry that builds them by name.

:func:`build_model` looks a name up in this order: the registry :data:`MODELS` (the
paper's SmallNets), timm, then torchvision. A ``timm:`` or ``torchvision:`` prefix picks
the library explicitly, which matters for names both define (``resnet18``: unprefixed,
timm's is built).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torchvision
from torch import nn

from kdexpand.models.smallnet import SmallNet
from kdexpand.registry import Registry, closest_match

__all__ = ["MODELS", "SmallNet", "build_model"]

ModelFactory = Callable[..., nn.Module]
MODELS: Registry[ModelFactory] = Registry("model")


def _reject_kernel_size(name: str, kwargs: dict[str, Any]) -> None:
    if "kernel_size" in kwargs:
        raise ValueError(
            f"kernel_size is set by the model name {name!r}, so it must not be given as an argument; "
            "use smallnet3 or smallnet7 and remove kernel_size from student.kwargs"
        )


@MODELS.register("smallnet7")
def smallnet7(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """SmallNet with 7x7 kernels and padding 3."""
    _reject_kernel_size("smallnet7", kwargs)
    return SmallNet(num_classes, kernel_size=7, in_channels=in_channels, image_size=image_size, **kwargs)


@MODELS.register("smallnet3")
def smallnet3(num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any) -> nn.Module:
    """SmallNet with 3x3 kernels and no padding."""
    _reject_kernel_size("smallnet3", kwargs)
    return SmallNet(num_classes, kernel_size=3, in_channels=in_channels, image_size=image_size, **kwargs)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, image_size: int = 32, **kwargs: Any
) -> nn.Module:
    """Build a classifier by name with ``num_classes`` outputs and random weights.

    Args:
        name: A :data:`MODELS` name, a timm model name or a torchvision classification
            model name, optionally prefixed with ``timm:`` or ``torchvision:``.
        num_classes: Number of logits.
        in_channels: Input channels (timm and the SmallNets; torchvision models take 3).
        image_size: Input height and width; the SmallNets size their linear layer from it.
        **kwargs: Extra constructor arguments of the model.

    Raises:
        KeyError: No library defines ``name``; the message gives the closest registered name.
    """
    library, _, bare = name.rpartition(":")
    if library not in {"", "timm", "torchvision"}:
        raise KeyError(f"unknown model library prefix {library!r} in {name!r}; use timm: or torchvision:")

    if not library and bare in MODELS:
        return MODELS.get(bare)(num_classes, in_channels=in_channels, image_size=image_size, **kwargs)
    if library in {"", "timm"} and timm.is_model(bare):
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    if library in {"", "torchvision"} and bare in torchvision.models.list_models(torchvision.models):
        if in_channels != 3:
            raise ValueError(f"torchvision model {bare!r} takes 3 input channels, got {in_channels}")
        return torchvision.models.get_model(bare, weights=None, num_classes=num_classes, **kwargs)

    known = MODELS.names() + timm.list_models() + torchvision.models.list_models(torchvision.models)
    hint = closest_match(bare, known)
    did_you_mean = f" Did you mean {hint!r}?" if hint else ""
    raise KeyError(
        f"unknown model {name!r}: not in the kdexpand registry ({', '.join(MODELS.names())}), "
        f"timm or torchvision.{did_you_mean}"
    )
