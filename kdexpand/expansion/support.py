"""Checks of the layers that ``expand`` can replace, and a deep copy for wrapped layers.

Replacing a layer by an expanded unit keeps only its hyper-parameters and the shapes of its
weight and bias. Anything else attached to the layer would be dropped silently: a
reparameterization (spectral or weight norm, pruning, ``torch.nn.utils.parametrize``), a
hook, a subclass's own forward or extra tensors. ``unsupported_reason`` names such a layer's
problem, so ``expand`` can leave the layer as it is and report it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod, PruningContainer
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

__all__ = ["unsupported_reason", "copy_model"]

UNSUPPORTED_LAYERS = (nn.Conv1d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Bilinear)
_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")

# Methods whose override changes what a Conv2d / Linear computes or stores, so the expanded
# unit and its contraction (a plain nn.Conv2d / nn.Linear) would no longer match the layer.
_BEHAVIOUR_METHODS = ("forward", "_conv_forward", "__call__", "_call_impl", "_save_to_state_dict", "_load_from_state_dict")

# Class names of the parametrizations in torch.nn.utils.parametrizations (checked on torch
# 2.14), mapped to the name of the function that registers them.
_PARAMETRIZATION_NAMES = {"_SpectralNorm": "spectral_norm", "_WeightNorm": "weight_norm", "_Orthogonal": "orthogonal"}

_HOOK_KINDS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
    ("_state_dict_pre_hooks", "state_dict pre-hook"),
    ("_state_dict_hooks", "state_dict hook"),
    ("_load_state_dict_pre_hooks", "load_state_dict pre-hook"),
    ("_load_state_dict_post_hooks", "load_state_dict post-hook"),
)


def unsupported_reason(module: nn.Module) -> str | None:
    """Return why ``expand`` cannot replace a layer, or None when it can.

    Only layers of the reported kinds are checked: ``nn.Conv2d``, ``nn.Linear`` and the
    types in ``UNSUPPORTED_LAYERS``. Any other module returns None.
    """
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and isinstance(module, (nn.Conv2d, nn.Linear)):
        return "uninitialized lazy module; run one forward pass before expand"
    if isinstance(module, UNSUPPORTED_LAYERS):
        return f"{type(module).__name__} is not expanded (only Conv2d and Linear are)"
    if not isinstance(module, (nn.Conv2d, nn.Linear)):
        return None
    reason = _wrapper_reason(module) or _hook_reason(module) or _tensor_reason(module) or _subclass_reason(module)
    if reason is None and isinstance(module, nn.Conv2d):
        reason = _invalid_conv_settings(module)
    return reason


def _wrapper_reason(module: nn.Module) -> str | None:
    """Name the torch.nn.utils reparameterization or pruning on ``module``, if any."""
    if parametrize.is_parametrized(module):
        tensor, parametrizations = next(iter(module.parametrizations.items()))
        kinds = ", ".join(_PARAMETRIZATION_NAMES.get(type(p).__name__, type(p).__name__) for p in parametrizations)
        return (
            f"{tensor} is reparameterized ({kinds}, torch.nn.utils.parametrize); remove it with "
            f"torch.nn.utils.parametrize.remove_parametrizations(layer, {tensor!r}) before expanding, "
            "or exclude the layer"
        )
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, SpectralNorm):
            return (
                f"{hook.name} is reparameterized (spectral_norm); remove it with "
                "torch.nn.utils.remove_spectral_norm before expanding, or exclude the layer"
            )
        if isinstance(hook, WeightNorm):
            return (
                f"{hook.name} is reparameterized (weight_norm); remove it with "
                "torch.nn.utils.remove_weight_norm before expanding, or exclude the layer"
            )
        if isinstance(hook, BasePruningMethod):
            methods = hook._pruning_methods if isinstance(hook, PruningContainer) else (hook,)
            kinds = ", ".join(type(method).__name__ for method in methods)
            return (
                f"{hook._tensor_name} is pruned ({kinds}); make the pruning permanent with "
                f"torch.nn.utils.prune.remove(layer, {hook._tensor_name!r}) before expanding, "
                "or exclude the layer"
            )
    return None


def _hook_reason(module: nn.Module) -> str | None:
    """Name a hook registered on ``module``, which replacing the module would drop."""
    for attribute, kind in _HOOK_KINDS:
        hooks = getattr(module, attribute, None)
        if hooks:
            hook = next(iter(hooks.values()))
            return (
                f"{kind} {_hook_name(hook)} is registered on the layer, and replacing the layer "
                "would drop it; remove the hook before expanding, or exclude the layer"
            )
    return None


def _hook_name(hook: object) -> str:
    # torch wraps some hooks (load_state_dict pre-hooks) in an object whose .hook is the function.
    target = getattr(hook, "hook", hook)
    return getattr(target, "__qualname__", None) or type(target).__qualname__


def _tensor_reason(module: nn.Module) -> str | None:
    """Describe a weight or bias that is not a registered ``nn.Parameter``."""
    for name in ("weight", "bias"):
        value = getattr(module, name, None)
        if name == "bias" and value is None:
            continue
        if not isinstance(value, nn.Parameter) or module._parameters.get(name) is not value:
            return (
                f"{name} is a {type(value).__name__}, not an nn.Parameter; register it with "
                "nn.Parameter before expanding, or exclude the layer"
            )
    return None


def _subclass_reason(module: nn.Module) -> str | None:
    """Describe what a subclass adds to nn.Conv2d / nn.Linear that an expanded unit would lose.

    A Conv2d subclass that overrides none of ``_BEHAVIOUR_METHODS`` and adds no tensors or
    submodules is expanded like a Conv2d. It contracts to a plain ``nn.Conv2d`` with the same
    state_dict keys. Linear subclasses are never expanded: ``nn.MultiheadAttention`` reads the weight of its
    ``NonDynamicallyQuantizableLinear`` output projection directly, so replacing it breaks
    the attention.
    """
    base = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Linear
    cls = type(module)
    if cls is base:
        return None
    prefix = f"{cls.__module__}.{cls.__qualname__} subclasses nn.{base.__name__}"
    overridden = [name for name in _BEHAVIOUR_METHODS if getattr(cls, name, None) is not getattr(base, name, None)]
    if overridden:
        return f"{prefix} and overrides {', '.join(overridden)}"
    extras = [name for name in module._parameters if name not in ("weight", "bias")]
    extras += list(module._buffers) + list(module._modules)
    if extras:
        return f"{prefix} and adds parameters, buffers or submodules ({', '.join(extras)})"
    if base is nn.Linear:
        return (
            f"{prefix}; only plain nn.Linear layers are expanded, because a parent such as "
            "nn.MultiheadAttention may read the layer's weight directly"
        )
    return None


def _invalid_conv_settings(module: nn.Conv2d) -> str | None:
    """Describe settings that torch's Conv2d constructor rejects, set on the module afterwards."""
    if module.padding_mode not in _PADDING_MODES:
        return f"padding_mode {module.padding_mode!r} is not one torch accepts ({', '.join(_PADDING_MODES)})"
    if isinstance(module.padding, str) and module.padding not in ("same", "valid"):
        return f"padding {module.padding!r} is not one torch accepts (a number, a pair, 'same' or 'valid')"
    if module.padding == "same" and tuple(module.stride) != (1, 1):
        return f"padding='same' with stride {tuple(module.stride)}, which torch rejects for strided convolutions"
    return None


