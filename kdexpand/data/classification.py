"""Image classification splits (train, validation held out of train, test) as uint8 tensors."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import torch

from kdexpand.data.decode import decode_images
from kdexpand.data.locate import load_splits
from kdexpand.recipe import DataConfig

__all__ = ["ClassificationData", "Split", "load_classification_data", "split_sizes"]

logger = logging.getLogger(__name__)


@dataclass
class Split:
    """One split: ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64, on the CPU."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class ClassificationData:
    """The three splits of an image classification dataset and its class names."""

    train: Split
    val: Split
    test: Split
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.train.images.shape[1:])


def split_sizes(total: int, val_size: int, train_limit: int | None) -> tuple[int, int]:
    """Return (train, validation) sizes carved from the first images of the train split.

    Without a limit, the last ``val_size`` of ``total`` images are the validation split.
    With ``train_limit`` N, only the first N images are used and the validation split shrinks
    in proportion: ``round(val_size * N / total)``, at least 1 when ``val_size > 0``.

    Raises:
        ValueError: The split is too small to leave any training images.
    """
    pool = total if train_limit is None else min(train_limit, total)
    val = val_size if train_limit is None else round(val_size * pool / total)
    if val_size > 0:
        val = max(val, 1)
    if val >= pool:
        raise ValueError(
            f"data.val_size={val_size} leaves no training images out of {pool}; lower "
            "data.val_size or raise data.train_limit"
        )
    return pool - val, val


def _class_names(split: datasets.Dataset, column: str) -> list[str]:
    feature = split.features[column]
    if not isinstance(feature, datasets.ClassLabel):
        raise TypeError(
            f"label column {column!r} is {feature}, not a ClassLabel with class names; "
            "point data.label_column at the class label column"
        )
    return list(feature.names)


def load_classification_data(config: DataConfig) -> ClassificationData:
    """Load, decode and split an image classification dataset as the recipe describes.

    The validation split is the tail of the used part of the train split (see
    :func:`split_sizes`), so no validation image is ever trained on. ``eval_limit`` keeps the
    first N images of the validation and test splits.
    """
    source, dataset = load_splits(config, [config.train_split, config.test_split])
    train_split, test_split = dataset[config.train_split], dataset[config.test_split]
    class_names = _class_names(train_split, config.label_column)

    train_count, val_count = split_sizes(len(train_split), config.val_size, config.train_limit)
    images, labels = decode_images(
        train_split, config.image_column, config.label_column, train_count + val_count, config.cache
    )
    train = Split(images[:train_count], labels[:train_count])
    val = Split(images[train_count:], labels[train_count:])

    test_count = len(test_split)
    if config.eval_limit is not None:
        test_count = min(config.eval_limit, test_count)
        val = Split(val.images[: config.eval_limit], val.labels[: config.eval_limit])
    test = Split(*decode_images(test_split, config.image_column, config.label_column, test_count, config.cache))

    for name, split in (("train", train), ("test", test)):
        if int(split.labels.max()) >= len(class_names) or int(split.labels.min()) < 0:
            raise ValueError(f"{name} labels fall outside 0..{len(class_names) - 1}")
    logger.info(
        "data %s: %d train, %d validation, %d test images, %d classes, shape %s",
        config.name, len(train), len(val), len(test), len(class_names), tuple(images.shape[1:]),
    )
    return ClassificationData(train, val, test, class_names, source.description)
