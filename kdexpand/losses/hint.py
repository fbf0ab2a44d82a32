"""Hint loss of FitNets with a learnable regressor from student to teacher features.

Source: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015:
``L_HT = 1/2 * || u_h(x) - r(v_g(x)) ||^2`` with ``u_h`` the teacher's hint layer, ``v_g``
the student's guided layer and ``r`` a convolutional regressor. This module computes
the mean squared error over all elements, which is ``2 / (N*C*H*W)`` times the paper's
loss, so the loss scale does not depend on the batch or feature size.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdexpand.losses.base import LossParams, TransferLoss

__all__ = ["HintLoss", "HintParams", "HintRegressor"]

logger = logging.getLogger(__name__)


class HintParams(LossParams):
    """Parameters of the Hint loss.

    Attributes:
        regressor: ``"conv"`` for a learnable convolution (or linear layer for vector
            features) to the teacher's channels; ``"identity"`` when the channel counts
            already match and no adapter is wanted.
        kernel_size: Kernel of the regressor convolution, 1 or 3 (padding keeps the size).
        batch_norm: Whether a batch normalization follows the regressor.
        spatial: How a spatial mismatch is resolved. ``"interpolate"`` resizes the
            regressed student map to the teacher's height and width (bilinear,
            ``align_corners=False``). ``"pool"`` adaptively average-pools each map, in each
            dimension, down to the smaller of the two sizes.
    """

    regressor: Literal["conv", "identity"] = "conv"
    kernel_size: Literal[1, 3] = 1
    batch_norm: bool = False
    spatial: Literal["interpolate", "pool"] = "interpolate"


def _validate_shapes(student_shape: torch.Size, teacher_shape: torch.Size) -> None:
    if len(student_shape) != len(teacher_shape) or len(student_shape) not in (1, 3):
        raise ValueError(
            f"hint: per-sample student shape {tuple(student_shape)} and teacher shape "
            f"{tuple(teacher_shape)} must both be (C, H, W) maps or both (D,) vectors; "
            f"tap layers of the same kind, e.g. two convolution stages"
        )


class HintRegressor(nn.Module):
    """Map student features to the teacher's feature shape.

    Channels are mapped by a 1x1 or 3x3 convolution (a linear layer for vector features),
    optionally followed by batch normalization; the spatial size is then matched as
    ``spatial`` selects. Any pair of channel counts and any pair of spatial sizes works.

    Args:
        student_shape: Per-sample shape of the student feature, (C, H, W) or (D,).
        teacher_shape: Per-sample shape of the teacher feature, the same rank.
        params: Regressor settings.
    """

    def __init__(
        self, student_shape: torch.Size, teacher_shape: torch.Size, params: HintParams
    ) -> None:
        super().__init__()
        _validate_shapes(student_shape, teacher_shape)
        self.teacher_size = tuple(teacher_shape[1:])
        self.spatial = params.spatial
        in_channels, out_channels = student_shape[0], teacher_shape[0]
        is_map = len(student_shape) == 3

        layers: list[nn.Module] = []
        if params.regressor == "identity":
            if in_channels != out_channels:
                raise ValueError(
                    f"hint: regressor='identity' needs equal channels, got student "
                    f"{in_channels} and teacher {out_channels}; use regressor='conv'"
                )
        elif is_map:
            layers.append(
                nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size=params.kernel_size,
                    padding=params.kernel_size // 2,
                    bias=not params.batch_norm,
                )
            )
        else:
            if params.kernel_size != 1:
                raise ValueError(
                    f"hint: kernel_size={params.kernel_size} needs (C, H, W) features, but the "
                    f"taps give vectors of {in_channels} and {out_channels}; use kernel_size=1"
                )
            layers.append(nn.Linear(in_channels, out_channels, bias=not params.batch_norm))
        if params.batch_norm:
            layers.append(nn.BatchNorm2d(out_channels) if is_map else nn.BatchNorm1d(out_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, student: torch.Tensor) -> torch.Tensor:
        regressed = self.layers(student)
        if regressed.dim() == 2 or self.spatial == "pool":
            return regressed
        if tuple(regressed.shape[2:]) != self.teacher_size:
            regressed = F.interpolate(
                regressed, size=self.teacher_size, mode="bilinear", align_corners=False
            )
        return regressed


def _pool_to_common_size(
    student: torch.Tensor, teacher: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool both maps to the smaller height and the smaller width of the two."""
    size = tuple(min(s, t) for s, t in zip(student.shape[2:], teacher.shape[2:]))
    if tuple(student.shape[2:]) != size:
        student = F.adaptive_avg_pool2d(student, size)
    if tuple(teacher.shape[2:]) != size:
        teacher = F.adaptive_avg_pool2d(teacher, size)
    return student, teacher


class HintLoss(TransferLoss):
    """FitNets hint: ``mean((r(student) - teacher)^2)`` with a learnable regressor ``r``.

    The regressor runs in full precision with the rest of the loss. Its parameters belong
    to this module, so they are trained, saved and resumed with the loss and are never
    part of the exported student.
    """

    Params = HintParams
    input_kind = "features"

    def __init__(
        self, params: HintParams, student_shape: torch.Size, teacher_shape: torch.Size
    ) -> None:
        super().__init__(params)
        self.regressor = HintRegressor(student_shape, teacher_shape, params)

    @classmethod
    def build(
        cls,
        params: HintParams,
        student_shape: torch.Size | None = None,
        teacher_shape: torch.Size | None = None,
    ) -> HintLoss:
        if student_shape is None or teacher_shape is None:
            raise ValueError(
                "hint: the regressor needs the per-sample student and teacher feature shapes; "
                "pass student_shape= and teacher_shape="
            )
        loss = cls(params, torch.Size(student_shape), torch.Size(teacher_shape))
        logger.info(
            "hint regressor %s -> %s: %s",
            tuple(student_shape),
            tuple(teacher_shape),
            loss.regressor.layers,
        )
        return loss

    def compute(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        targets: torch.Tensor | None,
    ) -> torch.Tensor:
        regressed = self.regressor(student)
        if regressed.dim() == 4 and self.params.spatial == "pool":
            regressed, teacher = _pool_to_common_size(regressed, teacher)
        if regressed.shape != teacher.shape:
            raise ValueError(
                f"hint: regressed student shape {tuple(regressed.shape)} differs from teacher "
                f"shape {tuple(teacher.shape)}; the taps' shapes changed since the regressor "
                f"was built, so rebuild the loss for the new input size"
            )
        return F.mse_loss(regressed, teacher)
