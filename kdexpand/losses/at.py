"""Attention transfer (AT), activation-based.

Source: Zagoruyko and Komodakis, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer", ICLR 2017. For a
(C, H, W) activation ``A`` the spatial attention map and the loss are

    Q = vec( 1/C * sum_c |A_c|^p )                       (p = 2 in the paper)
    L = mean_{n, k} ( Q_S[n, k] / ||Q_S[n]||_2 - Q_T[n, k] / ||Q_T[n]||_2 )^2

which is the form of the authors' code as copied into RepDistiller. The paper's factor
beta/2 goes into the term weight (mdistiller uses 1000 on CIFAR-100). Channel counts may
differ. When the heights or widths differ, each attention map is adaptively
average-pooled, per dimension, to the smaller size before normalization.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["ATLoss", "ATParams", "attention_map"]


class ATParams(LossParams):
    """Parameters of the AT loss.

    Attributes:
        p: Exponent of the absolute activations; p >= 1 keeps the gradient finite at 0.
        eps: Lower bound on the attention-map norm, so all-zero maps normalize to zero.
    """

    p: float = Field(default=2.0, ge=1.0)
    eps: float = Field(default=1e-12, gt=0.0)


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """Return the (N, H, W) map ``mean_c |A_c|^p`` of (N, C, H, W) features."""
    if features.dim() != 4:
        raise ValueError(
            f"at: attention transfer needs (N, C, H, W) features, got shape "
            f"{tuple(features.shape)}; tap a convolutional layer"
        )
    return features.abs().pow(p).mean(dim=1)


class ATLoss(TransferLoss):
    """Squared distance between L2-normalized spatial attention maps."""

    Params = ATParams
    input_kind = "features"

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        student_map = attention_map(student, self.params.p)  # N, Hs, Ws
        teacher_map = attention_map(teacher, self.params.p)  # N, Ht, Wt

        size = tuple(min(s, t) for s, t in zip(student_map.shape[1:], teacher_map.shape[1:]))
        if tuple(student_map.shape[1:]) != size:
            student_map = F.adaptive_avg_pool2d(student_map.unsqueeze(1), size).squeeze(1)
        if tuple(teacher_map.shape[1:]) != size:
            teacher_map = F.adaptive_avg_pool2d(teacher_map.unsqueeze(1), size).squeeze(1)

        student_q = F.normalize(student_map.flatten(1), dim=1, eps=self.params.eps)
        teacher_q = F.normalize(teacher_map.flatten(1), dim=1, eps=self.params.eps)
        return (student_q - teacher_q).pow(2).mean()
