"""Optimizer and per-epoch learning-rate schedules."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from kdexpand.recipe import TrainConfig

__all__ = ["build_optimizer", "build_scheduler"]


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.SGD:
    """Build the run's single SGD optimizer.

    Weight decay is plain L2 on every parameter, so each factor of an expanded layer is
    decayed on its own (not the product of the factors).
    """
    return torch.optim.SGD(
        list(parameters),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> LRScheduler:
    """Build the learning-rate schedule, stepped once at the end of every epoch.

    ``step``: lr is multiplied by ``gamma`` at each epoch in ``milestones``.
    ``cosine``: lr follows ``lr * (1 + cos(pi * t / T)) / 2`` over the ``T`` epochs after warm-up.
    ``constant``: lr stays fixed. With ``warmup_epochs`` W > 0, lr rises linearly from
    ``lr / W`` to ``lr`` over the first W epochs; milestones count from epoch 0.
    """
    warmup = config.warmup_epochs
    if config.schedule == "step":
        main: LRScheduler = MultiStepLR(
            optimizer, milestones=[m - warmup for m in config.milestones if m > warmup], gamma=config.gamma
        )
    elif config.schedule == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=config.epochs - warmup)
    else:
        main = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup == 0:
        return main
    # Epoch e < W gets lr * (e + 1) / W, so the last warm-up epoch already runs at lr.
    ramp = LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 1))
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])
