"""Typed recipe schema: every key a run reads, with its type, default and range.

Every section rejects unknown keys (``extra="forbid"``) and infinite or NaN floats, so a typo
or a non-finite value fails before any work starts. The loader in :mod:`kdexpand.recipe.loader`
turns pydantic's errors into one line per problem with the dotted key path and the closest
valid key.
"""

from __future__ import annotations

import math
from pathlib import Path
import types
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from kdexpand.losses import LOSSES, validate_loss_params
from kdexpand.registry import closest_match

__all__ = [
    "AnalysisConfig",
    "AugmentConfig",
    "DataConfig",
    "DistillConfig",
    "ExpandConfig",
    "HintStageConfig",
    "InitConfig",
    "LossTermConfig",
    "OutputConfig",
    "Recipe",
    "StrictModel",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "TwinConfig",
]


class StrictModel(BaseModel):
    """Base of every recipe section: unknown keys and non-finite floats are errors.

    Values are also checked on assignment.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _reject_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1, so "epochs: true" would train one epoch.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _is_number(annotation):
            raise ValueError(f"expected a number, got the boolean {str(value).lower()}; write the number itself")
        if isinstance(value, list) and any(isinstance(item, bool) for item in value) and _is_number_list(annotation):
            raise ValueError(f"expected a list of numbers, got booleans in {value}; write the numbers themselves")
        if isinstance(value, dict) and _is_mapping(annotation):
            _reject_non_finite(value)
        return value


def _is_mapping(annotation: Any) -> bool:
    """Return True for a free-form mapping such as ``dict[str, Any]``, also optional."""
    return any(get_origin(member) is dict for member in _union_members(annotation))


def _reject_non_finite(mapping: dict[str, Any]) -> None:
    """Raise a ValueError naming the first infinite or NaN float inside ``mapping``.

    ``allow_inf_nan=False`` covers the typed float fields. Free-form mappings (model
    ``kwargs``, loss ``params``) pass their values through untyped, so they are searched here.
    """
    found = _find_non_finite(mapping, "", set())
    if found is not None:
        key, number = found
        # The message must not start with the key, or the loader would print it without the field name.
        raise ValueError(f"value {number} at {key} is not a finite number; write a finite number")


def _find_non_finite(value: Any, path: str, visited: set[int]) -> tuple[str, float] | None:
    """Return the dotted path and value of the first inf or NaN float in nested mappings and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    # A recursive YAML anchor makes a container that contains itself.
    if id(value) in visited:
        return None
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    visited.add(id(value))
    for key, item in items:
        found = _find_non_finite(item, f"{path}.{key}" if path else str(key), visited)
        if found is not None:
            return found
    return None


