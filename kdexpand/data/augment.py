"""Whole-batch image augmentation and normalization on the training device.

Working on a uint8 batch already on the device avoids per-image Python work and host to
device copies of float images, which keeps data loading a small part of a SmallNet step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["BatchAugment", "normalize"]


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Map uint8 images (B, C, H, W) to float32 ``(x / 255 - mean) / std`` per channel."""
    return (images.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


class BatchAugment:
    """Random crop with zero padding and random horizontal flip, then normalization.

    Matches torchvision's ``RandomCrop(size, padding=p)`` followed by
    ``RandomHorizontalFlip()`` and ``Normalize(mean, std)``, applied independently to every
    image of the batch. Each image is zero-padded by ``padding`` pixels on every side. A
    window of the original size starts at a uniform offset in ``[0, 2 * padding]`` on each
    axis and is mirrored left-right with probability 1/2.

    Args:
        mean: Per-channel mean of pixel values in [0, 1].
        std: Per-channel standard deviation of pixel values in [0, 1].
        padding: Crop padding in pixels; 0 disables cropping.
        flip: Whether to flip horizontally at random.
        device: Device of the batches and of the random generator.
    """

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int,
        flip: bool,
        device: torch.device | str = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)
        self.padding = padding
        self.flip = flip

    def to(self, device: torch.device | str) -> BatchAugment:
        """Return this augmentation on ``device`` (``self`` when it is there already)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return BatchAugment(self.mean.tolist(), self.std.tolist(), self.padding, self.flip, device)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw per-image crop offsets (B, 2) as (top, left) and flip flags (B,)."""
        offsets = torch.randint(0, 2 * self.padding + 1, (batch, 2), generator=generator, device=self.device)
        flips = torch.rand(batch, generator=generator, device=self.device) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        return offsets, flips

    def apply(self, images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Crop at ``offsets``, flip where ``flips`` is set, and normalize; uint8 in, float32 out."""
        batch, channels, height, width = images.shape
        if self.padding > 0:
            padded = F.pad(images, (self.padding,) * 4)

            # Index the padded batch with per-image row and column windows.
            rows = offsets[:, 0, None] + torch.arange(height, device=images.device)  # (B, H)
            cols = offsets[:, 1, None] + torch.arange(width, device=images.device)  # (B, W)
            batch_index = torch.arange(batch, device=images.device)[:, None, None, None]
            channel_index = torch.arange(channels, device=images.device)[None, :, None, None]
            images = padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]

        images = torch.where(flips[:, None, None, None], images.flip(3), images)
        return normalize(images, self.mean, self.std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment and normalize a uint8 batch (B, C, H, W) with fresh random draws."""
        offsets, flips = self.sample(images.shape[0], generator)
        return self.apply(images, offsets, flips)
