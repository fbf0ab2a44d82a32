"""The expand / contract API on awkward models: unsupported layers, batch-norm mode, and
models moved to another dtype or device after expansion.

Exactness is checked in float64 against the sequential ExpandNet (each sub-layer applied
in turn), an independent path from the composed kernels that contraction uses.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import kdexpand
from kdexpand.models import SmallNet


class ScaledConv(nn.Conv2d):
    """A Conv2d subclass with its own forward, which no expanded unit reproduces."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def awkward_model() -> nn.Module:
    symmetric = nn.Conv2d(4, 4, 3, padding=1)
    symmetric.padding_mode = "symmetric"  # torch's constructor rejects this value
    strided_same = nn.Conv2d(4, 4, 3, padding="same")
    strided_same.stride = (2, 2)  # torch rejects padding='same' with a stride
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(ScaledConv(4, 4, 3, padding=1), nn.ConvTranspose2d(4, 4, 3, padding=1)),
        nn.LazyConv2d(4, 3),
        symmetric,
        strided_same,
        nn.Conv1d(4, 4, 3),
    )


def decisions(model: nn.Module) -> dict[str, str]:
    return {decision.name: decision.detail for decision in model.expansion_report.decisions}


def test_unsupported_layers_reported_and_kept(caplog):
    model = awkward_model()
    with caplog.at_level(logging.WARNING, logger="kdexpand.expansion.surgery"):
        expanded = kdexpand.expand(model, conv="cl")
    details = decisions(expanded)

    assert details["0"].startswith("CL")
    assert details["1.0"].startswith("unsupported: test_reliability_api.ScaledConv subclasses nn.Conv2d")
    assert details["1.1"].startswith("unsupported: ConvTranspose2d")
    assert details["2"].startswith("unsupported: uninitialized lazy module")
    assert details["3"] == "unsupported: padding_mode 'symmetric' is not one torch accepts (zeros, reflect, replicate, circular)"
    assert details["4"].startswith("unsupported: padding='same' with stride (2, 2)")
    assert details["5"].startswith("unsupported: Conv1d")
    warned = {record.getMessage().split(" ")[1] for record in caplog.records}
    assert warned == {"1.0", "1.1", "2", "3", "4", "5"}

    # Left alone means the very same layer types, unchanged.
    for name in ("1.0", "1.1", "2", "3", "4", "5"):
        assert type(expanded.get_submodule(name)) is type(model.get_submodule(name))
    assert expanded.get_submodule("3").padding_mode == "symmetric"


def test_unsupported_only_model_contracts_to_itself():
    model = nn.Sequential(ScaledConv(3, 4, 3), nn.Conv1d(4, 4, 1))
    expanded = kdexpand.expand(model, conv="cl")
    assert not kdexpand.is_expanded(expanded)
    assert kdexpand.contract(expanded).state_dict().keys() == model.state_dict().keys()


def _random_batch_norm(model: nn.Module) -> None:
    """Give every BN layer non-trivial statistics, so using them would change the result."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.num_batches_tracked.fill_(7)


@torch.no_grad()
def test_contract_in_train_mode_equals_eval_mode():
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=7), conv="ck", fc=True).double()
    _random_batch_norm(expanded)
    buffers = {name: tensor.clone() for name, tensor in expanded.named_buffers()}

    expanded.train()
    from_train = kdexpand.contract(expanded)
    expanded.eval()
    from_eval = kdexpand.contract(expanded)

    # Contraction read no batch statistics and updated none.
    for name, tensor in expanded.named_buffers():
        assert torch.equal(tensor, buffers[name]), name
    assert from_train.training and not from_eval.training
    for key, tensor in from_eval.state_dict().items():
        assert torch.equal(from_train.state_dict()[key], tensor), key

    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = kdexpand.set_mode(copy.deepcopy(expanded).eval(), "sequential")(x)
    assert torch.allclose(from_train.eval()(x), reference, rtol=0, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_contract_after_dtype_change(dtype):
    torch.manual_seed(0)
    # Expanded in one dtype, moved to the other, then contracted.
    start = torch.float32 if dtype == torch.float64 else torch.float64
    expanded = kdexpand.expand(SmallNet(kernel_size=7).to(start).eval(), conv="ck", fc=True).to(dtype)
    contracted = kdexpand.contract(expanded)

    assert all(p.dtype == dtype for p in contracted.state_dict().values() if p.is_floating_point())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = kdexpand.set_mode(copy.deepcopy(expanded).double(), "sequential")(x)
    actual = contracted(x.to(dtype)).double()
    # float32 weights: the composed kernels round to float32 once, relative error ~1e-6.
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5 * reference.abs().max().item()
    assert (actual - reference).abs().max().item() <= tolerance


@torch.no_grad()
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_contract_after_move_to_cuda():
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=7).eval(), conv="ck", fc=True).double()
    on_device = copy.deepcopy(expanded).to("cuda")
    contracted = kdexpand.contract(on_device)

    assert all(p.device.type == "cuda" for p in contracted.state_dict().values())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    reference = kdexpand.set_mode(expanded, "sequential")(x)
    assert torch.allclose(contracted(x.cuda()).cpu(), reference, rtol=0, atol=1e-8)


def test_fc_on_unsupported_linear_names_real_fix():
    from timm.layers import Linear as TimmLinear

    from kdexpand.recipe import RecipeError
    from kdexpand.recipe.schema import ExpandConfig
    from kdexpand.trainer.preflight import check_expansion

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), TimmLinear(4, 2))
    expanded = kdexpand.expand(model, conv=None, fc=True, include=["2"])

    with pytest.raises(RecipeError, match="expands only plain nn.Linear layers, so set expand.fc: false"):
        check_expansion(ExpandConfig(fc=True, include=["2"]), expanded)
