"""Probabilistic knowledge transfer (PKT).

Source: Passalis and Tefas, "Learning Deep Representations with Probabilistic Knowledge
Transfer", ECCV 2018. For a batch of N flattened features ``x_i``,

    k(x_i, x_j) = (1 + cos(x_i, x_j)) / 2                 (cosine kernel mapped to [0, 1])
    p_{j|i}     = k(x_i, x_j) / sum_j' k(x_i, x_j')         (conditional probabilities)
    L           = 1/N * sum_i sum_j t_{j|i} * log(t_{j|i} / s_{j|i})

with ``t`` from the teacher and ``s`` from the student. The paper sums over i. Averaging
over the N anchors (``batchmean``) instead keeps the scale independent of the batch size.
The authors' code, as copied into RepDistiller, takes the mean over all N*N entries,
which is this loss divided by N.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["PKTLoss", "PKTParams", "conditional_probabilities"]


class PKTParams(LossParams):
    """Parameters of the PKT loss.

    Attributes:
        eps: Lower bound on feature norms and on student probabilities inside the log.
            The loss always runs in float32 or float64, so eps need not be representable
            in half precision; zero features give finite values for any eps > 0.
    """

    eps: float = Field(default=1e-6, gt=0.0)


def conditional_probabilities(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the (N, N) matrix ``p_{j|i}`` of the cosine kernel of the flattened features.

    A zero feature normalizes to the zero vector, so its kernel row is 1/2 everywhere and
    the row sums stay >= 1/2; no NaN appears and none needs masking.
    """
    unit = F.normalize(features.flatten(1), dim=1, eps=eps)  # N, D
    kernel = (unit @ unit.T + 1.0) / 2.0  # N, N in [0, 1]
    return kernel / kernel.sum(dim=1, keepdim=True)


class PKTLoss(TransferLoss):
    """KL divergence between teacher and student conditional probabilities, per anchor."""

    Params = PKTParams
    input_kind = "features"

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        eps = self.params.eps
        student_probs = conditional_probabilities(student, eps)
        teacher_probs = conditional_probabilities(teacher, eps)
        log_teacher = torch.log(teacher_probs.clamp_min(eps))
        log_student = torch.log(student_probs.clamp_min(eps))
        return (teacher_probs * (log_teacher - log_student)).sum() / student.shape[0]
