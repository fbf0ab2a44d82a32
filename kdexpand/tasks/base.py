"""The task interface: what the trainer needs to know about a kind of problem.

The trainer handles optimization, distribution, checkpoints and contraction for any task.
A task supplies the data, the compact model, the task loss, the metrics and the preprocessing
of a batch. Classification is the first task; detection and segmentation plug in here with
their own data, losses (e.g. YOLO loss) and metrics (VOC mAP, mIoU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torchmetrics import MetricCollection

from kdexpand.recipe import Recipe

__all__ = ["Task"]


class Task(ABC):
    """One kind of problem (classification, detection, segmentation).

    A task object is built from the recipe once per process. Its batches are
    ``(inputs, targets)`` pairs whose inputs feed the model directly.

    Attributes:
        primary_metric: Name of the metric, higher is better, that selects the best checkpoint
            on the validation split.
    """

    primary_metric: str

    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe

    @abstractmethod
    def load_data(self) -> None:
        """Load the train, validation and test splits onto the CPU."""

    @abstractmethod
    def build_model(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        """Build a compact model for this task's data with random weights."""

    @abstractmethod
    def train_batches(self, device: torch.device, rank: int, world_size: int) -> Any:
        """Return an iterable of raw training batches with ``set_epoch(epoch)`` and ``len()``."""

    @abstractmethod
    def eval_batches(self, split: str, device: torch.device, rank: int, world_size: int) -> Iterable[Any]:
        """Return raw batches of ``split`` ("val" or "test"), each image on one process only."""

    @abstractmethod
    def prepare_batch(
        self, batch: Any, train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, Any]:
        """Turn a raw batch into model inputs and targets; augment when ``train`` is set."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, targets: Any) -> torch.Tensor:
        """Return the task loss (e.g. cross-entropy), computed in float32 or wider."""

    @abstractmethod
    def build_metrics(self) -> MetricCollection:
        """Return fresh torchmetrics metrics; they sum over processes when computed."""

    @abstractmethod
    def example_input(self, device: torch.device) -> torch.Tensor:
        """Return a single-sample input batch for MAC counting and ONNX export."""

    def batch_size(self, batch: Any) -> int:
        """Return the number of samples in a raw batch."""
        return len(batch[1])

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Turn computed metric values into plain floats for logs and metrics.json."""
        return {name: float(value) for name, value in values.items()}