def _union_members(annotation: Any) -> list[Any]:
    """Return the members of ``X | Y | None`` other than None, or ``[annotation]`` for a non-union."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [member for member in get_args(annotation) if member is not type(None)]
    return [annotation]


def _is_number(annotation: Any) -> bool:
    """Return True for ``int`` or ``float``, also constrained (``PositiveInt``) or optional."""
    members = _union_members(annotation)
    if len(members) > 1:
        return all(_is_number(member) for member in members)
    annotation = members[0]
    if get_origin(annotation) is Annotated:
        return _is_number(get_args(annotation)[0])
    return annotation in (int, float)


def _is_number_list(annotation: Any) -> bool:
    """Return True for a list or tuple of numbers, also optional (``list[PositiveInt] | None``)."""
    return any(
        get_origin(member) in (list, tuple)
        and all(_is_number(item) for item in get_args(member) if item is not Ellipsis)
        for member in _union_members(annotation)
    )


class AugmentConfig(StrictModel):
    """Training-time batch augmentation, applied on the training device."""

    random_crop_padding: int = Field(4, ge=0)
    horizontal_flip: bool = True


class DataConfig(StrictModel):
    """Dataset location, splits and preprocessing.

    The location is resolved in this order: ``root``; ``$KDEXPAND_DATA/<name>``;
    ``./data/<name>``; the Hugging Face hub dataset ``hub_id``. A local folder must hold
    ``<split>.parquet`` files with the image and label columns.

    Split sizes: ``val_size`` images are held out of the train split for model selection.
    ``train_limit`` keeps only the first N images of the train split and shrinks the held-out
    part in proportion (``round(val_size * N / len(train split))``, at least one image), so
    ``train_limit`` alone gives a small consistent run. ``eval_limit`` keeps only the first N
    images of the validation and test splits.
    """

    name: str = Field(min_length=1)
    root: Path | None = None
    hub_id: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    image_column: str = "img"
    label_column: str = "label"
    val_size: int = Field(5000, ge=0)
    train_limit: PositiveInt | None = None
    eval_limit: PositiveInt | None = None
    mean: tuple[float, float, float]
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat]
    augment: AugmentConfig = AugmentConfig()
    eval_batch_size: PositiveInt = 500
    cache: bool = True


class StudentConfig(StrictModel):
    """The compact network to train, built by name from :data:`kdexpand.models.MODELS`."""

    model: str = Field(min_length=1)
    kwargs: dict[str, Any] = {}

    @field_validator("kwargs")
    @classmethod
    def _reject_data_arguments(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        # build_model passes these from the dataset, so a second value would clash.
        clashing = sorted(set(kwargs) & {"num_classes", "in_channels", "image_size"})
        if clashing:
            raise ValueError(
                f"{', '.join(clashing)} must not be set here, because the dataset sets them "
                "(classes, image channels and size); remove them from student.kwargs"
            )
        return kwargs


class ExpandConfig(StrictModel):
    """Arguments of :func:`kdexpand.expand`, plus the contraction check's tolerance.

    With ``conv: null`` and ``fc: false`` nothing is expanded and the student trains as is.
    ``verify_tolerance`` bounds the contraction check: the maximum absolute difference
    between expanded and contracted logits on a validation batch must not exceed
    ``verify_tolerance * max(1, max |expanded logits|)``.
    """

    conv: Literal["cl", "ck", "acnet"] | None = None
    fc: bool = False
    rate: PositiveFloat = 4.0
    fc_rate: PositiveFloat | None = None
    include: list[str] | None = None
    exclude: list[str] | None = None
    mode: Literal["collapsed", "sequential"] = "collapsed"
    fallback: Literal["cl"] | None = None
    pointwise: bool = False
    verify_tolerance: PositiveFloat = 1e-4

    @property
    def enabled(self) -> bool:
        """Whether this section expands any layer."""
        return self.conv is not None or self.fc


class TeacherConfig(StrictModel):
    """A frozen timm teacher.

    Exactly one source of weights: ``checkpoint`` (a local safetensors file, typically the
    ``compact.safetensors`` of a teacher run) or ``pretrained: true`` (timm's hub weights,
    which needs network access). ``recipe`` names the teacher recipe that writes
    ``checkpoint``, so a missing checkpoint error can print the command that creates it.

    ``model`` is a name from ``timm.list_models()``, optionally with a pretrained tag
    (``resnet18.a1_in1k``), or an ``hf-hub:`` or ``local-dir:`` name. timm resolves the
    latter only when the teacher is built.
    """

    model: str = Field(min_length=1)
    checkpoint: Path | None = None
    pretrained: bool = False
    recipe: Path | None = None
    kwargs: dict[str, Any] = {}

    @field_validator("model")
    @classmethod
    def _check_timm_model(cls, model: str) -> str:
        # Imported here because only recipes with a teacher need timm.
        import timm
        from timm.models import parse_model_name

        # parse_model_name raises a ValueError for a hub id or a path without a source prefix.
        source, _ = parse_model_name(model)
        if source is not None:
            return model
        if not timm.is_model(model):
            raise ValueError(_unknown_timm_model(model, timm.list_models()))
        return model

    @model_validator(mode="after")
    def _one_weight_source(self) -> TeacherConfig:
        if (self.checkpoint is None) == (not self.pretrained):
            raise ValueError(
                "set exactly one weight source: teacher.checkpoint (local safetensors file) "
                "or teacher.pretrained: true (timm hub weights)"
            )
        return self


def _unknown_timm_model(model: str, names: list[str]) -> str:
    """Build the error for a name that is not in timm's model registry, with the closest name."""
    # timm's names are lower case, so "ResNet18" is compared as "resnet18".
    hint = closest_match(model.lower(), names)
    if hint is None:
        return f"unknown timm model {model!r}; use a name from timm.list_models()"
    return f"unknown timm model {model!r}; did you mean {hint!r}?"


