"""SmallNet: the compact CIFAR network of the ExpandNets paper (Guo et al., NeurIPS 2020).

Three convolutions with 8, 16 and 32 output channels, each followed by batch
normalization, ReLU and 2x2 max pooling, then a 64-unit fully connected layer and the
logit layer. The 7x7 variant pads by 3 (66.19K parameters on CIFAR-10); the 3x3 variant
does not pad.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SmallNet"]


class SmallNet(nn.Module):
    """The paper's SmallNet.

    Args:
        num_classes: Size of the logit layer.
        kernel_size: Odd kernel size of the three convolutions (3, 5, 7 or 9 in the paper).
        padding: Padding of each convolution; None means ``kernel_size // 2`` for kernels
            larger than 3 and no padding for 3x3, as in the paper.
        in_channels: Channels of the input image.
        image_size: Height and width of the input, used to size the first linear layer.
        hidden: Width of the fully connected layer before the logits.
    """

    def __init__(
        self,
        num_classes: int = 10,
        kernel_size: int = 7,
        padding: int | None = None,
        in_channels: int = 3,
        image_size: int = 32,
        hidden: int = 64,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = kernel_size // 2 if kernel_size > 3 else 0
        widths = (8, 16, 32)

        layers: list[nn.Module] = []
        channels, size = in_channels, image_size
        for width in widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size, padding=padding),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels = width
            size = (size + 2 * padding - kernel_size + 1) // 2
        if size < 1:
            raise ValueError(
                f"SmallNet with kernel_size={kernel_size} and padding={padding} reduces a "
                f"{image_size}x{image_size} input to nothing; use a larger image_size or padding"
            )
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels * size * size, hidden)
        self.relu = nn.ReLU()
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(self.relu(self.fc(x)))