def copy_model(model: nn.Module, caller: str) -> nn.Module:
    """Deep-copy ``model``, including layers wrapped by the hook-based torch.nn.utils helpers.

    ``weight_norm``, ``prune`` and ``spectral_norm`` (after a forward) keep the layer's
    effective weight or bias as a non-leaf tensor attribute, which ``copy.deepcopy`` rejects.
    Their forward pre-hook recomputes that attribute from the layer's parameters before every
    forward, so the copy gets a detached clone of it in its place.

    Raises:
        ValueError: Another module keeps a non-leaf tensor as an attribute or buffer, which
            no deep copy accepts; the message names it.
    """
    memo: dict[int, object] = {}
    for name, module in model.named_modules():
        recomputed = _recomputed_attributes(module)
        tensors = [(key, value) for key, value in vars(module).items() if isinstance(value, torch.Tensor)]
        tensors += list(module._buffers.items())
        for attribute, tensor in tensors:
            if tensor is None or tensor.is_leaf:
                continue
            if attribute not in recomputed:
                owner = f"{name}.{attribute}" if name else attribute
                raise ValueError(
                    f"{caller}: {owner} is a tensor computed by autograd (not a graph leaf), which "
                    "torch cannot deep-copy; detach it, or compute it in forward instead of storing it"
                )
            memo[id(tensor)] = tensor.detach().clone()
    return copy.deepcopy(model, memo)


def _recomputed_attributes(module: nn.Module) -> set[str]:
    """Return the attributes that a torch.nn.utils forward pre-hook recomputes on ``module``."""
    names = set()
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, (SpectralNorm, WeightNorm)):
            names.add(hook.name)
        elif isinstance(hook, BasePruningMethod):
            names.add(hook._tensor_name)
    return names
