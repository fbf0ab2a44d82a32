"""Parameter and multiply-accumulate counts of compact and expanded models."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from kdexpand.expansion.surgery import expanded_units

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Return the number of parameters of ``model`` (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


@torch.no_grad()
def count_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Return the multiply-accumulates of one forward pass on ``example_input``.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts 2 FLOPs per MAC of
    convolutions and matrix products, and nothing for element-wise ops). Expanded units are
    counted in sequential mode, i.e. as the sub-layers of the ExpandNet, and restored to
    their mode afterwards. The model runs in eval mode and its train flag is restored.
    """
    units = expanded_units(model)
    modes = [unit.mode for _, unit in units]
    was_training = model.training
    try:
        for _, unit in units:
            unit.mode = "sequential"
        model.eval()
        counter = FlopCounterMode(display=False)
        with counter:
            model(example_input)
    finally:
        for (_, unit), mode in zip(units, modes):
            unit.mode = mode
        model.train(was_training)
    return counter.get_total_flops() // 2
