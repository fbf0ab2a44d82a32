"""Training-step time and memory of compact vs expanded (sequential, collapsed) models.

Usage:
    python benchmarks/expansion_cost.py [--batch-size 128] [--repeats 7] [--threads N]

For each model the three variants are timed interleaved (round-robin, median of
``--repeats`` steps after warm-up), so a slow phase of a shared machine hits all of them.
Memory is the training state a step needs: the bytes of the tensors autograd saves for
backward ("activations": unique storages, parameters excluded) plus parameters, gradients
and SGD momentum.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import timm
import torch
from torch import nn

import kdexpand
from kdexpand.models import SmallNet

CASES = {
    "SmallNet 7x7, CK r=4": (lambda: SmallNet(kernel_size=7), dict(conv="ck", rate=4.0)),
    "SmallNet 7x7, CL r=4": (lambda: SmallNet(kernel_size=7), dict(conv="cl", rate=4.0)),
    "MobileNetV2 32x32, CL r=4": (
        lambda: timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10),
        dict(conv="cl", rate=4.0),
    ),
}


def _variants(factory, options):
    compact = factory()
    sequential = kdexpand.expand(compact, mode="sequential", **options)
    collapsed = kdexpand.expand(compact, mode="collapsed", **options)
    return {"compact": compact, "sequential": sequential, "collapsed": collapsed}


def _step(model, optimizer, images, labels):
    optimizer.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()


def _saved_bytes(model, images, labels):
    """Return the bytes of the unique non-parameter tensors saved for backward in one step."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def _composition_seconds(model, repeats):
    """Return the median time to compose every unit's kernel and back-propagate into its factors.

    This is the fixed cost per step that collapsed mode adds, whatever the batch size.
    """
    units = [unit for _, unit in kdexpand.expanded_units(model)]
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        total = sum(weight.sum() + (0 if bias is None else bias.sum())
                    for weight, bias in (unit.equivalent_weight_bias() for unit in units))
        total.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _state_bytes(model):
    # Parameters, their gradients and SGD momentum buffers.
    return 3 * sum(p.numel() * p.element_size() for p in model.parameters())


def measure(name, factory, options, batch_size, repeats):
    torch.manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32)
    labels = torch.randint(0, 10, (batch_size,))
    models = _variants(factory, options)
    optimizers = {
        key: torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        for key, model in models.items()
    }
    for key, model in models.items():
        model.train()
        _step(model, optimizers[key], images, labels)  # warm-up

    times = {key: [] for key in models}
    for _ in range(repeats):
        for key, model in models.items():
            start = time.perf_counter()
            _step(model, optimizers[key], images, labels)
            times[key].append(time.perf_counter() - start)

    saved = {key: _saved_bytes(copy.deepcopy(model), images, labels) for key, model in models.items()}
    memory = {key: saved[key] + _state_bytes(model) for key, model in models.items()}
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{name}, batch {batch_size}")
    print(
        f"  {'variant':<11} {'step (ms)':>10} {'x compact':>10} {'memory (MiB)':>13} {'x compact':>10}"
        f" {'activations (MiB)':>18} {'x compact':>10}"
    )
    for key in models:
        print(
            f"  {key:<11} {median[key] * 1000:>10.1f} {median[key] / median['compact']:>10.2f} "
            f"{memory[key] / 2**20:>13.1f} {memory[key] / memory['compact']:>10.2f}"
            f" {saved[key] / 2**20:>18.1f} {saved[key] / saved['compact']:>10.2f}"
        )
    composing = _composition_seconds(models["collapsed"], repeats)
    print(f"  composing all kernels, forward and backward: {composing * 1000:.1f} ms per step")
    return median, memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="images per training step")
    parser.add_argument("--repeats", type=int, default=7, help="timed steps per variant (median is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    for name, (factory, options) in CASES.items():
        measure(name, factory, options, args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
