"""Checks that fail a run before its run directory is touched or any step is trained.

The recipe schema catches what a recipe file alone can show, tap names included. These
checks need the data and the models: empty splits, a batch larger than the training split,
an expansion that expands nothing, and values that the builders reject. Each raises a
:class:`~kdexpand.recipe.RecipeError` with one line that names the recipe key and the fix.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn

import kdexpand
from kdexpand.expansion import ExpandedLinear, ExpansionReport
from kdexpand.recipe import AnalysisConfig, ExpandConfig, Recipe, RecipeError, TrainConfig
from kdexpand.tasks import Task

__all__ = ["check_analysis", "check_expansion", "check_splits", "load_data_checked", "recipe_section"]

_CPU = torch.device("cpu")

# Recipe keys whose values each section passes to its constructors as keyword arguments.
_ARGUMENT_KEYS = {"student": "student.kwargs", "teacher": "teacher.kwargs", "distill": "the params of distill.losses"}


@contextmanager
def recipe_section(section: str) -> Iterator[None]:
    """Re-raise a KeyError, ValueError or TypeError from building ``section`` as a RecipeError.

    Building data, models, teachers and losses from the recipe raises these for values
    that the schema cannot judge (an unknown model name, a missing column, a bad keyword
    argument). The message gets ``section`` as its prefix unless it starts with a recipe key.
    """
    try:
        yield
    except RecipeError:
        raise
    except (KeyError, ValueError, TypeError) as error:
        text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
        text = " ".join(text.split())
        leading_key = re.match(r"([a-z_]+)[.:]", text)
        names_key = leading_key is not None and leading_key.group(1) in Recipe.model_fields
        message = text if names_key else f"{section}: {text}"
        if isinstance(error, TypeError):
            # A constructor rejected an argument that the recipe passed through.
            message += f"; check {_ARGUMENT_KEYS.get(section, section)}"
        raise RecipeError(message) from error


def load_data_checked(task: Task, accelerator: Accelerator) -> None:
    """Load the task's data, main process first, with recipe errors as in :func:`recipe_section`.

    A failure on the main process still lets it reach the barrier that the other processes
    wait at. They then load, fail the same way and raise too, instead of waiting forever.

    Raises:
        RecipeError: A data value is invalid (a missing column, an empty slice).
        FileNotFoundError: The dataset is not found.
    """
    failure: Exception | None = None
    with accelerator.main_process_first():
        try:
            with recipe_section("data"):
                task.load_data()
        except (RecipeError, FileNotFoundError) as error:
            failure = error
    if failure is not None:
        raise failure


def _first_batch(batches) -> object | None:
    return next(iter(batches), None)


def check_splits(task: Task, train: TrainConfig, world_size: int) -> None:
    """Check that every split has data and that a training batch can be filled.

    Raises:
        RecipeError: A split is empty, the validation split has fewer images than processes,
            or ``train.batch_size`` exceeds the training images of one process.
    """
    batches = task.train_batches(_CPU, 0, world_size)
    first = _first_batch(batches)
    if first is None:
        raise RecipeError(
            "data: the training split is empty; check data.train_split, data.train_limit and data.val_size"
        )
    if len(batches) == 1 and task.batch_size(first) < train.batch_size:
        raise RecipeError(
            f"train.batch_size={train.batch_size} is larger than the {task.batch_size(first)} training "
            f"images per process, so every step would see a smaller batch than the recipe sets; lower "
            "train.batch_size or raise data.train_limit"
        )
    for split, keys in (("val", "data.val_size and data.eval_limit"), ("test", "data.test_split and data.eval_limit")):
        if _first_batch(task.eval_batches(split, _CPU, 0, 1)) is None:
            raise RecipeError(f"data: the {split} split is empty, but the trainer needs it; check {keys}")
    if _first_batch(task.eval_batches("val", _CPU, world_size - 1, world_size)) is None:
        raise RecipeError(
            f"data: the validation split has fewer images than the {world_size} processes, so some "
            "would have none to check contraction on; raise data.val_size or data.eval_limit"
        )


def check_analysis(task: Task, config: AnalysisConfig) -> None:
    """Check that the training split has the mini-batches that the analysis measures on.

    Raises:
        RecipeError: ``analysis.gradient_confusion_batches`` exceeds the training batches.
    """
    requested = config.gradient_confusion_batches
    available = len(task.train_batches(_CPU, 0, 1))
    if requested > available:
        raise RecipeError(
            f"analysis.gradient_confusion_batches={requested} is more than the {available} training "
            "mini-batches; lower it, lower train.batch_size or raise data.train_limit"
        )


def check_expansion(config: ExpandConfig, expanded: nn.Module) -> None:
    """Reject an ``expand`` section that requests expansion but expands no layer of its kind.

    Raises:
        RecipeError: ``expand.conv`` is set and no convolution was expanded, or ``expand.fc``
            is true and no linear layer was expanded. The message quotes the report's reasons.
    """
    units = [unit for _, unit in kdexpand.expanded_units(expanded)]
    report = expanded.expansion_report
    if config.conv is not None and all(isinstance(unit, ExpandedLinear) for unit in units):
        reasons = _skip_reasons(report, "Conv2d")
        fix = (
            "set expand.fallback: cl to expand them with CL, or use expand.conv: cl"
            if config.conv in ("ck", "acnet") and config.fallback is None
            else "check expand.include / expand.exclude, or set expand.conv: null"
        )
        raise RecipeError(
            f"expand.conv={config.conv!r} expands no convolution of this model ({reasons or 'it has no Conv2d'}); {fix}"
        )
    if config.fc and not any(isinstance(unit, ExpandedLinear) for unit in units):
        reasons = _skip_reasons(report, "Linear")
        linear_decisions = [d for d in report.skipped if _is_layer_type(d.layer, "Linear")]
        only_unsupported = linear_decisions and all(d.detail.startswith("unsupported") for d in linear_decisions)
        fix = (
            "kdexpand expands only plain nn.Linear layers, so set expand.fc: false"
            if only_unsupported
            else "name the layers in expand.include, or set expand.fc: false"
        )
        raise RecipeError(
            f"expand.fc=true expands no linear layer of this model ({reasons or 'it has no Linear'}); {fix}"
        )


def _skip_reasons(report: ExpansionReport, layer_type: str) -> str:
    """Return why layers of ``layer_type`` were left alone, one entry per distinct reason."""
    names: dict[str, list[str]] = {}
    for decision in report.skipped:
        if _is_layer_type(decision.layer, layer_type):
            names.setdefault(decision.detail, []).append(decision.name)
    return "; ".join(f"{', '.join(layers)}: {detail}" for detail, layers in names.items())


def _is_layer_type(label: str, layer_type: str) -> bool:
    # A report label starts with the class name: "Conv2d 3→8 7x7 ...", "ParametrizedConv2d ...".
    return label.split(" ", 1)[0].endswith(layer_type)
