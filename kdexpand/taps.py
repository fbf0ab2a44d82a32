"""Feature taps: record the outputs of named submodules with forward hooks.

A tap name is a dotted module name from ``model.named_modules()`` ("layer2",
"features.3", "blocks.4.1.conv_pw"), so any ``nn.Module`` works without code changes. The
tests tap timm, torchvision and SmallNet models. The names refer to the
compact model. :func:`kdexpand.expand` keeps the name of every layer it replaces, and an
expanded unit returns the same tensor as the compact layer would, so the same names work
on the ExpandNet.

What a tap records: the tensor that the module returns, as it is at the end of the module's
call. A later in-place op can overwrite that tensor. timm's ResNet, for example, applies
``ReLU(inplace=True)`` right after ``bn1``, so a reference kept to the output of ``bn1``
holds post-ReLU values by the time the loss reads it. With ``clone=True`` (the default)
each tap stores a copy, which is differentiable and keeps exactly the module's output.
With ``clone=False`` a tap stores the tensor itself and :meth:`FeatureTaps.pop` raises if
a later op modified it in place.

Features live only from a forward pass to the next :meth:`FeatureTaps.pop` or
:meth:`FeatureTaps.clear`. ``pop`` hands them over and drops its references, so nothing stays
alive once the caller drops the returned dict.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from kdexpand.registry import closest_match

__all__ = ["FeatureTaps", "resolve_tap_modules", "unknown_tap_message"]

logger = logging.getLogger(__name__)

_MAX_LISTED_NAMES = 40


def unknown_tap_message(name: str, model: nn.Module, role: str = "model") -> str:
    """Build the one-line error for a tap name that is not a module of ``model``.

    The message gives the closest module name and lists the valid names: all of them
    for small models, else those at most two levels deep.
    """
    choices = [module_name for module_name, _ in model.named_modules() if module_name]
    hint = closest_match(name, choices)
    did_you_mean = f" Did you mean {hint!r}?" if hint else ""
    if len(choices) <= _MAX_LISTED_NAMES:
        listed = ", ".join(choices)
    else:
        shallow = [choice for choice in choices if choice.count(".") <= 1]
        listed = (
            f"{', '.join(shallow)} (showing names at most two levels deep; "
            f"{len(choices)} in all, see model.named_modules())"
        )
    return (
        f"unknown {role} tap {name!r}: no module of {type(model).__name__} has this name."
        f"{did_you_mean} Valid choices: {listed}"
    )


def resolve_tap_modules(
    model: nn.Module, names: Iterable[str], role: str = "model"
) -> dict[str, nn.Module]:
    """Return the modules of ``model`` named ``names``, in order.

    Args:
        model: Any module; the names come from ``model.named_modules()``.
        names: Dotted module names to tap.
        role: Which model this is ("student", "teacher"), used in error messages.

    Raises:
        KeyError: A name is not a submodule of ``model``; the message lists valid names.
    """
    modules = dict(model.named_modules())
    resolved: dict[str, nn.Module] = {}
    for name in names:
        if not name or name not in modules:
            raise KeyError(unknown_tap_message(name, model, role))
        resolved[name] = modules[name]
    return resolved


@dataclass
class _Record:
    """One tap's output in the current forward pass."""

    feature: torch.Tensor
    version: int | None
    calls: int


class FeatureTaps:
    """Record the outputs of the named submodules of ``model`` on every forward pass.

    Use as a context manager, or call :meth:`remove` when done, so the hooks do not
    outlive the training run. The same name may be given once only.

    Args:
        model: The model to tap; it is not modified apart from the forward hooks.
        names: Dotted module names from ``model.named_modules()``.
        clone: Store a copy of each output (see the module docstring for why). With
            ``False`` the tap stores the output itself and ``pop`` raises if a later
            in-place op changed it.
        role: Which model this is ("student", "teacher"), used in error messages.

    Raises:
        KeyError: A name is not a submodule of ``model``.
        ValueError: A name is given twice.
    """

    def __init__(
        self, model: nn.Module, names: Iterable[str], clone: bool = True, role: str = "model"
    ) -> None:
        names = list(names)
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"{role} taps {duplicates} are listed more than once; list each once")
        self.role = role
        self.clone = clone
        self.enabled = True
        self._records: dict[str, _Record] = {}
        self._handles: list[RemovableHandle] = []
        for name, module in resolve_tap_modules(model, names, role).items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))
        self.names = tuple(names)
        logger.debug("%s taps on %s (clone=%s)", role, ", ".join(names), clone)

    def _make_hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: object) -> None:
            if not self.enabled:
                return
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"{self.role} tap {name!r}: {type(module).__name__} returned "
                    f"{type(output).__name__}, not a tensor; tap a module that returns a tensor"
                )
            previous = self._records.get(name)
            calls = previous.calls + 1 if previous is not None else 1
            if self.clone:
                self._records[name] = _Record(output.clone(), None, calls)
            else:
                version = None if output.is_inference() else output._version
                self._records[name] = _Record(output, version, calls)

        return hook

    def pop(self) -> dict[str, torch.Tensor]:
        """Return the features of the last forward pass by name and forget them.

        Raises:
            RuntimeError: A tapped module did not run, ran more than once since the last
                ``pop`` (the output would be ambiguous), or, with ``clone=False``, its
                output was modified in place after the module returned.
        """
        records, self._records = self._records, {}
        features: dict[str, torch.Tensor] = {}
        for name in self.names:
            record = records.get(name)
            if record is None:
                raise RuntimeError(
                    f"{self.role} tap {name!r} recorded nothing: the module did not run in the "
                    f"forward pass; tap a module on the forward path"
                )
            if record.calls > 1:
                raise RuntimeError(
                    f"{self.role} tap {name!r} ran {record.calls} times since the last pop "
                    f"(the module is called more than once per forward pass, or pop was "
                    f"skipped); tap a module that runs once, e.g. its parent"
                )
            if record.version is not None and record.feature._version != record.version:
                raise RuntimeError(
                    f"{self.role} tap {name!r}: a later in-place op (e.g. ReLU(inplace=True)) "
                    f"modified the output after the module returned; use clone=True or tap "
                    f"the module that follows"
                )
            features[name] = record.feature
        return features

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Record nothing inside the block, e.g. during evaluation passes."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def clear(self) -> None:
        """Forget all recorded features, e.g. after a forward pass whose taps are unused."""
        self._records = {}

    def remove(self) -> None:
        """Remove the hooks from the model and forget all recorded features."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.remove()
