"""The training objective: the task loss plus weighted knowledge-transfer terms.

``total = ce_weight * task_loss(student, targets) + sum_i weight_i * term_i``

Each term is a registered :class:`~kdexpand.losses.base.TransferLoss`. Logit terms (``kd``,
``dkd``) compare the student's and the teacher's outputs. Feature terms (``hint``, ``pkt``,
``at``, ``rkd``, ``sp``) compare the outputs of two tapped modules, named in the recipe by
their dotted module names in the compact student and in the teacher. The distiller records
those outputs with forward hooks (:class:`~kdexpand.taps.FeatureTaps`) while the forward
passes run inside :meth:`Distiller.capture`.

Two-stage FitNets training (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015)
runs when ``distill.hint_stage`` is set. For its first ``hint_stage.epochs`` epochs the total
loss is the weighted sum of the hint-stage terms alone, so only the student layers below the
tapped modules and the regressors train. The distiller sets ``requires_grad=False`` on the
other student parameters for those epochs, so they get no gradient, no weight decay and no
momentum update. Under DDP this also needs ``find_unused_parameters=True``, which the
trainer sets for recipes with a hint stage. The remaining epochs use the objective above.
A ``hint`` term in ``distill.losses`` instead gives the one-stage joint form.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import timm
import torch
from torch import nn

from kdexpand.losses import TransferLoss, build_loss
from kdexpand.models import build_model
from kdexpand.recipe import DistillConfig, Recipe
from kdexpand.registry import closest_match
from kdexpand.taps import FeatureTaps, resolve_tap_modules

__all__ = ["Distiller", "LossTerm", "Stage", "check_tap_names"]

logger = logging.getLogger(__name__)

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Stage = Literal["hint", "main"]


@dataclass(frozen=True)
class LossTerm:
    """One weighted transfer term, its stage and where its inputs come from.

    Attributes:
        name: Registered loss name.
        key: Name of the term in the returned loss parts and in the logs.
        weight: Factor of the term in the total loss.
        stage: ``"hint"`` for a FitNets stage-1 term, ``"main"`` for the training objective.
        params: The loss parameters from the recipe.
        student_tap: Student module whose output feeds a feature term.
        teacher_tap: Teacher module whose output feeds a feature term.
    """

    name: str
    key: str
    weight: float
    stage: Stage
    params: Mapping[str, Any] = field(compare=False)
    student_tap: str | None = None
    teacher_tap: str | None = None

    @property
    def uses_features(self) -> bool:
        """Whether the term reads tapped features rather than logits."""
        return self.student_tap is not None


def _terms(config: DistillConfig) -> list[LossTerm]:
    """List the terms of both stages, hint stage first, with unique log keys.

    A main-stage key is the loss name, or ``name.index`` when the loss appears more than
    once in the list. Hint-stage keys carry the prefix ``hint_stage.``.
    """
    stages: list[tuple[Stage, str, list]] = []
    if config.hint_stage is not None:
        stages.append(("hint", "hint_stage.", config.hint_stage.losses))
    stages.append(("main", "", config.losses))

    terms = []
    for stage, prefix, entries in stages:
        for index, entry in enumerate(entries):
            repeated = sum(other.name == entry.name for other in entries) > 1
            key = prefix + (f"{entry.name}.{index}" if repeated else entry.name)
            terms.append(
                LossTerm(entry.name, key, entry.weight, stage, entry.params, entry.student, entry.teacher)
            )
    return terms


def check_tap_names(recipe: Recipe) -> None:
    """Raise ValueError when a feature term taps a module that the student or teacher lacks.

    The compact student and the teacher are built on the meta device, which allocates no
    memory, and their ``named_modules()`` are the valid tap names. Expansion keeps every
    name, so the same names are valid on the ExpandNet and its nonlinear twin.

    Raises:
        ValueError: A tap names no module; the message lists the valid names.
    """
    sections = [("distill", recipe.distill)]
    if recipe.init is not None:
        sections.append(("init.twin.distill", recipe.init.twin.distill))
    tapped = [
        (f"{section}.{path}", term)
        for section, config in sections
        for path, term in config.all_terms()
        if term.student is not None or term.teacher is not None
    ]
    if not tapped or recipe.teacher is None:
        return
    # NOTE: only classification students are built here; other tasks build their models
    # differently, and their tap names are checked when training starts.
    if recipe.task != "classification":
        return

    student, teacher = _build_on_meta_device(recipe)
    for where, term in tapped:
        for role, model, name in (("student", student, term.student), ("teacher", teacher, term.teacher)):
            if name is None:
                continue
            try:
                resolve_tap_modules(model, [name], role)
            except KeyError as error:
                raise ValueError(f"{where}.{role}: {error.args[0]}") from None


def _build_on_meta_device(recipe: Recipe) -> tuple[nn.Module, nn.Module]:
    """Build the compact student and the teacher without memory, for their module names.

    Raises:
        ValueError: A model name is unknown or its keyword arguments do not fit it.
    """
    assert recipe.teacher is not None, "tap names are checked only for recipes with a teacher"
    if not timm.is_model(recipe.teacher.model):
        hint = closest_match(recipe.teacher.model, timm.list_models())
        did_you_mean = f" Did you mean {hint!r}?" if hint else ""
        raise ValueError(f"teacher.model {recipe.teacher.model!r} is not a timm model.{did_you_mean}")
    # Module names depend on neither the class count nor the image size, so defaults serve.
    with torch.device("meta"):
        try:
            student = build_model(recipe.student.model, 10, **recipe.student.kwargs)
        except (KeyError, TypeError, ValueError) as error:
            reason = error.args[0] if isinstance(error, KeyError) else error
            raise ValueError(f"student: cannot build {recipe.student.model!r}: {reason}") from None
        try:
            teacher = timm.create_model(recipe.teacher.model, pretrained=False, **recipe.teacher.kwargs)
        except TypeError as error:
            raise ValueError(f"teacher.kwargs do not fit {recipe.teacher.model!r}: {error}") from None
    return student, teacher


@contextmanager
def _eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put ``models`` in eval mode inside the block and restore their modes after it."""
    modes = [model.training for model in models]
    for model in models:
        model.eval()
    try:
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)


