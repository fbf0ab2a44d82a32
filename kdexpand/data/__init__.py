"""Datasets: location, decoding into uint8 tensors, splits, batching and augmentation."""

from kdexpand.data.augment import BatchAugment, normalize
from kdexpand.data.classification import (
    ClassificationData,
    Split,
    load_classification_data,
    split_sizes,
)
from kdexpand.data.decode import cache_dir, decode_images
from kdexpand.data.loader import TensorBatches
from kdexpand.data.locate import DataSource, load_splits, resolve_source

__all__ = [
    "BatchAugment",
    "ClassificationData",
    "DataSource",
    "Split",
    "TensorBatches",
    "cache_dir",
    "decode_images",
    "load_classification_data",
    "load_splits",
    "normalize",
    "resolve_source",
    "split_sizes",
]
