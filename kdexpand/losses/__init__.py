"""Knowledge-transfer losses and the registry that builds them from recipe terms.

Every loss is a :class:`~kdexpand.losses.base.TransferLoss`: it compares one student
output with the matching teacher output in full precision, never passes a gradient to
the teacher, and validates its recipe parameters with a pydantic model that rejects
unknown keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdexpand.losses.at import ATLoss
from kdexpand.losses.base import InputKind, LossParams, TransferLoss
from kdexpand.losses.dkd import DKDLoss
from kdexpand.losses.hint import HintLoss, HintRegressor
from kdexpand.losses.kd import KDLoss
from kdexpand.losses.pkt import PKTLoss
from kdexpand.losses.rkd import RKDLoss
from kdexpand.losses.sp import SPLoss
from kdexpand.registry import Registry

__all__ = [
    "ATLoss",
    "DKDLoss",
    "HintLoss",
    "HintRegressor",
    "InputKind",
    "KDLoss",
    "LOSSES",
    "LossParams",
    "PKTLoss",
    "RKDLoss",
    "SPLoss",
    "TransferLoss",
    "build_loss",
    "validate_loss_params",
]

LOSSES: Registry[type[TransferLoss]] = Registry("loss")
LOSSES.register("at")(ATLoss)
LOSSES.register("dkd")(DKDLoss)
LOSSES.register("hint")(HintLoss)
LOSSES.register("kd")(KDLoss)
LOSSES.register("pkt")(PKTLoss)
LOSSES.register("rkd")(RKDLoss)
LOSSES.register("sp")(SPLoss)


def validate_loss_params(name: str, params: Mapping[str, Any]) -> LossParams:
    """Return the validated parameters of loss ``name``.

    Raises:
        KeyError: ``name`` is not registered; the message lists the valid names.
        pydantic.ValidationError: A parameter is unknown, of the wrong type or out of range.
    """
    return LOSSES.get(name).Params(**params)


def build_loss(
    name: str,
    params: Mapping[str, Any] | None = None,
    student_shape: torch.Size | None = None,
    teacher_shape: torch.Size | None = None,
) -> TransferLoss:
    """Build the registered loss ``name`` from recipe parameters.

    Args:
        name: Registered loss name, e.g. ``"hint"``.
        params: Recipe parameters of the loss; missing keys take the defaults.
        student_shape: Per-sample shape of the student's tapped feature (no batch
            dimension); needed by losses with adapters such as ``"hint"``.
        teacher_shape: Per-sample shape of the teacher's tapped feature.
    """
    validated = validate_loss_params(name, params or {})
    return LOSSES.get(name).build(validated, student_shape, teacher_shape)
