"""Model surgery: replace layers of any ``nn.Module`` by expanded units, and back.

``expand`` and ``contract`` deep-copy the model and swap children by name, so the caller's
model is never modified and every replaced module keeps its dotted name.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from typing import Iterable, Literal

import torch
from torch import nn

from kdexpand.expansion.report import ExpansionReport
from kdexpand.expansion.support import UNSUPPORTED_LAYERS, copy_model, unsupported_reason
from kdexpand.expansion.units import (
    MODES,
    ACNetConv2d,
    ExpandedConv2d,
    ExpandedLinear,
    ExpandedUnit,
    Mode,
)

__all__ = ["expand", "contract", "set_mode", "is_expanded", "expanded_units", "transfer_twin"]

logger = logging.getLogger(__name__)

ConvStrategy = Literal["cl", "ck", "acnet"]
CONV_STRATEGIES = ("cl", "ck", "acnet")


def expand(
    model: nn.Module,
    *,
    conv: ConvStrategy | None = "cl",
    fc: bool = False,
    rate: float = 4.0,
    fc_rate: float | None = None,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = None,
    mode: Mode | None = None,
    fallback: Literal["cl"] | None = None,
    pointwise: bool = False,
    nonlinear: bool = False,
) -> nn.Module:
    """Return an ExpandNet of ``model``: a copy whose conv / linear layers are expanded.

    Args:
        model: The compact model. It is not modified.
        conv: ``"cl"`` (1×1 → k×k → 1×1 with r× wider channels), ``"ck"`` (a k×k kernel with
            odd k > 3 as (k-1)/2 stacked 3×3 convs), ``"acnet"`` (parallel k×k, 1×k and k×1
            branches, the ACNet baseline) or None to leave convolutions alone.
        fc: Expand ``nn.Linear`` layers m → r·m → r·n → n.
        rate: Expansion rate r (> 0); widths are rounded, at least one channel per group.
            A rate below 1 makes the units narrower than the compact layers, which is
            allowed but logged as a warning.
        fc_rate: Expansion rate of linear layers; None uses ``rate``.
        include: Glob patterns on module names; only matching layers are expanded. The
            classifier (the last ``nn.Linear``) is expanded only when a pattern names it.
        exclude: Glob patterns on module names of layers to leave alone.
        mode: Forward mode of the units: ``"collapsed"`` (default for linear units) or
            ``"sequential"`` (the only mode of the nonlinear twin).
        fallback: ``"cl"`` expands with CL the convolutions that ``conv`` cannot expand
            (CK or ACNet on 1×1, 3×3 or even kernels).
        pointwise: Also expand 1×1 convolutions with CL (left alone by default).
        nonlinear: Build the nonlinear twin: a ReLU after every sub-layer but the last of
            each unit, with the same parameter names and shapes as the linear ExpandNet.

    Some layers would lose part of their behaviour if a unit replaced them, so they are left
    alone, reported as unsupported and logged as warnings. These are layers reparameterized
    or pruned by torch.nn.utils, layers with hooks, layers whose weight is not a registered
    parameter, and subclasses that override forward or add tensors. A Conv2d subclass
    without such changes is expanded, and ``contract`` turns it into a plain ``nn.Conv2d``
    with the same state_dict keys. Frozen layers (a weight or bias with
    ``requires_grad=False``) are left alone too.

    Returns:
        The expanded copy. Its ``expansion_report`` attribute lists every conv and linear
        layer, expanded or left alone and why; the report is also logged at INFO level.

    Raises:
        ValueError: An argument is invalid, a pattern matches no layer, the model is
            already expanded, or it keeps a non-leaf tensor that no deep copy accepts.
    """
    include_patterns = _patterns("include", include)
    exclude_patterns = _patterns("exclude", exclude)
    fc_rate = rate if fc_rate is None else fc_rate
    mode = _check_arguments(conv, rate, fc_rate, mode, fallback, nonlinear)
    if is_expanded(model):
        raise ValueError("expand: the model already contains expanded units; call kdexpand.contract on it first")

    expanded = copy_model(model, "expand")
    layer_names = [
        name
        for name, module in expanded.named_modules(remove_duplicate=False)
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    for pattern in include_patterns + exclude_patterns:
        _check_pattern_matches(pattern, layer_names)
    classifier = _classifier_name(expanded)

    aliases = _module_aliases(expanded)
    report = ExpansionReport()
    replacements: list[tuple[nn.Module, nn.Module]] = []
    for name, module in expanded.named_modules():
        if not name:
            continue
        reason = _filter_reason(name, include_patterns, exclude_patterns, classifier)
        unit, detail = _plan_layer(module, conv, fc, rate, fc_rate, fallback, pointwise, mode, nonlinear, reason)
        if detail is None:
            continue
        shared = [alias for alias in aliases[id(module)] if alias != name]
        if shared:
            detail += f" (shared, also used as {', '.join(shared)})"
        report.add(name, _describe(module), unit is not None, detail)
        if unit is not None:
            replacements.append((module, unit))

    _warn_narrow_rates([unit for _, unit in replacements], rate, fc_rate)
    for module, unit in replacements:
        unit.train(expanded.training)
        # A module registered under several names (weight sharing) becomes one shared unit.
        for alias in aliases[id(module)]:
            _set_submodule(expanded, alias, unit)
    expanded.expansion_report = report
    logger.info("expansion of %s:\n%s", type(model).__name__, report)
    for decision in report.skipped:
        if decision.detail.startswith("unsupported"):
            logger.warning("expand: %s (%s) %s", decision.name, decision.layer, decision.detail)
    return expanded


def contract(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` with every expanded unit replaced by its single layer.

    The result holds only standard torch layers, and its ``state_dict()`` has exactly the keys
    and shapes of the compact model the ExpandNet came from, on the same device and dtype.
    Batch-norm statistics are never used, so train and eval mode give the same result.

    Raises:
        ValueError: The model is a nonlinear twin, which no single linear layer equals.
    """
    for name, unit in expanded_units(model):
        if unit.nonlinear:
            raise ValueError(
                f"contract: {name!r} belongs to a nonlinear twin (ReLUs between sub-layers), "
                "which no single layer equals; copy its weights into the linear ExpandNet with "
                "kdexpand.transfer_twin and contract that"
            )
    contracted = copy_model(model, "contract")
    if hasattr(contracted, "expansion_report"):
        del contracted.expansion_report
    aliases = _module_aliases(contracted)
    for _, unit in expanded_units(contracted):
        layer = unit.contract()
        layer.train(unit.training)
        for alias in aliases[id(unit)]:
            _set_submodule(contracted, alias, layer)
    return contracted


