"""Set up a run: run directory, Accelerator, data, student, teacher, loss and optimizer."""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from torch import nn

import kdexpand
from kdexpand.distill import Distiller
from kdexpand.io import write_text
from kdexpand.recipe import ExpandConfig, Recipe, RecipeError, TrainConfig, dump_recipe
from kdexpand.tasks import Task, build_task
from kdexpand.teachers import build_teacher, check_teacher_checkpoint
from kdexpand.trainer.checkpoint import TrainState
from kdexpand.trainer.optim import build_optimizer, build_scheduler
from kdexpand.trainer.lock import MARKER_FILE, RunDirectoryLock, check_not_in_use
from kdexpand.trainer.preflight import check_analysis, check_expansion, check_splits, load_data_checked, recipe_section

__all__ = [
    "RunContext",
    "RunDirectoryError",
    "is_run_dir",
    "build_student",
    "check_inputs",
    "check_run_dir",
    "cpu_processes",
    "expand_model",
    "prepare_run_dir",
    "seed_augmentation",
    "setup_run",
]

logger = logging.getLogger(__name__)

# Files a run writes at its top level. --overwrite deletes only folders that contain
# recipe.yaml and one of RUN_MARKERS, so a user's folder that happens to hold a recipe.yaml is kept.
RECIPE_FILE = "recipe.yaml"
RUN_MARKERS = (MARKER_FILE, "checkpoints", "metrics.json")


class RunDirectoryError(FileExistsError):
    """The run directory does not fit the request: another run without --resume or --overwrite,
    a folder that is not a run with --overwrite, or no run with --resume."""


@dataclass
class RunContext:
    """Everything a training stage needs, built once per process.

    ``train`` is the training settings of the stage being trained: ``recipe.train``, or a
    pipeline stage's own settings. ``stage`` names a pipeline stage (e.g. ``"twin"``); it
    selects the checkpoint folder ``checkpoints/<stage>`` and prefixes TensorBoard tags with
    ``<stage>/``. It is None for a single-stage run.
    """

    recipe: Recipe
    train: TrainConfig
    run_dir: Path
    accelerator: Accelerator
    task: Task
    compact: nn.Module
    model: nn.Module
    teacher: nn.Module | None
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: Any
    train_batches: Any
    generator: torch.Generator
    state: TrainState = field(default_factory=TrainState)
    teacher_metrics: dict[str, float] = field(default_factory=dict)
    stage: str | None = None
    lock: RunDirectoryLock | None = None

    @property
    def checkpoint_dir(self) -> Path:
        folder = self.run_dir / "checkpoints"
        return folder if self.stage is None else folder / self.stage

    @property
    def log_prefix(self) -> str:
        """Prefix of this stage's TensorBoard tags: ``"<stage>/"``, or empty."""
        return "" if self.stage is None else f"{self.stage}/"

    @property
    def student(self) -> nn.Module:
        """The student without its distributed wrapper."""
        return self.accelerator.unwrap_model(self.model)


def is_run_dir(folder: Path) -> bool:
    """Return True when ``folder`` contains a recipe.yaml and one of :data:`RUN_MARKERS`, so kdexpand wrote it."""
    return (folder / RECIPE_FILE).is_file() and any((folder / marker).exists() for marker in RUN_MARKERS)


