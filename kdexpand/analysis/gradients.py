"""Gradient confusion: how much the gradients of different mini-batches agree.

Gradient confusion, a measure introduced by Sankararaman et al., looks at the cosine
similarity of the loss gradients of pairs of mini-batches. A negative minimum means some
mini-batches pull the parameters in opposite directions. Guo et al. (ExpandNets, NeurIPS
2020, section 5.1) report the minimum over 100 random pairs at the end of every epoch, and
a kernel density estimate of all pairs at the end of training, to show that ExpandNets
train with less confusion.

Here ``n`` mini-batches give ``n (n - 1) / 2`` pairs from ``n`` backward passes, where the
paper's independent pairs need ``2 * pairs``. The price is memory: the ``n`` flattened
gradients are kept, ``n × parameters × 4`` bytes on the model's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["GradientConfusion", "batch_gradient", "gradient_confusion", "pairwise_cosine_similarities"]


def batch_gradient(
    model: nn.Module, loss_fn: Callable[[torch.Tensor, object], torch.Tensor], inputs: torch.Tensor, targets: object
) -> torch.Tensor:
    """Return the gradient of ``loss_fn(model(inputs), targets)`` over every trainable parameter, flattened.

    Parameters that the loss does not reach contribute zeros, so every call returns a
    vector of the same length. The model's ``.grad`` fields are left as they were.
    """
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    loss = loss_fn(model(inputs), targets)
    gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
    flat = [
        torch.zeros(parameter.numel(), device=parameter.device, dtype=torch.float32) if gradient is None
        else gradient.detach().reshape(-1).float()
        for parameter, gradient in zip(parameters, gradients)
    ]
    return torch.cat(flat)


def pairwise_cosine_similarities(gradients: torch.Tensor) -> torch.Tensor:
    """Return the cosine similarity of every pair of rows of ``gradients``, as a flat vector.

    A zero gradient has no direction; its pairs are NaN and left out of the summaries.
    """
    gradients = gradients.double()
    norms = gradients.norm(dim=1)
    gram = gradients @ gradients.T
    cosine = gram / (norms[:, None] * norms[None, :])
    rows, columns = torch.triu_indices(len(gradients), len(gradients), offset=1)
    return cosine[rows, columns]


@dataclass(frozen=True)
class GradientConfusion:
    """Summary of the pairwise gradient cosine similarities of one measurement."""

    similarities: torch.Tensor
    batches: int

    @property
    def minimum(self) -> float:
        valid = self.similarities[~self.similarities.isnan()]
        return float(valid.min()) if len(valid) else math.nan

    @property
    def mean(self) -> float:
        valid = self.similarities[~self.similarities.isnan()]
        return float(valid.mean()) if len(valid) else math.nan

    @property
    def pairs(self) -> int:
        return len(self.similarities)


def gradient_confusion(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, object], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, object]],
) -> GradientConfusion:
    """Measure the pairwise cosine similarities of the gradients of ``batches``.

    The model runs in training mode, as during training, but is left unchanged. Batch-norm
    running statistics and the mode are restored afterwards, and ``.grad`` fields are not
    touched. The global random state (used by dropout) is forked, so a training run that
    measures confusion follows the same trajectory as one that does not.

    Args:
        model: The network, for example an ExpandNet in collapsed or sequential mode; both
            give the same gradients with respect to its factors.
        loss_fn: The task loss, ``loss_fn(outputs, targets)``.
        batches: Prepared ``(inputs, targets)`` mini-batches, at least two.

    Raises:
        ValueError: Fewer than two batches are given.
    """
    was_training = model.training
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            gradients = [batch_gradient(model, loss_fn, inputs, targets) for inputs, targets in batches]
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
    if len(gradients) < 2:
        raise ValueError(f"gradient confusion needs at least 2 mini-batches, got {len(gradients)}")
    return GradientConfusion(pairwise_cosine_similarities(torch.stack(gradients)), len(gradients))
