"""The interface every knowledge-transfer loss implements.

A transfer loss compares one student output with the matching teacher output: logits
for logit losses (KD, DKD), tapped intermediate features for feature losses (Hint, PKT,
AT, RKD, SP). Each loss is an ``nn.Module`` so that losses with trainable parts (the
Hint regressor) carry their parameters, are saved with the checkpoint and move with
``.to(device)``.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

__all__ = ["InputKind", "LossParams", "TransferLoss", "full_precision"]

InputKind = Literal["logits", "features"]


class LossParams(BaseModel):
    """Recipe parameters of a loss. Subclasses add fields; unknown keys are rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in at least float32 precision (float64 stays float64)."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class TransferLoss(nn.Module):
    """Base class of the registered transfer losses.

    ``forward`` detaches the teacher output, casts both outputs to at least float32 and
    disables autocast before calling ``compute``, so every loss formula runs in full
    precision under mixed-precision training. No gradient can reach the teacher through
    a transfer loss.

    Subclasses set:
        Params: The pydantic model of the recipe parameters.
        input_kind: ``"logits"`` or ``"features"``; feature losses need tap names.
        needs_targets: Whether ``compute`` uses the ground-truth class indices.

    Args:
        params: Validated recipe parameters.
    """

    Params: ClassVar[type[LossParams]] = LossParams
    input_kind: ClassVar[InputKind] = "features"
    needs_targets: ClassVar[bool] = False

    def __init__(self, params: LossParams) -> None:
        super().__init__()
        self.params = params

    @classmethod
    def build(
        cls,
        params: LossParams,
        student_shape: torch.Size | None = None,
        teacher_shape: torch.Size | None = None,
    ) -> TransferLoss:
        """Build the loss; losses with adapters size them from the per-sample shapes."""
        return cls(params)

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Update epoch-dependent settings (schedules, warm-up) before epoch ``epoch`` (0-based)."""

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.needs_targets and targets is None:
            raise ValueError(
                f"{type(self).__name__} needs the ground-truth class indices; pass targets="
            )
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: student batch size {student.shape[0]} differs from "
                f"teacher batch size {teacher.shape[0]}; feed both the same batch"
            )
        with torch.autocast(device_type=student.device.type, enabled=False):
            return self.compute(full_precision(student), full_precision(teacher.detach()), targets)

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        """Return the scalar loss from full-precision outputs; the teacher is detached."""
        raise NotImplementedError