class LossTermConfig(StrictModel):
    """One weighted knowledge-transfer term.

    ``name`` is a loss of :data:`kdexpand.losses.LOSSES` and ``params`` its parameters,
    both checked here. ``student`` and ``teacher`` name tap points (dotted module names of
    the compact student and of the teacher) for feature-based terms; logit-based terms
    such as ``kd`` leave them unset. The recipe checks that the tapped modules exist.
    """

    name: str = Field(min_length=1)
    weight: float = Field(1.0, ge=0)
    params: dict[str, Any] = {}
    student: str | None = None
    teacher: str | None = None

    @model_validator(mode="after")
    def _check_loss(self) -> LossTermConfig:
        if self.name not in LOSSES:
            raise ValueError(LOSSES.unknown_message(self.name))
        try:
            validate_loss_params(self.name, self.params)
        except ValidationError as error:
            problems = "; ".join(
                f"params.{'.'.join(str(part) for part in item['loc'])}: {item['msg']}".replace("params.: ", "params: ")
                for item in error.errors()
            )
            valid = ", ".join(LOSSES.get(self.name).Params.model_fields) or "none"
            raise ValueError(f"loss {self.name!r}: {problems} (valid parameters: {valid})") from None

        input_kind = LOSSES.get(self.name).input_kind
        if input_kind == "logits" and (self.student or self.teacher):
            raise ValueError(f"loss {self.name!r} compares logits and takes no student/teacher tap; remove them")
        if input_kind == "features" and not (self.student and self.teacher):
            raise ValueError(
                f"loss {self.name!r} compares features and needs both taps, e.g. student: features.7 "
                "and teacher: layer3 (dotted module names)"
            )
        return self


class HintStageConfig(StrictModel):
    """Stage 1 of two-stage FitNets training (Romero et al., ICLR 2015).

    For the first ``epochs`` epochs of ``train.epochs`` the loss is the weighted sum of
    ``losses`` alone (feature terms such as ``hint``), so only the student layers below the
    tapped modules and the terms' regressors are trained. The remaining epochs use the
    ``distill`` objective. The optimizer and learning-rate schedule run across both stages.
    """

    epochs: PositiveInt
    losses: list[LossTermConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_feature_terms(self) -> HintStageConfig:
        logit_terms = [term.name for term in self.losses if LOSSES.get(term.name).input_kind == "logits"]
        if logit_terms:
            raise ValueError(
                f"hint_stage.losses may only hold feature terms, got logit terms {logit_terms}; "
                "move them to distill.losses"
            )
        return self


class DistillConfig(StrictModel):
    """The training loss: ``ce_weight * task loss + sum(weight_i * term_i)``.

    ``hint_stage`` prepends the FitNets hint stage; without it training has one stage.
    """

    ce_weight: float = Field(1.0, ge=0)
    losses: list[LossTermConfig] = []
    hint_stage: HintStageConfig | None = None

    def all_terms(self) -> list[tuple[str, LossTermConfig]]:
        """Return ``(key path, term)`` for every term of both stages, hint stage first."""
        terms = []
        if self.hint_stage is not None:
            terms += [(f"hint_stage.losses.{i}", term) for i, term in enumerate(self.hint_stage.losses)]
        return terms + [(f"losses.{i}", term) for i, term in enumerate(self.losses)]


class TrainConfig(StrictModel):
    """Optimizer, schedule, precision and seeding.

    ``batch_size`` is per process and per optimizer step before accumulation; the effective
    batch is ``batch_size * processes * grad_accum_steps``. ``milestones`` are epochs at which
    the step schedule multiplies the learning rate by ``gamma``. ``on_nonfinite`` sets what a
    NaN or infinite loss does. ``stop`` ends the run and names the step, the loss terms and the
    last good checkpoint. ``skip`` logs a warning, runs no backward pass for that batch and
    skips the optimizer step of its whole accumulation window.
    """

    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "step"
    milestones: list[PositiveInt] = []
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum_steps: PositiveInt = 1
    max_grad_norm: PositiveFloat | None = None
    seed: int = Field(0, ge=0, le=2**32 - 1)
    deterministic: bool = False
    log_every: PositiveInt = 50
    on_nonfinite: Literal["stop", "skip"] = "stop"

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainConfig:
        if self.schedule == "step" and not self.milestones:
            raise ValueError(
                "schedule 'step' needs train.milestones (epochs at which lr is multiplied by "
                "gamma), e.g. [50, 100]; or use schedule: constant"
            )
        if self.milestones != sorted(set(self.milestones)):
            raise ValueError(f"train.milestones must increase strictly, got {self.milestones}")
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.warmup_epochs} must be < train.epochs={self.epochs}"
            )
        return self


