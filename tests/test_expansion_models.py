"""Whole-model round trips: expand -> contract gives back exactly the compact network."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn

import kdexpand
from kdexpand.analysis import count_macs, count_params
from kdexpand.models import SmallNet


def _randomize_batch_norm(model: nn.Module) -> None:
    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.rand(shape, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
            if module.affine:
                module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
                module.bias.data.copy_(torch.rand(shape, generator=generator) - 0.5)


MODELS = {
    "smallnet7": (lambda: SmallNet(kernel_size=7), 32),
    "smallnet3": (lambda: SmallNet(kernel_size=3), 32),
    "mobilenetv2_100": (lambda: timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10), 32),
    "resnet18": (lambda: timm.create_model("resnet18", pretrained=False, num_classes=10), 32),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(num_classes=10), 32),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(num_classes=10), 32),
}
EXPANSIONS = {
    "cl": dict(conv="cl"),
    "ck_fc": dict(conv="ck", fc=True, fallback="cl"),
    "cl_fc_r0.5": dict(conv="cl", fc=True, rate=0.5),
}


def _build(name):
    factory, size = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    with torch.no_grad():
        _randomize_batch_norm(model)
    return model.eval(), size


@pytest.mark.parametrize("expansion", list(EXPANSIONS))
@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_exact(name, expansion):
    compact, size = _build(name)
    expanded = kdexpand.expand(compact, **EXPANSIONS[expansion]).eval()
    x = torch.randn(2, 3, size, size, dtype=torch.float64)

    contracted = kdexpand.contract(expanded)
    fresh = MODELS[name][0]().double().eval()
    fresh.load_state_dict(contracted.state_dict(), strict=True)

    with torch.no_grad():
        expected = expanded(x)
        kdexpand.set_mode(expanded, "sequential")
        sequential = expanded(x)
        actual = fresh(x)
    scale = expected.abs().max()
    assert len(expanded.expansion_report.expanded) > 0
    assert not kdexpand.is_expanded(contracted)
    assert ((sequential - expected).abs().max() / scale).item() <= 1e-10
    assert ((actual - expected).abs().max() / scale).item() <= 1e-10
    assert [(k, v.shape) for k, v in contracted.state_dict().items()] == [
        (k, v.shape) for k, v in compact.state_dict().items()
    ]


@pytest.mark.parametrize("name", list(MODELS))
def test_counts_of_contracted_equal_compact(name):
    compact, size = _build(name)
    expanded = kdexpand.expand(compact, conv="ck", fc=True, fallback="cl")
    contracted = kdexpand.contract(expanded)
    x = torch.randn(1, 3, size, size, dtype=torch.float64)

    assert count_params(contracted) == count_params(compact)
    assert count_macs(contracted, x) == count_macs(compact, x)
    assert count_params(expanded) > count_params(compact)
    assert count_macs(expanded, x) > count_macs(compact, x)


def test_smallnet7_counts_match_paper():
    # Guo et al. (ExpandNets, NeurIPS 2020) report 66.19K parameters for the 7x7 SmallNet on CIFAR-10.
    model = SmallNet(kernel_size=7)
    assert round(count_params(model) / 1000, 2) == 66.19


def test_smallnet7_macs_by_hand():
    # conv k*k*Cin*Cout*H*W per layer on 32, 16, 8 pixel maps, then the two linear layers.
    model = SmallNet(kernel_size=7)
    expected = 49 * 3 * 8 * 32 * 32 + 49 * 8 * 16 * 16 * 16 + 49 * 16 * 32 * 8 * 8 + 512 * 64 + 64 * 10
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_dtype(dtype):
    torch.manual_seed(0)
    compact = SmallNet(kernel_size=7).eval()
    expanded = kdexpand.expand(compact, conv="ck", fc=True).to(dtype)
    contracted = kdexpand.contract(expanded)
    x = torch.randn(2, 3, 32, 32)

    assert all(p.dtype == dtype for p in contracted.parameters())
    with torch.no_grad():
        reference = kdexpand.contract(copy.deepcopy(expanded).float())(x)
        actual = contracted(x.to(dtype)).float()
        collapsed = expanded(x.to(dtype)).float()
    scale = reference.abs().max()
    # Half-precision weights round to ~3 significant digits (bf16) per layer.
    assert ((actual - reference).abs().max() / scale).item() < 0.1
    assert ((collapsed - reference).abs().max() / scale).item() < 0.1


def test_contract_after_dtype_change():
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=7).eval(), conv="cl").double()
    contracted = kdexpand.contract(expanded)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    assert all(p.dtype == torch.float64 for p in contracted.parameters())
    assert torch.allclose(contracted(x), expanded(x), rtol=0, atol=1e-12)


def test_contract_ignores_batch_norm_mode():
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True).double()
    expanded.train()
    in_train = kdexpand.contract(expanded).state_dict()
    expanded.eval()
    in_eval = kdexpand.contract(expanded).state_dict()

    for key in in_train:
        assert torch.equal(in_train[key], in_eval[key]), key
