"""Relational knowledge distillation (RKD), distance and angle terms.

Source: Park et al., "Relational Knowledge Distillation", CVPR 2019. For a
batch of N flattened embeddings ``t_i`` (teacher) and ``s_i`` (student),

    psi_D(t_i, t_j)      = ||t_i - t_j||_2 / mu,   mu = mean of ||t_i - t_j||_2 over i != j
    psi_A(t_i, t_j, t_k) = < e_ij, e_kj >,          e_ij = (t_i - t_j) / ||t_i - t_j||_2
    L = lambda_D * mean_{i != j} huber(psi_D(s) - psi_D(t))
      + lambda_A * mean_{i, j, k} huber(psi_A(s) - psi_A(t))

with the Huber loss of threshold 1 (``smooth_l1_loss``). The distance term averages over
the N*(N-1) pairs i != j; RepDistiller also counts the zero diagonal, a factor (N-1)/N
smaller. As in RepDistiller, the angle term averages over all N^3 triplets, and those
with a repeated index contribute zero because a zero difference normalizes to the zero
vector. The angle term stores N*N*D values, so tap low-dimensional embeddings (the
penultimate layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["RKDLoss", "RKDParams", "angle_potentials", "distance_potentials"]


class RKDParams(LossParams):
    """Parameters of the RKD loss.

    Attributes:
        distance_weight: lambda_D (25 in mdistiller's and RepDistiller's CIFAR-100 setup).
        angle_weight: lambda_A (50 in the same setup).
        eps: Lower bound on squared distances before the square root, and on the norms of
            difference vectors, so equal or zero embeddings keep finite gradients.
    """

    distance_weight: float = Field(default=25.0, ge=0.0)
    angle_weight: float = Field(default=50.0, ge=0.0)
    eps: float = Field(default=1e-12, gt=0.0)

    @model_validator(mode="after")
    def _check_some_term(self) -> RKDParams:
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError(
                "rkd: distance_weight and angle_weight are both 0, so the loss is always 0; "
                "set at least one of them > 0"
            )
        return self


def distance_potentials(embeddings: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the N*(N-1) off-diagonal pairwise distances divided by their mean."""
    flat = embeddings.flatten(1)  # N, D
    squared_norms = flat.pow(2).sum(dim=1)
    squared = squared_norms[:, None] + squared_norms[None, :] - 2.0 * flat @ flat.T
    off_diagonal = ~torch.eye(flat.shape[0], dtype=torch.bool, device=flat.device)
    distances = squared.clamp_min(eps).sqrt()[off_diagonal]  # N*(N-1)
    return distances / distances.mean()


def angle_potentials(embeddings: torch.Tensor, eps: float) -> torch.Tensor:
    """Return the (N, N, N) cosines ``<e_ij, e_kj>`` indexed [j, i, k]."""
    flat = embeddings.flatten(1)  # N, D
    differences = flat[None, :, :] - flat[:, None, :]  # [j, i] = t_i - t_j; N, N, D
    directions = F.normalize(differences, dim=2, eps=eps)
    return directions @ directions.transpose(1, 2)  # N, N, N


class RKDLoss(TransferLoss):
    """Weighted sum of the RKD distance and angle losses."""

    Params = RKDParams
    input_kind = "features"

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        params = self.params
        loss = student.new_zeros(())
        if params.distance_weight > 0 and student.shape[0] > 1:
            distance = F.smooth_l1_loss(
                distance_potentials(student, params.eps), distance_potentials(teacher, params.eps)
            )
            loss = loss + params.distance_weight * distance
        if params.angle_weight > 0:
            angle = F.smooth_l1_loss(
                angle_potentials(student, params.eps), angle_potentials(teacher, params.eps)
            )
            loss = loss + params.angle_weight * angle
        return loss