class Distiller(nn.Module):
    """Combine the task loss with the recipe's transfer terms.

    The distiller is an ``nn.Module`` so that the trainable parts of terms (hint regressors)
    belong to it. The trainer optimizes them with the student and saves them in each
    checkpoint's ``distiller.safetensors``. They are never part of the exported student.

    Feature terms need the models and an example input: the distiller hooks the tapped
    modules and runs one eval-mode probe pass without gradients to size the regressors.
    Run each training step's forward passes inside :meth:`capture`.

    Args:
        config: The recipe's ``distill`` section.
        task_loss: The task's hard-label loss, e.g. cross-entropy on logits.
        student: The model being trained (compact or expanded); needed by feature terms.
        teacher: The frozen teacher; needed by feature terms.
        example_input: An input batch for the probe pass; needed by feature terms.

    Raises:
        KeyError: A term names an unregistered loss, or a tap names no module.
        ValueError: A feature term is configured without the models and the example input.
    """

    def __init__(
        self,
        config: DistillConfig,
        task_loss: TaskLoss,
        student: nn.Module | None = None,
        teacher: nn.Module | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.ce_weight = config.ce_weight
        self.task_loss = task_loss
        self.terms = _terms(config)
        self.hint_epochs = config.hint_stage.epochs if config.hint_stage is not None else 0
        self.stage: Stage = "hint" if self.hint_epochs > 0 else "main"
        self._captured = False
        self._student_taps: FeatureTaps | None = None
        self._teacher_taps: FeatureTaps | None = None
        # Student parameters that no hint-stage tap depends on; frozen during the hint stage.
        self._upper_parameters: list[nn.Parameter] = []

        shapes: dict[tuple[str, str], torch.Size] = {}
        if any(term.uses_features for term in self.terms):
            shapes = self._attach_taps(student, teacher, example_input)
        if self.hint_epochs > 0:
            assert student is not None and example_input is not None, "hint terms passed without models"
            self._upper_parameters = self._find_upper_parameters(student, example_input)
        self.losses = nn.ModuleList()
        for term in self.terms:
            student_shape = shapes.get(("student", term.student_tap or ""))
            teacher_shape = shapes.get(("teacher", term.teacher_tap or ""))
            self.losses.append(build_loss(term.name, term.params, student_shape, teacher_shape))

        if self.hint_epochs > 0:
            logger.info("loss, epochs 1-%d (hint stage) = %s", self.hint_epochs, self.describe("hint"))
        logger.info("loss = %s", self.describe("main"))

    def _attach_taps(
        self,
        student: nn.Module | None,
        teacher: nn.Module | None,
        example_input: torch.Tensor | None,
    ) -> dict[tuple[str, str], torch.Size]:
        """Hook the tapped modules and return each tap's per-sample feature shape."""
        if student is None or teacher is None or example_input is None:
            keys = [term.key for term in self.terms if term.uses_features]
            raise ValueError(
                f"feature terms {keys} need the models to tap and a probe input; pass "
                "student=, teacher= and example_input= to Distiller"
            )
        student_names = sorted({term.student_tap for term in self.terms if term.student_tap})
        teacher_names = sorted({term.teacher_tap for term in self.terms if term.teacher_tap})
        self._student_taps = FeatureTaps(student, student_names, role="student")
        self._teacher_taps = FeatureTaps(teacher, teacher_names, role="teacher")
        self._set_taps_enabled(False)

        # Eval mode and no gradients: the probe pass leaves batch-norm statistics untouched.
        with torch.no_grad(), _eval_mode(student, teacher):
            self._set_taps_enabled(True)
            student(example_input)
            teacher(example_input)
            self._set_taps_enabled(False)
        student_features = self._student_taps.pop()
        teacher_features = self._teacher_taps.pop()

        shapes = {("student", name): value.shape[1:] for name, value in student_features.items()}
        shapes |= {("teacher", name): value.shape[1:] for name, value in teacher_features.items()}
        for (role, name), shape in sorted(shapes.items()):
            logger.info("%s tap %s: per-sample shape %s", role, name, tuple(shape))
        return shapes

    def _find_upper_parameters(self, student: nn.Module, example_input: torch.Tensor) -> list[nn.Parameter]:
        """Return the trainable student parameters that no hint-stage tap depends on.

        One eval-mode probe pass with gradients: a parameter outside the autograd graph of
        every hint-stage tap gets no gradient from ``torch.autograd.grad``.
        """
        assert self._student_taps is not None and self._teacher_taps is not None
        names = {term.student_tap for term in self.terms if term.stage == "hint"}
        parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
        with torch.enable_grad(), _eval_mode(student):
            self._student_taps.enabled = True
            student(example_input)
            self._student_taps.enabled = False
            features = self._student_taps.pop()
            probe = sum(features[name].float().sum() for name in sorted(names))
            gradients = torch.autograd.grad(probe, parameters, allow_unused=True)
        upper = [parameter for parameter, gradient in zip(parameters, gradients) if gradient is None]
        logger.info(
            "hint stage trains %d of %d student parameter tensors (those below the taps %s)",
            len(parameters) - len(upper), len(parameters), ", ".join(sorted(names)),
        )
        return upper

    def describe(self, stage: Stage) -> str:
        """Return the total loss of ``stage`` as a weighted sum, e.g. ``0.1 * task + 0.9 * kd``."""
        parts = [f"{term.weight:g} * {term.key}" for term in self.terms if term.stage == stage]
        if stage == "main":
            parts.insert(0, f"{self.ce_weight:g} * task")
        return " + ".join(parts)

    def _stage_uses_features(self) -> bool:
        return any(term.uses_features for term in self.terms if term.stage == self.stage)

    @property
    def needs_teacher(self) -> bool:
        """Whether a term of the current stage needs the teacher's outputs or features."""
        return any(term.stage == self.stage for term in self.terms)

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        """Select the stage of epoch ``epoch`` (0-based) and pass the epoch to every term."""
        stage: Stage = "hint" if epoch < self.hint_epochs else "main"
        if stage != self.stage:
            logger.info("epoch %d starts the %s stage: loss = %s", epoch + 1, stage, self.describe(stage))
        self.stage = stage
        for parameter in self._upper_parameters:
            parameter.requires_grad_(stage != "hint")
        for loss in self.losses:
            loss.set_epoch(epoch, num_epochs)

    def _set_taps_enabled(self, enabled: bool) -> None:
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.enabled = enabled

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the tapped features of the forward passes run inside the block.

        Run a training step's student and teacher forward passes inside this block, then
        call the distiller. The taps record only inside the block and only when a term of
        the current stage reads features, so evaluation passes leave nothing behind.
        """
        for taps in (self._student_taps, self._teacher_taps):
            if taps is not None:
                taps.clear()
        self._set_taps_enabled(self._stage_uses_features())
        try:
            yield
        finally:
            self._set_taps_enabled(False)
            self._captured = True

    def _pop_features(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Hand over the captured features of the current step; empty when no term reads any."""
        captured, self._captured = self._captured, False
        if not self._stage_uses_features():
            return {}, {}
        if not captured:
            raise RuntimeError(
                "feature terms read tapped features, but the forward passes ran outside "
                "Distiller.capture(); wrap the student and teacher forward passes in it"
            )
        assert self._student_taps is not None and self._teacher_taps is not None
        return self._student_taps.pop(), self._teacher_taps.pop()

    def forward(
        self,
        student_outputs: torch.Tensor,
        targets: torch.Tensor,
        teacher_outputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the total loss of the current stage and each unweighted part.

        The parts are ``task`` and one entry per term of the current stage. In the hint
        stage ``task`` is reported for monitoring only and is not part of the total.

        Raises:
            ValueError: A logit term runs without ``teacher_outputs``.
            RuntimeError: A feature term runs but the forward passes were not captured.
        """
        student_features, teacher_features = self._pop_features()
        parts = {"task": self.task_loss(student_outputs, targets)}
        total = self.ce_weight * parts["task"] if self.stage == "main" else 0.0
        for term, loss in zip(self.terms, self.losses):
            if term.stage != self.stage:
                continue
            if term.uses_features:
                student_input = student_features[term.student_tap]
                teacher_input = teacher_features[term.teacher_tap]
            elif teacher_outputs is None:
                raise ValueError(f"loss term {term.key!r} needs teacher outputs; pass teacher_outputs")
            else:
                student_input, teacher_input = student_outputs, teacher_outputs
            parts[term.key] = self._term_value(loss, student_input, teacher_input, targets)
            total = total + term.weight * parts[term.key]
        assert isinstance(total, torch.Tensor), "a stage without any loss term passed validation"
        return total, parts

    @staticmethod
    def _term_value(
        loss: TransferLoss, student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return loss(student, teacher, targets if loss.needs_targets else None)
