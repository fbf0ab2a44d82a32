"""Hinton knowledge distillation (KD).

Source: Hinton, Vinyals and Dean, "Distilling the Knowledge in a Neural Network", 2015.
With student logits ``z_s``, teacher logits ``z_t`` and temperature T,

    L_KD = T^2 * KL(softmax(z_t / T) || softmax(z_s / T))
         = T^2 / N * sum_i sum_c p_t[i, c] * (log p_t[i, c] - log p_s[i, c])

The KL divergence uses ``batchmean`` reduction (sum over classes, mean over the N samples):
``mean`` would also divide by the number of classes. The T^2 factor keeps the gradient
magnitude of the soft targets comparable to the hard-label cross-entropy when T changes,
because the gradient of the softened KL scales as 1 / T^2. The hard-label term and the
weights between the two terms live in :class:`kdexpand.distill.Distiller`.

The temperature may follow a schedule over the epochs, from ``temperature`` at the first
epoch to ``final_temperature`` at the last. The T^2 factor uses the current temperature.
"""

from __future__ import annotations

import logging
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["KDLoss", "KDParams", "kd_loss", "scheduled_temperature"]

logger = logging.getLogger(__name__)


class KDParams(LossParams):
    """Parameters of the KD loss.

    Attributes:
        temperature: Softmax temperature T (> 0); 4 is the common CIFAR setting. With a
            schedule, the temperature of the first epoch.
        schedule: ``"constant"``, or how T moves from ``temperature`` to
            ``final_temperature``: ``"linear"`` in the epoch index, or ``"cosine"``
            (half a cosine period, flat at both ends).
        final_temperature: Temperature of the last epoch; required by the linear and
            cosine schedules and rejected by the constant one.
    """

    temperature: float = Field(default=4.0, gt=0.0)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    final_temperature: float | None = Field(default=None, gt=0.0)

    @model_validator(mode="after")
    def _check_schedule(self) -> KDParams:
        if self.schedule == "constant" and self.final_temperature is not None:
            raise ValueError(
                f"kd: final_temperature={self.final_temperature} needs schedule: linear or "
                f"cosine; remove it for a constant temperature"
            )
        if self.schedule != "constant" and self.final_temperature is None:
            raise ValueError(
                f"kd: schedule {self.schedule!r} needs final_temperature, the temperature of "
                f"the last epoch, e.g. final_temperature: 1.0"
            )
        return self


def scheduled_temperature(params: KDParams, epoch: int, num_epochs: int) -> float:
    """Return the temperature of epoch ``epoch`` (0-based) out of ``num_epochs``.

    With progress ``p = epoch / (num_epochs - 1)`` (0 for a single epoch), T0 the initial
    and T1 the final temperature: linear ``T0 + (T1 - T0) * p``; cosine
    ``T1 + (T0 - T1) * (1 + cos(pi * p)) / 2``.
    """
    if params.schedule == "constant" or params.final_temperature is None:
        return params.temperature
    progress = min(epoch / (num_epochs - 1), 1.0) if num_epochs > 1 else 0.0
    start, end = params.temperature, params.final_temperature
    if params.schedule == "linear":
        return start + (end - start) * progress
    return end + (start - end) * (1.0 + math.cos(math.pi * progress)) / 2.0


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` with batchmean reduction.

    Args:
        student_logits: (N, C) student logits; the gradient flows back through them.
        teacher_logits: (N, C) teacher logits.
        temperature: Softmax temperature T.
    """
    student_log_probs = F.log_softmax(student_logits / temperature, dim=1)  # N, C
    teacher_log_probs = F.log_softmax(teacher_logits / temperature, dim=1)  # N, C
    divergence = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
    return divergence * temperature**2


class KDLoss(TransferLoss):
    """Hinton KD on logits, computed in float32 or wider with autocast disabled."""

    Params = KDParams
    input_kind = "logits"

    def __init__(self, params: KDParams) -> None:
        super().__init__(params)
        self.temperature = params.temperature

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        temperature = scheduled_temperature(self.params, epoch, num_epochs)
        if temperature != self.temperature:
            logger.info("kd: epoch %d temperature %.4g", epoch + 1, temperature)
        self.temperature = temperature

    def compute(
        self, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor | None
    ) -> torch.Tensor:
        if student.shape != teacher.shape:
            raise ValueError(
                f"KD: student logits {tuple(student.shape)} and teacher logits "
                f"{tuple(teacher.shape)} differ; the teacher must have the student's classes"
            )
        return kd_loss(student, teacher, self.temperature)
