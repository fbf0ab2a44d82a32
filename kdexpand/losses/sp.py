"""Similarity-preserving knowledge distillation (SP).

Source: Tung and Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.
For a batch of N flattened features ``Q`` (N, D),

    G~ = row_normalize(Q Q^T)                            (each row scaled to unit L2 norm)
    L  = 1/N^2 * || G~_T - G~_S ||_F^2

The paper's factor gamma goes into the term weight (mdistiller uses 3000 on CIFAR-100).
Student and teacher may have any feature sizes because only the N x N similarity
matrices are compared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["SPLoss", "SPParams", "similarity_matrix"]


class SPParams(LossParams):
    """Parameters of the SP loss.

    Attributes:
        eps: Lower bound on each row norm, so rows of an all-zero batch normalize to zero.
    """

    eps: float = Field(default=1e-12, gt=0.0)


def similarity_matrix(features: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the row-normalized (N, N) Gram matrix of the flattened features."""
    flat = features.flatten(1)  # N, D
    return F.normalize(flat @ flat.T, dim=1, eps=eps)


class SPLoss(TransferLoss):
    """Mean squared difference of the row-normalized batch similarity matrices."""

    Params = SPParams
    input_kind = "features"

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        student_g = similarity_matrix(student, self.params.eps)
        teacher_g = similarity_matrix(teacher, self.params.eps)
        return (teacher_g - student_g).pow(2).mean()
