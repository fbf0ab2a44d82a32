"""Evaluation over all processes, each image counted once."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from accelerate import Accelerator
from torch import nn

from kdexpand.tasks import Task

__all__ = ["evaluate"]


@torch.no_grad()
def evaluate(
    model: nn.Module, task: Task, split: str, accelerator: Accelerator, autocast: bool = True
) -> dict[str, float]:
    """Return the task's metrics of ``model`` on ``split`` ("val" or "test").

    With ``autocast`` the forward passes use the run's mixed precision, as in training;
    without it they run in the model's own dtype.

    Every process evaluates its own shard of the split (see :class:`kdexpand.data.TensorBatches`)
    with an unwrapped model, so no collective runs during the forward passes. torchmetrics sums
    the metric states over processes when computing, so the result covers each image once and
    is the same on every process.
    """
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    metrics = task.build_metrics().to(accelerator.device)
    for batch in task.eval_batches(split, accelerator.device, accelerator.process_index, accelerator.num_processes):
        inputs, targets = task.prepare_batch(batch, train=False)
        with accelerator.autocast() if autocast else nullcontext():
            outputs = model(inputs)
        metrics.update(outputs.float(), targets)
    values = task.summarize(metrics.compute())
    model.train(was_training)
    return values
