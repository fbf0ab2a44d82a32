"""Share of a training step spent on data: decoding, caching and on-device batch augmentation.

Usage:
    KDEXPAND_DATA=../shared/data python benchmarks/data_loading.py [--batch-size 128] [--steps 60]

Measures, on the real CIFAR-10 train split:
1. decoding all 50,000 JPEGs into a uint8 tensor (cache disabled), and loading the cached tensor;
2. per batch: gathering the batch from the in-memory tensor plus crop, flip and normalization,
   against one SGD step of the SmallNet 7x7 ExpandNet-CK (r=4, collapsed), interleaved and
   reported as medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

import kdexpand
from kdexpand.data import BatchAugment, TensorBatches, decode_images, load_splits
from kdexpand.models import SmallNet
from kdexpand.recipe import DataConfig

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def time_decoding() -> tuple[torch.Tensor, torch.Tensor]:
    config = DataConfig(name="cifar10", mean=CIFAR_MEAN, std=CIFAR_STD)
    _, dataset = load_splits(config, ["train"])
    split = dataset["train"]
    with tempfile.TemporaryDirectory() as cache:
        os.environ["KDEXPAND_CACHE"] = cache
        start = time.perf_counter()
        images, labels = decode_images(split, "img", "label", len(split), use_cache=True)
        decoded = time.perf_counter() - start
        start = time.perf_counter()
        cached_images, _ = decode_images(split, "img", "label", len(split), use_cache=True)
        # safetensors maps the file lazily; summing reads every byte, as training would.
        cached_images.sum(dtype=torch.int64)
        cached = time.perf_counter() - start
    print(f"decode {len(split)} images: {decoded:.1f} s; load from cache: {cached:.2f} s")
    return images, labels


def time_steps(images: torch.Tensor, labels: torch.Tensor, batch_size: int, steps: int) -> None:
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", rate=4.0, mode="collapsed")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    augment = BatchAugment(CIFAR_MEAN, CIFAR_STD, padding=4, flip=True)
    generator = torch.Generator().manual_seed(0)
    batches = iter(TensorBatches(images, labels, batch_size, shuffle=True))

    data_times, step_times = [], []
    for step in range(steps + 5):
        start = time.perf_counter()
        batch_images, batch_labels = next(batches)
        inputs = augment(batch_images, generator)
        data_time = time.perf_counter() - start

        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), batch_labels).backward()
        optimizer.step()
        step_time = time.perf_counter() - start
        if step >= 5:  # the first steps warm up allocators and kernels
            data_times.append(data_time)
            step_times.append(step_time)

    data, compute = statistics.median(data_times), statistics.median(step_times)
    print(
        f"batch {batch_size}: data {1e3 * data:.2f} ms, SGD step {1e3 * compute:.1f} ms, "
        f"data share {100 * data / (data + compute):.1f}% ({torch.get_num_threads()} threads)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("--steps", type=int, default=60, help="timed steps after 5 warm-up steps")
    args = parser.parse_args()
    images, labels = time_decoding()
    time_steps(images, labels, args.batch_size, args.steps)


if __name__ == "__main__":
    main()