def _check_folder_path(run_dir: Path) -> None:
    """Reject an ``output.dir`` that is a file or lies inside a file."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(
            f"output.dir {run_dir} is a file, not a folder; set output.dir to a new folder path"
        )
    for parent in run_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise RunDirectoryError(
                f"output.dir {run_dir} lies inside {parent}, which is a file; set output.dir to a path "
                "whose parents are folders"
            )


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Check that the run directory fits ``resume`` / ``overwrite``, without changing anything.

    Raises:
        RunDirectoryError: ``run_dir`` is a file or lies inside one. Or the folder has content
            and neither flag is set, ``overwrite`` is set on a non-empty folder that is not a
            kdexpand run (see :func:`is_run_dir`), or ``resume`` is set on a folder without a run.
    """
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other; pass one")
    _check_folder_path(run_dir)
    check_not_in_use(run_dir)
    has_content = run_dir.is_dir() and any(run_dir.iterdir())
    if resume and not (run_dir / RECIPE_FILE).is_file():
        raise RunDirectoryError(
            f"--resume: {run_dir} contains no run ({RECIPE_FILE} not found); start without --resume, "
            "or set output.dir to the run's folder"
        )
    if has_content and overwrite and not is_run_dir(run_dir):
        raise RunDirectoryError(
            f"output.dir {run_dir} is not empty and lacks {RECIPE_FILE} or a run marker "
            f"({', '.join(RUN_MARKERS)}), so it is not a kdexpand run; refusing to delete it. "
            "Choose another output.dir"
        )
    if has_content and not (resume or overwrite):
        raise RunDirectoryError(
            f"run directory {run_dir} already exists; pass --resume to continue it, --overwrite "
            "to start over, or --set output.dir=... for a new one"
        )


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> RunDirectoryLock:
    """Create the run directory, or clear it with ``overwrite``, and lock it; main process only.

    Returns:
        The held lock of the directory; release it when the run ends.

    Raises:
        RunDirectoryError: See :func:`check_run_dir`.
        RunDirectoryBusy: Another run holds the directory.
    """
    check_run_dir(run_dir, resume, overwrite)
    previous = None
    if overwrite and run_dir.is_dir():
        # Holding the old run's lock while deleting keeps a run that starts meanwhile out.
        previous = RunDirectoryLock(run_dir).acquire() if (run_dir / MARKER_FILE).is_file() else None
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunDirectoryLock(run_dir).acquire()
    if previous is not None:
        previous.release()
    return lock


def build_student(recipe: Recipe, task: Task) -> tuple[nn.Module, nn.Module]:
    """Build the compact student and the model to train (its ExpandNet, or itself).

    Returns:
        ``(compact, trained)``: the compact model with its initial weights (the architecture
        that contraction must reproduce) and the model to train.
    """
    compact = task.build_model(recipe.student.model, recipe.student.kwargs)
    if not recipe.expand.enabled:
        return compact, compact
    return compact, expand_model(compact, recipe.expand)


def expand_model(compact: nn.Module, config: ExpandConfig, nonlinear: bool = False) -> nn.Module:
    """Expand ``compact`` with the ``expand`` section's settings; ``nonlinear`` builds the twin.

    The twin always runs its sub-layers in sequence, so ``expand.mode`` applies to the linear
    ExpandNet only.
    """
    return kdexpand.expand(
        compact,
        conv=config.conv,
        fc=config.fc,
        rate=config.rate,
        fc_rate=config.fc_rate,
        include=config.include,
        exclude=config.exclude,
        mode=None if nonlinear else config.mode,
        fallback=config.fallback,
        pointwise=config.pointwise,
        nonlinear=nonlinear,
    )


def seed_augmentation(generator: torch.Generator, seed: int, rank: int) -> None:
    """Seed the batch-augmentation generator of process ``rank``, distinct per process."""
    generator.manual_seed(seed * 1_000_003 + rank + 1)


def cpu_processes() -> bool:
    """Return True when several processes were launched on a machine without CUDA.

    ``accelerate launch --multi_gpu --num_processes N`` sets ``WORLD_SIZE``, but Accelerate
    initializes a gloo process group on CPUs only when asked for CPU use. Without this flag
    each process would train alone.
    """
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def _accelerator(recipe: Recipe, run_dir: Path) -> Accelerator:
    project = ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir))
    # A FitNets hint stage freezes the student's upper layers, which DDP must then skip.
    distills = [recipe.distill] + ([recipe.init.twin.distill] if recipe.init is not None else [])
    hint_stage = any(distill.hint_stage is not None for distill in distills)
    return Accelerator(
        cpu=cpu_processes(),
        mixed_precision=recipe.train.mixed_precision,
        log_with="tensorboard" if recipe.output.tensorboard else None,
        project_config=project,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)] if hint_stage else None,
    )


