"""Image classification: cross-entropy loss, top-1 and top-5 accuracy in percent."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from kdexpand.data import BatchAugment, ClassificationData, TensorBatches, load_classification_data, normalize
from kdexpand.models import build_model
from kdexpand.tasks.base import Task

__all__ = ["ClassificationTask"]


class ClassificationTask(Task):
    """Classification of fixed-size images held in memory as uint8 tensors."""

    primary_metric = "top1"

    def load_data(self) -> None:
        self.data: ClassificationData = load_classification_data(self.recipe.data)
        augment = self.recipe.data.augment
        self._augment = BatchAugment(
            self.recipe.data.mean, self.recipe.data.std, augment.random_crop_padding, augment.horizontal_flip
        )

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    def build_model(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        channels, height, width = self.data.image_shape
        if height != width:
            raise ValueError(f"classification models take square images, got {height}x{width}")
        return build_model(name, self.num_classes, in_channels=channels, image_size=height, **kwargs)

    def train_batches(self, device: torch.device, rank: int, world_size: int) -> TensorBatches:
        train = self.data.train
        return TensorBatches(
            train.images, train.labels, self.recipe.train.batch_size, shuffle=True,
            seed=self.recipe.train.seed, rank=rank, world_size=world_size, device=device,
        )

    def eval_batches(self, split: str, device: torch.device, rank: int, world_size: int) -> TensorBatches:
        if split not in {"val", "test"}:
            raise ValueError(f"unknown evaluation split {split!r}; use 'val' or 'test'")
        data = self.data.val if split == "val" else self.data.test
        return TensorBatches(
            data.images, data.labels, self.recipe.data.eval_batch_size, shuffle=False,
            rank=rank, world_size=world_size, device=device,
        )

    def prepare_batch(
        self, batch: tuple[torch.Tensor, torch.Tensor], train: bool, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = batch
        self._augment = self._augment.to(images.device)
        if train:
            assert generator is not None, "training batches need a random generator"
            return self._augment(images, generator), labels
        return normalize(images, self._augment.mean, self._augment.std), labels

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs.float(), targets)

    def build_metrics(self) -> MetricCollection:
        top_k = min(5, self.num_classes)
        return MetricCollection(
            {
                "top1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                f"top{top_k}": MulticlassAccuracy(self.num_classes, top_k=top_k, average="micro"),
            }
        )

    def example_input(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((1, *self.data.image_shape), device=device)

    def summarize(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        """Return accuracies in percent."""
        return {name: 100.0 * float(value) for name, value in values.items()}