# TrainConfig fields that the twin stage may set; unset ones take the value of ``train``.
TWIN_TRAIN_KEYS = (
    "epochs", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones", "gamma", "warmup_epochs",
)


class TwinConfig(StrictModel):
    """The nonlinear twin that initializes the linear ExpandNet.

    The twin is the ExpandNet of the ``expand`` section with a ReLU after every sub-layer but
    the last of each unit. It is trained first, and its best-validation weights are copied
    into the linear ExpandNet, which then trains with ``train`` and ``distill`` as usual.

    The optimizer and schedule keys (:data:`TWIN_TRAIN_KEYS`) mean what they mean in
    ``train``; an unset key takes its value from ``train``. Batch size, precision, gradient
    accumulation, clipping and seed are always those of ``train``. ``distill`` is the twin
    stage's loss; by default it is the task loss alone, so the top-level ``distill``
    section applies to the linear stage only.

    ``keep``: ``always`` uses the twin's weights. ``if_better`` also trains the plain linear
    ExpandNet from the same initial weights with the twin's settings and keeps the twin's
    weights only when the twin's best validation score is strictly higher. Otherwise the
    linear stage starts from the initial weights, as a run without ``init`` would.
    """

    epochs: PositiveInt
    lr: PositiveFloat | None = None
    momentum: float | None = Field(None, ge=0, lt=1)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0)
    schedule: Literal["constant", "step", "cosine"] | None = None
    milestones: list[PositiveInt] | None = None
    gamma: float | None = Field(None, gt=0, le=1)
    warmup_epochs: int | None = Field(None, ge=0)
    distill: DistillConfig = DistillConfig()
    keep: Literal["always", "if_better"] = "always"

    def train_config(self, train: TrainConfig) -> TrainConfig:
        """Return the twin stage's training settings: ``train`` with this section's keys set.

        Raises:
            ValueError: The merged settings are invalid (e.g. warm-up not shorter than ``epochs``).
        """
        update = self.model_dump(include=set(TWIN_TRAIN_KEYS), exclude_none=True)
        try:
            return TrainConfig.model_validate({**train.model_dump(), **update})
        except ValidationError as error:
            # The merged settings are the twin's, so the messages name the init.twin keys.
            problems = "; ".join(
                item["msg"].removeprefix("Value error, ").replace("train.", "init.twin.") for item in error.errors()
            )
            raise ValueError(f"{problems} (unset init.twin keys take their value from train)") from None


class InitConfig(StrictModel):
    """Initialization of the linear ExpandNet before training; without this section it starts from random weights."""

    twin: TwinConfig


class AnalysisConfig(StrictModel):
    """Measurements taken during training that leave the training itself unchanged.

    ``gradient_confusion_batches``: after every epoch, the pairwise cosine similarities of
    the task-loss gradients of that many training mini-batches (not augmented) are measured,
    and their minimum and mean are logged (see :mod:`kdexpand.analysis.gradients`). 0 turns
    the measurement off. It costs one forward and backward pass per mini-batch and keeps
    that many gradient copies in memory.
    """

    gradient_confusion_batches: int = Field(0, ge=0)

    @field_validator("gradient_confusion_batches")
    @classmethod
    def _check_batches(cls, batches: int) -> int:
        if batches == 1:
            raise ValueError("one mini-batch has no pair to compare; use 0 (off) or at least 2, e.g. 15 for 105 pairs")
        return batches


