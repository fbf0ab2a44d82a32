"""Frozen timm teachers for knowledge transfer."""

from __future__ import annotations

import logging

import timm
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import EntryNotFoundError
from timm.models import parse_model_name
from torch import nn

from kdexpand.io import load_safetensors
from kdexpand.recipe import RecipeError, TeacherConfig

__all__ = [
    "TeacherDownloadError",
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


class TeacherDownloadError(FileNotFoundError):
    """A failed download of the teacher's timm weights or config, with the fix in its message.

    It is a FileNotFoundError, as huggingface_hub's LocalEntryNotFoundError is, so
    ``kdexpand.train`` exits with status 1 on it.
    """


# Exceptions of a failed download. huggingface_hub (2.x) raises OSError subclasses for network,
# offline-mode and HTTP failures, except EntryNotFoundError. torch.hub, which timm uses for
# weights at a plain URL, raises urllib's URLError, an OSError too.
_DOWNLOAD_ERRORS = (OSError, EntryNotFoundError)


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
        TeacherDownloadError: The pretrained weights, or the config of an ``hf-hub:`` or
            ``local-dir:`` model name, could not be downloaded or read.
    """
    if config.checkpoint is not None:
        check_teacher_checkpoint(config)
        teacher = _create_model(config, num_classes, in_channels)
        _load_checked(teacher, config, num_classes)
        logger.info("teacher %s loaded from %s", config.model, config.checkpoint)
    else:
        # NOTE: only the failed download has been run (offline, where it raises
        # TeacherDownloadError). On success timm puts a new random classifier on top when
        # num_classes differs from the pretrained head, which needs fine-tuning before it can teach.
        teacher = _create_model(config, num_classes, in_channels)
        logger.info("teacher %s with timm pretrained weights", config.model)

    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _create_model(config: TeacherConfig, num_classes: int, in_channels: int) -> nn.Module:
    """Create the timm model; with ``config.pretrained`` timm downloads its weights.

    Raises:
        TeacherDownloadError: The pretrained weights, or the config of an ``hf-hub:`` or
            ``local-dir:`` model name, could not be downloaded or read.
    """
    try:
        return timm.create_model(
            config.model, pretrained=config.pretrained, num_classes=num_classes, in_chans=in_channels,
            **config.kwargs,
        )
    except _DOWNLOAD_ERRORS as error:
        raise TeacherDownloadError(_download_failure(config, error)) from error


def _download_failure(config: TeacherConfig, error: Exception) -> str:
    """Build the one-line error for a failed download, with its root cause and the fix."""
    reason = _root_cause(error)
    source, folder = parse_model_name(config.model)
    if source == "local-dir":
        return (
            f"teacher.model={config.model}: failed to load the timm model in {folder} ({reason}); "
            "fix the folder path, or use a timm model name such as resnet18"
        )
    online = "run online with HF_HUB_OFFLINE unset" if hub_constants.HF_HUB_OFFLINE else "run online"
    if config.pretrained:
        return (
            f"teacher.pretrained=true: failed to download the timm weights of {config.model} ({reason}); "
            f"set teacher.checkpoint to a local safetensors file and teacher.pretrained=false, or {online}"
        )
    return (
        f"teacher.model={config.model}: failed to download its timm config ({reason}); "
        f"use a timm model name such as resnet18, or {online}"
    )


def _root_cause(error: BaseException) -> str:
    """Return the innermost cause of ``error`` as ``Type: first sentence``, on one line."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    first_sentence = " ".join(str(error).split()).split(". ")[0].rstrip(".")
    return f"{type(error).__name__}: {first_sentence}"


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

