"""Collapsed mode is the same function of the factors as sequential mode, gradients included.

Bounds: float64 relative error <= 1e-10; float32 max-abs error <= 1e-5 times the magnitude
of the compared tensor.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import kdexpand
from kdexpand.models import SmallNet


def _gradients(model, x, mode):
    model = copy.deepcopy(model)
    kdexpand.set_mode(model, mode)
    output = model(x)
    # A non-trivial scalar so every output element gets a different weight.
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).reshape(output.shape)
    (output * weights).sum().backward()
    return output.detach(), {name: p.grad.detach() for name, p in model.named_parameters()}


def _relative(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


EXPANSIONS = [
    dict(conv="ck", fc=True),
    dict(conv="cl", fc=True),
    dict(conv="acnet"),
    dict(conv="cl", rate=0.25),
]


@pytest.mark.parametrize("options", EXPANSIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gradients_match_sequential_in_eval(options, dtype, bound):
    # Eval mode: batch norm uses running statistics, so every gradient is meaningful. In
    # float64 each is compared relative to its own magnitude. In float32 each is compared
    # relative to the largest gradient, because tiny gradients carry the rounding of large ones.
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), **options).to(dtype).eval()
    x = torch.randn(8, 3, 32, 32, dtype=dtype)

    seq_out, seq_grads = _gradients(model, x, "sequential")
    col_out, col_grads = _gradients(model, x, "collapsed")

    global_scale = max(grad.abs().max() for grad in seq_grads.values())

    assert _relative(col_out, seq_out) <= bound
    assert set(col_grads) == set(seq_grads)
    for name, expected in seq_grads.items():
        scale = expected.abs().max() if dtype == torch.float64 else global_scale
        assert ((col_grads[name] - expected).abs().max() / scale).item() <= bound, name


@pytest.mark.parametrize("options", EXPANSIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype, bound", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_gradients_match_sequential_in_train(options, dtype, bound):
    # Train mode: batch norm subtracts the batch mean, so the true gradient of a conv bias in
    # front of it is zero and only rounding noise is left. Gradients are compared relative to
    # the largest gradient of the model.
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), **options).to(dtype).train()
    x = torch.randn(8, 3, 32, 32, dtype=dtype)

    _, seq_grads = _gradients(model, x, "sequential")
    _, col_grads = _gradients(model, x, "collapsed")
    scale = max(grad.abs().max() for grad in seq_grads.values())

    for name in seq_grads:
        assert ((col_grads[name] - seq_grads[name]).abs().max() / scale).item() <= bound, name


def test_gradients_match_on_depthwise_model():
    torch.manual_seed(0)
    compact = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10)
    model = kdexpand.expand(compact, conv="cl", rate=2.0).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    _, seq_grads = _gradients(model, x, "sequential")
    _, col_grads = _gradients(model, x, "collapsed")

    for name in seq_grads:
        assert _relative(col_grads[name], seq_grads[name]) <= 1e-10, name


def _train(model, mode, steps=3):
    model = copy.deepcopy(model)
    kdexpand.set_mode(model, mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 3, 32, 32, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 10, (16,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return dict(model.named_parameters())


def test_sgd_steps_leave_same_parameters():
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True).double().train()

    sequential = _train(model, "sequential")
    collapsed = _train(model, "collapsed")

    for name, parameter in sequential.items():
        assert _relative(collapsed[name].detach(), parameter.detach()) <= 1e-10, name


def test_collapsed_composes_in_float32_under_autocast():
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True)
    unit = model.features[0]
    x = torch.randn(4, 3, 32, 32)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        weight, _ = unit.equivalent_weight_bias()
        output = model(x)
        loss = output.float().logsumexp(dim=1).mean()
    loss.backward()

    assert weight.dtype == torch.float32
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_eval_outputs_match_between_modes_with_batch_norm():
    torch.manual_seed(0)
    model = kdexpand.expand(SmallNet(kernel_size=7), conv="cl", fc=True).double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)

    with torch.no_grad():
        collapsed = model(x)
        kdexpand.set_mode(model, "sequential")
        sequential = model(x)

    assert _relative(collapsed, sequential) <= 1e-10