def set_mode(model: nn.Module, mode: Mode) -> nn.Module:
    """Switch every expanded unit of ``model`` to ``mode`` and return the model."""
    if mode not in MODES:
        raise ValueError(f"set_mode: unknown mode {mode!r}; use one of {MODES}")
    for _, unit in expanded_units(model):
        unit.set_mode(mode)
    return model


def is_expanded(model: nn.Module) -> bool:
    """Return True when ``model`` contains at least one expanded unit."""
    return any(True for _ in expanded_units(model))


def expanded_units(model: nn.Module) -> list[tuple[str, ExpandedUnit]]:
    """Return the (name, unit) pairs of the expanded units of ``model``, in module order."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, ExpandedUnit)]


@torch.no_grad()
def transfer_twin(twin: nn.Module, linear: nn.Module) -> nn.Module:
    """Copy every parameter and buffer of a trained nonlinear twin into a linear ExpandNet.

    Both models come from ``expand`` with the same arguments, ``nonlinear=True`` for the
    twin. Every tensor must exist in both with the same shape: nothing is skipped.

    Returns:
        ``linear``, modified in place.

    Raises:
        ValueError: A tensor is missing, extra or of another shape, or the roles are swapped.
    """
    if not any(unit.nonlinear for _, unit in expanded_units(twin)):
        raise ValueError("transfer_twin: the first model is not a nonlinear twin; build it with expand(..., nonlinear=True)")
    if any(unit.nonlinear for _, unit in expanded_units(linear)):
        raise ValueError("transfer_twin: the target is a nonlinear twin; build it with expand(..., nonlinear=False)")
    source, target = twin.state_dict(), linear.state_dict()
    missing = sorted(set(target) - set(source))
    extra = sorted(set(source) - set(target))
    mismatched = [
        f"{key} {tuple(source[key].shape)} vs {tuple(target[key].shape)}"
        for key in sorted(set(source) & set(target))
        if source[key].shape != target[key].shape
    ]
    if missing or extra or mismatched:
        raise ValueError(
            "transfer_twin: the twin and the linear ExpandNet differ; expand both from the same "
            f"model with the same arguments (missing in twin: {missing[:5]}, extra in twin: "
            f"{extra[:5]}, shape mismatches: {mismatched[:5]})"
        )
    linear.load_state_dict(source, strict=True)
    return linear


def _patterns(argument: str, value: str | Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    patterns = [value] if isinstance(value, str) else list(value)
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"expand: {argument} patterns must be non-empty strings, got {pattern!r}")
    return patterns


def _check_arguments(conv, rate, fc_rate, mode, fallback, nonlinear) -> Mode:
    if conv is not None and conv not in CONV_STRATEGIES:
        raise ValueError(f"expand: unknown conv strategy {conv!r}; use one of {CONV_STRATEGIES} or None")
    for argument, value in (("rate", rate), ("fc_rate", fc_rate)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"expand: {argument} must be a positive number, got {value!r}; the paper uses 4")
    if fallback not in (None, "cl"):
        raise ValueError(f"expand: fallback must be None or 'cl', got {fallback!r}")
    if nonlinear and conv == "acnet":
        raise ValueError("expand: ACNet branches are parallel, so they have no nonlinear twin; use conv='cl' or 'ck'")
    if mode is None:
        return "sequential" if nonlinear else "collapsed"
    if mode not in MODES:
        raise ValueError(f"expand: unknown mode {mode!r}; use one of {MODES}")
    if nonlinear and mode == "collapsed":
        raise ValueError("expand: the nonlinear twin cannot run collapsed; use mode='sequential' or leave mode unset")
    return mode


def _check_pattern_matches(pattern: str, layer_names: list[str]) -> None:
    if not any(fnmatch.fnmatchcase(name, pattern) for name in layer_names):
        examples = ", ".join(layer_names[:6]) or "none"
        raise ValueError(
            f"expand: pattern {pattern!r} matches no Conv2d or Linear layer; layer names look like: {examples}"
        )


def _classifier_name(model: nn.Module) -> str | None:
    names = [name for name, module in model.named_modules() if type(module) is nn.Linear]
    return names[-1] if names else None


def _filter_reason(name: str, include: list[str], exclude: list[str], classifier: str | None) -> str | None:
    """Return why the name filters leave the layer alone, or None when they let it through."""
    included = any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
    if include and not included:
        return "not matched by include"
    if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
        return "matched by exclude"
    if name == classifier and not included:
        return "classifier (name it in include to expand it)"
    return None


def _plan_layer(module, conv, fc, rate, fc_rate, fallback, pointwise, mode, nonlinear, filter_reason):
    """Return (unit or None, detail) for one module; detail None means not a layer to report."""
    if not isinstance(module, (nn.Conv2d, nn.Linear, *UNSUPPORTED_LAYERS)):
        return None, None
    unsupported = unsupported_reason(module)
    if unsupported:
        return None, f"unsupported: {unsupported}"
    if isinstance(module, nn.Linear):
        if not fc:
            return None, "fc=False"
        reason = filter_reason or _frozen_reason(module)
        if reason:
            return None, reason
        unit = ExpandedLinear(module, fc_rate, mode, nonlinear)
        return unit, f"FC r={fc_rate:g}"
    if conv is None:
        return None, "conv=None"
    reason = filter_reason or _frozen_reason(module)
    if reason:
        return None, reason
    return _plan_conv(module, conv, rate, fallback, pointwise, mode, nonlinear)


def _frozen_reason(module: nn.Module) -> str | None:
    """Describe a frozen weight or bias, whose ``requires_grad=False`` a unit would not keep."""
    if not module.weight.requires_grad:
        return "frozen (requires_grad=False)"
    if module.bias is not None and not module.bias.requires_grad:
        return "bias frozen (requires_grad=False)"
    return None


def _plan_conv(module: nn.Conv2d, conv, rate, fallback, pointwise, mode, nonlinear):
    kh, kw = module.kernel_size
    reason = None
    if conv == "ck" and not (kh % 2 == 1 and kw % 2 == 1 and max(kh, kw) > 3):
        reason = f"CK needs odd kernel sides with one larger than 3, got {kh}x{kw}"
    elif conv == "acnet" and not (kh % 2 == 1 and kw % 2 == 1 and min(kh, kw) > 1):
        reason = f"ACNet needs odd kernel sides larger than 1, got {kh}x{kw}"
    if reason is None and conv == "ck":
        return ExpandedConv2d(module, "ck", rate, mode, nonlinear), f"CK r={rate:g}"
    if reason is None and conv == "acnet":
        return ACNetConv2d(module, mode), "ACNet"
    if reason is not None and fallback != "cl":
        return None, reason + " (fallback='cl' expands it with CL)"
    if (kh, kw) == (1, 1) and not pointwise:
        return None, "1x1 kernel (pointwise=True expands it with CL)"
    prefix = f"CL fallback ({reason}), " if reason else "CL "
    return ExpandedConv2d(module, "cl", rate, mode, nonlinear), f"{prefix}r={rate:g}"


def _describe(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        kh, kw = module.kernel_size
        return f"{type(module).__name__} {module.in_channels}→{module.out_channels} {kh}x{kw}{_conv_settings(module)}"
    if isinstance(module, nn.Linear) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
        return f"{type(module).__name__} {module.in_features}→{module.out_features}"
    return type(module).__name__


def _conv_settings(module: nn.Conv2d) -> str:
    """Return the settings that differ from the defaults, e.g. " s2 d1x3 p0x2 g4"."""
    text = ""
    if _pair(module.stride) != (1, 1):
        text += " s" + _pair_text(module.stride)
    if _pair(module.dilation) != (1, 1):
        text += " d" + _pair_text(module.dilation)
    if isinstance(module.padding, str):
        text += f" p={module.padding}"
    elif _pair(module.padding) != (0, 0):
        text += " p" + _pair_text(module.padding)
    if module.groups != 1:
        text += f" g{module.groups}"
    return text


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _pair_text(value: int | tuple[int, ...]) -> str:
    """Write a (height, width) setting as "2" when both sides are equal, else as "1x3"."""
    height, width = _pair(value)
    return str(height) if height == width else f"{height}x{width}"


def _warn_narrow_rates(units: list[ExpandedUnit], rate: float, fc_rate: float) -> None:
    """Log one warning when a unit was built with a rate below 1."""
    narrow = []
    if rate < 1 and any(isinstance(unit, ExpandedConv2d) for unit in units):
        narrow.append(f"rate={rate:g}")
    if fc_rate < 1 and any(isinstance(unit, ExpandedLinear) for unit in units):
        narrow.append(f"fc_rate={fc_rate:g}")
    if narrow:
        logger.warning(
            "expand: %s %s below 1, so the hidden layers of the expanded units are narrower than "
            "the compact layers (a bottleneck, not an over-parameterization); use a rate of 1 "
            "or more to over-parameterize",
            " and ".join(narrow),
            "is" if len(narrow) == 1 else "are",
        )


def _module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """Map each submodule's id to every name it is registered under."""
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if name:
            aliases.setdefault(id(module), []).append(name)
    return aliases


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
