"""Batches over tensors already in memory, sharded across processes."""

from __future__ import annotations

from collections.abc import Iterator

import torch

__all__ = ["TensorBatches"]


class TensorBatches:
    """Iterate over ``(images, labels)`` batches of in-memory tensors for one process.

    Training order is a permutation drawn from ``seed + epoch`` on the CPU, identical on
    every process; process ``rank`` takes every ``world_size``-th index of it. With
    ``shuffle`` the permutation is cut to a multiple of ``world_size`` so every process runs
    the same number of steps (at most ``world_size - 1`` images are skipped per epoch, a
    different set each epoch). Without ``shuffle`` the order is the dataset order and
    nothing is skipped, so an evaluation over all processes counts every image exactly once.

    Args:
        images: (N, C, H, W) uint8 tensor.
        labels: (N,) int64 tensor.
        batch_size: Images per batch and process; the last batch may be smaller.
        shuffle: Draw a new order every epoch (training) or keep dataset order (evaluation).
        seed: Base seed of the training order.
        rank: Index of this process.
        world_size: Number of processes.
        device: Device that batches are moved to.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        assert images.shape[0] == labels.shape[0], "images and labels differ in length"
        assert 0 <= rank < world_size
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the training order of ``epoch``."""
        self.epoch = epoch

    def indices(self) -> torch.Tensor:
        """Return this process's indices for the current epoch."""
        count = self.images.shape[0]
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(count, generator=generator)
            order = order[: count - count % self.world_size]
        else:
            order = torch.arange(count)
        return order[self.rank :: self.world_size]

    def __len__(self) -> int:
        count = len(self.indices())
        return (count + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        indices = self.indices().to(self.images.device)
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            yield self.images[batch], self.labels[batch]
