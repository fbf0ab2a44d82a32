"""Frozen timm teachers for knowledge transfer."""

from __future__ import annotations

import logging

import timm
from torch import nn

from kdexpand.io import load_safetensors
from kdexpand.recipe import RecipeError, TeacherConfig

__all__ = [
    "TeacherMismatchError",
    "TeacherNotFoundError",
    "build_teacher",
    "check_teacher_checkpoint",
    "teacher_frozen",
]

logger = logging.getLogger(__name__)


class TeacherNotFoundError(FileNotFoundError):
    """The teacher checkpoint does not exist; the message names the command that creates it."""


class TeacherMismatchError(ValueError):
    """The teacher checkpoint's tensors do not fit the teacher model built for this dataset."""


def check_teacher_checkpoint(config: TeacherConfig) -> None:
    """Check that the teacher checkpoint is a file.

    Raises:
        RecipeError: ``teacher.checkpoint`` is a directory.
        TeacherNotFoundError: The checkpoint is missing; the message names the command that creates it.
    """
    assert config.checkpoint is not None, "only checkpoint teachers have a file to check"
    if config.checkpoint.is_file():
        return
    if config.checkpoint.is_dir():
        inside = config.checkpoint / "compact.safetensors"
        fix = f"set teacher.checkpoint={inside}" if inside.is_file() else "set teacher.checkpoint to that file"
        raise RecipeError(
            f"teacher.checkpoint {config.checkpoint} is a directory, but a .safetensors file is expected; {fix}"
        )
    if config.recipe is not None:
        fix = f"create it with: accelerate launch -m kdexpand.train {config.recipe}"
    else:
        fix = "train a teacher recipe from teachers/ whose output.dir holds it, or fix teacher.checkpoint"
    raise TeacherNotFoundError(f"teacher checkpoint {config.checkpoint} not found; {fix}")


def build_teacher(config: TeacherConfig, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build the recipe's timm teacher with its weights, frozen and in eval mode.

    Args:
        config: The recipe's ``teacher`` section.
        num_classes: Classes of the dataset; the checkpoint's classifier must match.
        in_channels: Input channels of the dataset.

    Raises:
        TeacherNotFoundError: ``config.checkpoint`` does not exist.
        TeacherMismatchError: The checkpoint's keys or shapes differ from the timm model's.
    """
    if config.checkpoint is not None:
        check_teacher_checkpoint(config)
        teacher = timm.create_model(
            config.model, pretrained=False, num_classes=num_classes, in_chans=in_channels, **config.kwargs
        )
        _load_checked(teacher, config, num_classes)
        logger.info("teacher %s loaded from %s", config.model, config.checkpoint)
    else:
        # NOTE: this path has not been run (no network access where it was written). timm
        # downloads the hub weights and, when num_classes differs from the pretrained head,
        # puts a new random classifier on top, which needs fine-tuning before it can teach.
        teacher = timm.create_model(
            config.model, pretrained=True, num_classes=num_classes, in_chans=in_channels, **config.kwargs
        )
        logger.info("teacher %s with timm pretrained weights", config.model)

    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _load_checked(teacher: nn.Module, config: TeacherConfig, num_classes: int) -> None:
    """Load the checkpoint strictly, first naming any key or shape that does not fit."""
    weights = load_safetensors(config.checkpoint)
    expected = teacher.state_dict()
    mismatched = [key for key in sorted(set(weights) & set(expected)) if weights[key].shape != expected[key].shape]
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    # With the same keys, a tensor sized by the class count on one side only is the
    # classifier of another dataset. Different keys mean another model, whatever its classes.
    for key in mismatched if not (missing or extra) else []:
        if expected[key].shape[:1] == (num_classes,) and weights[key].dim() == expected[key].dim():
            raise TeacherMismatchError(
                f"teacher.checkpoint {config.checkpoint} has a classifier for {weights[key].shape[0]} "
                f"classes ({key} {tuple(weights[key].shape)}), but the dataset has {num_classes}; "
                "use a teacher trained on this dataset"
            )
    if missing or extra or mismatched:
        shapes = [f"{key} {tuple(weights[key].shape)} vs {tuple(expected[key].shape)}" for key in mismatched]
        raise TeacherMismatchError(
            f"teacher.checkpoint {config.checkpoint}: its keys do not match teacher.model {config.model!r} "
            f"(missing: {missing[:3]}, unexpected: {extra[:3]}, shape mismatches: {shapes[:3]}); "
            "check teacher.model and teacher.kwargs against the run that wrote the checkpoint"
        )
    teacher.load_state_dict(weights, strict=True)


def teacher_frozen(teacher: nn.Module) -> bool:
    """Return True when no parameter of ``teacher`` requires a gradient and it is in eval mode."""
    return not teacher.training and not any(p.requires_grad for p in teacher.parameters())