def check_inputs(recipe: Recipe) -> None:
    """Check the files a recipe needs before anything is created or loaded.

    Raises:
        RecipeError: ``train.mixed_precision`` is fp16 on a machine without CUDA, where
            Accelerate would silently train in float32.
        TeacherNotFoundError: The teacher checkpoint does not exist.
    """
    if recipe.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError(
            "train.mixed_precision=fp16 needs a CUDA GPU, and this machine has none, so the run would "
            "train in float32; set train.mixed_precision to bf16 or no"
        )
    if recipe.teacher is not None and recipe.teacher.checkpoint is not None:
        check_teacher_checkpoint(recipe.teacher)


def setup_run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> RunContext:
    """Build the run context; the caller resumes from checkpoints when ``resume`` is set.

    Data, models, teacher and loss are built and checked before the run directory is
    created or cleared, so a recipe that cannot train leaves no folder behind.

    Raises:
        RecipeError: A recipe value fails with the data or the models (see
            :mod:`kdexpand.trainer.preflight`).
        RunDirectoryError: See :func:`check_run_dir`.
    """
    check_inputs(recipe)
    run_dir = recipe.run_dir
    check_run_dir(run_dir, resume, overwrite)
    accelerator = _accelerator(recipe, run_dir)

    # Same seed on every process: identical initial weights and data order.
    set_seed(recipe.train.seed, deterministic=recipe.train.deterministic)
    task = build_task(recipe)
    load_data_checked(task, accelerator)
    check_splits(task, recipe.train, accelerator.num_processes)
    check_analysis(task, recipe.analysis)
    with recipe_section("student"):
        compact, student = build_student(recipe, task)
    if student is not compact:
        check_expansion(recipe.expand, student)
    logger.info("student %s: %s", recipe.student.model, "expanded" if student is not compact else "not expanded")

    teacher = None
    if recipe.teacher is not None:
        channels = task.example_input(torch.device("cpu")).shape[1]
        with recipe_section("teacher"):
            teacher = build_teacher(recipe.teacher, task.num_classes, in_channels=channels)
        teacher.to(accelerator.device)
    # Feature terms tap both models and size their regressors with a probe pass on the device.
    student.to(accelerator.device)
    with recipe_section("distill"):
        distiller = Distiller(recipe.distill, task.loss, student, teacher, task.example_input(accelerator.device))
    distiller.to(accelerator.device)

    lock = prepare_run_dir(run_dir, resume, overwrite) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and not resume:
        write_text(run_dir / RECIPE_FILE, dump_recipe(recipe))

    optimizer = build_optimizer([*student.parameters(), *distiller.parameters()], recipe.train)
    model, optimizer = accelerator.prepare(student, optimizer)
    scheduler = build_scheduler(optimizer, recipe.train)

    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator(device=accelerator.device)
    seed_augmentation(generator, recipe.train.seed, rank)
    logger.info(
        "effective batch %d = %d per process x %d processes x %d accumulation steps; precision %s",
        recipe.train.batch_size * world * recipe.train.grad_accum_steps, recipe.train.batch_size,
        world, recipe.train.grad_accum_steps, recipe.train.mixed_precision,
    )
    if recipe.output.tensorboard:
        accelerator.init_trackers("tensorboard")
    return RunContext(
        recipe=recipe, train=recipe.train, run_dir=run_dir, accelerator=accelerator, task=task, compact=compact,
        model=model, teacher=teacher, distiller=distiller, optimizer=optimizer, scheduler=scheduler,
        train_batches=task.train_batches(accelerator.device, rank, world), generator=generator, lock=lock,
    )
