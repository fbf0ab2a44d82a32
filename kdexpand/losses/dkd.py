"""Decoupled knowledge distillation (DKD).

Source: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. With
logits divided by the temperature T, ``t`` the ground-truth class and
``b = [p_t, 1 - p_t]`` the binary target / non-target probabilities,

    TCKD = KL(b^T || b^S)
    NCKD = KL(p^T_{\\t} || p^S_{\\t})       (softmax over the non-target classes only)
    L    = T^2 * (alpha * TCKD + beta * NCKD)

Both KL terms use ``batchmean`` reduction (sum over classes, mean over the batch). The
log-probabilities come from log-sum-exp over gathered non-target logits:
``log p_t = z_t - LSE(z)``, ``log(1 - p_t) = LSE(z_{\\t}) - LSE(z)``,
``log p_{k|\\t} = z_k - LSE(z_{\\t})``. No masking constant is subtracted from the logits,
so no value overflows in half precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["DKDLoss", "DKDParams", "decoupled_log_probs"]


class DKDParams(LossParams):
    """Parameters of the DKD loss.

    Attributes:
        alpha: Weight of the target-class term TCKD (mdistiller's CIFAR-100 default: 1.0).
        beta: Weight of the non-target-class term NCKD (default there: 8.0).
        temperature: Softmax temperature T (default there: 4.0).
        warmup_epochs: The loss is scaled by ``min((epoch + 1) / warmup_epochs, 1)`` with a
            0-based epoch, so the first epoch gets ``1 / warmup_epochs`` (default there:
            20). 0 disables the warm-up.
    """

    alpha: float = Field(default=1.0, ge=0.0)
    beta: float = Field(default=8.0, ge=0.0)
    temperature: float = Field(default=4.0, gt=0.0)
    warmup_epochs: int = Field(default=0, ge=0)


def decoupled_log_probs(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return log ``[p_t, 1 - p_t]`` (N, 2) and the non-target log-softmax (N, C - 1)."""
    num_samples, num_classes = logits.shape
    target_mask = F.one_hot(targets, num_classes).bool()  # N, C
    target_logit = logits.gather(1, targets[:, None]).squeeze(1)  # N
    other_logits = logits[~target_mask].view(num_samples, num_classes - 1)  # N, C-1

    log_total = torch.logsumexp(logits, dim=1)  # N
    log_other = torch.logsumexp(other_logits, dim=1)  # N
    binary = torch.stack([target_logit - log_total, log_other - log_total], dim=1)  # N, 2
    non_target = other_logits - log_other[:, None]  # N, C-1
    return binary, non_target


class DKDLoss(TransferLoss):
    """DKD between student and teacher logits; needs the ground-truth class indices."""

    Params = DKDParams
    input_kind = "logits"
    needs_targets = True

    def __init__(self, params: DKDParams) -> None:
        super().__init__(params)
        self.warmup_factor = 1.0

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        warmup = self.params.warmup_epochs
        self.warmup_factor = min((epoch + 1) / warmup, 1.0) if warmup > 0 else 1.0

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        assert targets is not None  # forward() checks needs_targets
        if student.dim() != 2 or student.shape[1] < 2:
            raise ValueError(
                f"dkd: expected (N, C) logits with C >= 2, got shape {tuple(student.shape)}"
            )
        if targets.shape != student.shape[:1] or targets.is_floating_point():
            raise ValueError(
                f"dkd: expected integer class indices of shape ({student.shape[0]},), got "
                f"{targets.dtype} of shape {tuple(targets.shape)}; soft or mixed targets are "
                f"not supported"
            )
        params = self.params
        temperature = params.temperature
        student_binary, student_other = decoupled_log_probs(student / temperature, targets)
        teacher_binary, teacher_other = decoupled_log_probs(teacher / temperature, targets)

        tckd = F.kl_div(student_binary, teacher_binary, reduction="batchmean", log_target=True)
        nckd = F.kl_div(student_other, teacher_other, reduction="batchmean", log_target=True)
        loss = temperature**2 * (params.alpha * tckd + params.beta * nckd)
        return self.warmup_factor * loss