class OutputConfig(StrictModel):
    """Run directory location and optional outputs.

    ``dir`` defaults to ``runs/<recipe name>`` relative to the working directory.
    """

    dir: Path | None = None
    onnx: bool = False
    tensorboard: bool = True


class Recipe(StrictModel):
    """A complete, validated run description."""

    name: str = Field(min_length=1)
    task: str = "classification"
    data: DataConfig
    student: StudentConfig
    expand: ExpandConfig = ExpandConfig()
    teacher: TeacherConfig | None = None
    distill: DistillConfig = DistillConfig()
    train: TrainConfig
    init: InitConfig | None = None
    analysis: AnalysisConfig = AnalysisConfig()
    output: OutputConfig = OutputConfig()

    @field_validator("task")
    @classmethod
    def _check_task(cls, task: str) -> str:
        # Imported here because the tasks import the recipe package.
        from kdexpand.tasks import TASKS

        if task not in TASKS:
            raise ValueError(TASKS.unknown_message(task))
        return task

    @model_validator(mode="after")
    def _check_distill(self) -> Recipe:
        if self.distill.losses and self.teacher is None:
            names = [term.name for term in self.distill.losses]
            raise ValueError(
                f"distill.losses {names} need a teacher; add a teacher section or set "
                "distill.losses: []"
            )
        if not self.distill.losses and self.distill.ce_weight == 0:
            raise ValueError("distill.ce_weight is 0 and distill.losses is empty: no loss to train")
        hint_stage = self.distill.hint_stage
        twin_hint_stage = self.init.twin.distill.hint_stage if self.init is not None else None
        if (hint_stage is not None or twin_hint_stage is not None) and self.teacher is None:
            raise ValueError("distill.hint_stage needs a teacher; add a teacher section or remove hint_stage")
        if hint_stage is not None and hint_stage.epochs >= self.train.epochs:
            raise ValueError(
                f"distill.hint_stage.epochs={hint_stage.epochs} must be < train.epochs={self.train.epochs}, "
                "because the hint stage is the start of training; raise train.epochs"
            )
        if twin_hint_stage is not None and twin_hint_stage.epochs >= self.init.twin.epochs:
            raise ValueError(
                f"init.twin.distill.hint_stage.epochs={twin_hint_stage.epochs} must be < "
                f"init.twin.epochs={self.init.twin.epochs}; raise init.twin.epochs"
            )
        return self

    @model_validator(mode="after")
    def _check_taps(self) -> Recipe:
        # Imported here because kdexpand.distill imports this module.
        from kdexpand.distill import check_tap_names

        check_tap_names(self)
        return self

    @model_validator(mode="after")
    def _check_init(self) -> Recipe:
        if self.init is None:
            return self
        twin = self.init.twin
        if not self.expand.enabled:
            raise ValueError(
                "init.twin needs an expanded student, but expand.conv is null and expand.fc is false; "
                "set expand.conv: cl or ck, or expand.fc: true"
            )
        if self.expand.conv == "acnet":
            raise ValueError(
                "init.twin: ACNet branches are parallel, so they have no nonlinear twin; use expand.conv: cl or ck"
            )
        if twin.distill.losses and self.teacher is None:
            names = [term.name for term in twin.distill.losses]
            raise ValueError(f"init.twin.distill.losses {names} need a teacher; add a teacher section")
        if not twin.distill.losses and twin.distill.ce_weight == 0:
            raise ValueError("init.twin.distill.ce_weight is 0 and its losses are empty: no loss to train the twin")
        twin.train_config(self.train)
        return self

    @property
    def run_dir(self) -> Path:
        """The run directory: ``output.dir``, else ``runs/<name>``."""
        return self.output.dir if self.output.dir is not None else Path("runs") / self.name
