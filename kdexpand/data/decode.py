"""Decode image datasets once into uint8 tensors, cached on disk as safetensors."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import torch

from kdexpand.io import load_safetensors, save_safetensors

__all__ = ["cache_dir", "decode_images"]

logger = logging.getLogger(__name__)

_DECODE_CHUNK = 2000


def cache_dir() -> Path:
    """Return the decoded-tensor cache folder: ``$KDEXPAND_CACHE``, else ``~/.cache/kdexpand``."""
    env = os.environ.get("KDEXPAND_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "kdexpand"


def _cache_key(split: datasets.Dataset, image_column: str, label_column: str, rows: int) -> str:
    # The arrow files behind a split change whenever its source changes, so their paths,
    # sizes and modification times identify the content without reading it.
    files = []
    for entry in split.cache_files:
        stat = os.stat(entry["filename"])
        files.append([entry["filename"], stat.st_size, stat.st_mtime_ns])
    description = json.dumps([files, image_column, label_column, rows])
    return hashlib.sha256(description.encode()).hexdigest()[:20]


def decode_images(
    split: datasets.Dataset, image_column: str, label_column: str, rows: int, use_cache: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode the first ``rows`` examples into ``images`` (N, C, H, W) uint8 and ``labels`` (N,) int64.

    Args:
        split: A ``datasets`` split whose image column decodes to PIL images.
        image_column: Column with the images; all must have the same size.
        label_column: Column with integer class labels.
        rows: Number of leading examples to decode.
        use_cache: Read and write the decoded tensors under :func:`cache_dir`.

    Raises:
        ValueError: ``rows`` exceeds the split, or images differ in size.
    """
    if rows > len(split):
        raise ValueError(f"requested {rows} examples but the split has {len(split)}")
    cache_file = cache_dir() / f"{_cache_key(split, image_column, label_column, rows)}.safetensors"
    if use_cache and cache_file.is_file():
        tensors = load_safetensors(cache_file)
        logger.info("loaded %d decoded images from cache %s", rows, cache_file)
        return tensors["images"], tensors["labels"]

    subset = split.select(range(rows))
    labels = np.asarray(subset[label_column], dtype=np.int64)
    flat: list[np.ndarray] = []
    for batch in subset.select_columns([image_column]).iter(batch_size=_DECODE_CHUNK):
        flat.extend(np.asarray(image.convert("RGB")) for image in batch[image_column])
    shapes = {array.shape for array in flat}
    if len(shapes) > 1:
        raise ValueError(
            f"images in column {image_column!r} differ in size ({sorted(shapes)[:4]}); "
            "resize them to one size before decoding into a tensor"
        )
    # (N, H, W, C) -> (N, C, H, W), contiguous so batches slice cheaply.
    images = np.stack(flat).transpose(0, 3, 1, 2).copy()
    image_tensor, label_tensor = torch.from_numpy(images), torch.from_numpy(labels)

    if use_cache:
        save_safetensors({"images": image_tensor, "labels": label_tensor}, cache_file)
        logger.info("decoded %d images, cached in %s", rows, cache_file)
    return image_tensor, label_tensor
