"""Nonlinear-twin initialization: twin, optional baseline, transfer, linear training, contraction.

The stages of a run whose recipe has ``init.twin``, each with a folder under
``<run>/checkpoints`` and TensorBoard tags under ``<stage>/``:

- ``twin``: the nonlinear twin (a ReLU after every sub-layer but the last of each unit)
  trained with the settings and loss of ``init.twin``.
- ``baseline`` (``keep: if_better`` only): the linear ExpandNet trained with the same
  settings, the reference that the twin must beat on the validation split.
- ``transfer``: the decision and the linear stage's starting weights, ``model.safetensors``.
  These are the twin's best-validation weights, copied by :func:`kdexpand.transfer_twin`,
  or the initial weights when the twin is not kept.
- ``linear``: the linear ExpandNet trained with ``train`` and ``distill``, followed by
  contraction and verification (:func:`kdexpand.trainer.finish.finish_run`).

Twin and baseline start from the linear ExpandNet's initial weights
(``checkpoints/initial.safetensors``), draw the same batches and augmentations, and so differ
only in the ReLUs. A stage ends by writing ``done.json`` with its metrics, atomically and after
its last checkpoint. ``--resume`` skips every stage that has one and resumes the first stage
without one from its last checkpoint. The linear stage always resumes from its own checkpoint,
so a larger ``train.epochs`` extends it as it extends a single-stage run.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from typing import Any

import torch
from accelerate.utils import set_seed
from torch import nn

import kdexpand
from kdexpand.distill import Distiller
from kdexpand.io import load_safetensors, save_safetensors, write_json, write_text
from kdexpand.recipe import DistillConfig, TrainConfig, dump_recipe
from kdexpand.trainer.checkpoint import CheckpointError, TrainState, load_best_weights
from kdexpand.trainer.evaluate import evaluate
from kdexpand.trainer.finish import finish_run
from kdexpand.trainer.optim import build_optimizer, build_scheduler
from kdexpand.trainer.run import check_recipe_unchanged, resume_run, train_stage
from kdexpand.trainer.setup import RECIPE_FILE, RunContext, expand_model, seed_augmentation

__all__ = ["INITIAL_WEIGHTS", "STAGE_MARKER", "TRANSFER_WEIGHTS", "decide_twin", "train_with_twin_init"]

logger = logging.getLogger(__name__)

STAGE_MARKER = "done.json"
INITIAL_WEIGHTS = "initial.safetensors"
TRANSFER_WEIGHTS = "model.safetensors"

# Offsets added to train.seed at the start of a stage. Twin and baseline share theirs, so both
# see the same augmentations; a stage started after a resume draws what it would have drawn.
_INIT_STAGE_SEED_OFFSET = 1
_LINEAR_SEED_OFFSET = 2


def decide_twin(keep: str, metric: str, twin_score: float, baseline_score: float | None) -> dict[str, Any]:
    """Decide whether the linear ExpandNet starts from the twin's weights.

    ``keep="always"`` keeps the twin. ``keep="if_better"`` keeps it only when its best
    validation score is strictly higher than the plain ExpandNet's, so a tie keeps the
    initial weights. This is the rule of Guo et al., "ExpandNets", NeurIPS 2020,
    supplementary A.1: initialize from the twin only when it outperforms the ExpandNet.

    Returns:
        The decision as logged in ``metrics.json``: ``keep``, ``used_twin``, both validation
        scores and a one-line ``reason``.
    """
    if keep == "always":
        used, reason = True, "init.twin.keep is 'always'"
    elif keep == "if_better":
        assert baseline_score is not None, "keep 'if_better' without a baseline score"
        used = twin_score > baseline_score
        relation = ">" if used else "<="
        reason = (
            f"twin val {metric} {twin_score:.2f} {relation} plain ExpandNet val {metric} {baseline_score:.2f}"
        )
    else:
        raise ValueError(f"init.twin.keep must be 'always' or 'if_better', got {keep!r}")
    return {
        "keep": keep,
        "used_twin": used,
        f"twin_val_{metric}": twin_score,
        f"baseline_val_{metric}": baseline_score,
        "reason": reason,
    }


def train_with_twin_init(ctx: RunContext, resume: bool) -> dict[str, Any]:
    """Run twin, baseline (``keep: if_better``), transfer, linear training and contraction.

    Args:
        ctx: The linear ExpandNet's context from :func:`~kdexpand.trainer.setup.setup_run`,
            with the initial weights. It is switched to the ``linear`` stage in place, so
            its checkpoints go to ``checkpoints/linear``.
        resume: Continue the run in its run directory.

    Returns:
        The metrics of :func:`~kdexpand.trainer.finish.finish_run` plus ``init``: the decision
        and the metrics of every stage.

    Raises:
        CheckpointError: On resume, the run directory has no recipe, or the recipe changed in
            keys other than :data:`~kdexpand.trainer.run.RESUMABLE_KEYS`.
    """
    assert ctx.recipe.init is not None, "train_with_twin_init needs a recipe with init.twin"
    twin_config = ctx.recipe.init.twin
    twin_train = twin_config.train_config(ctx.recipe.train)
    if resume:
        _check_resumable(ctx)
    initial = _initial_weights(ctx)

    stages: dict[str, dict[str, Any]] = {}
    twin = expand_model(ctx.compact, ctx.recipe.expand, nonlinear=True)
    twin.load_state_dict(initial, strict=True)
    stages["twin"] = _train_model_stage(ctx, "twin", twin, twin_train, twin_config.distill)
    if twin_config.keep == "if_better":
        baseline = copy.deepcopy(ctx.student)
        baseline.load_state_dict(initial, strict=True)
        stages["baseline"] = _train_model_stage(ctx, "baseline", baseline, twin_train, twin_config.distill)
    stages["transfer"] = _transfer_stage(ctx, twin, initial, stages)

    stages["linear"] = _linear_stage(ctx)
    metrics = finish_run(ctx)

    # Test scores of the best-validation weights, before and after contraction.
    best = metrics["best"]
    stages["linear"].update(_renamed(best, "expanded_", "test_"))
    stages["contract"] = {**_renamed(best, "compact_", "test_"), "contraction_max_abs_diff": best["contraction_max_abs_diff"]}
    metrics["init"] = {"decision": stages["transfer"]["decision"], "stages": stages}
    return metrics


def _renamed(values: dict[str, Any], prefix: str, new_prefix: str) -> dict[str, Any]:
    """Return the entries whose key starts with ``prefix``, with ``new_prefix`` in its place."""
    return {new_prefix + key.removeprefix(prefix): value for key, value in values.items() if key.startswith(prefix)}


def _check_resumable(ctx: RunContext) -> None:
    """Compare the recipe with the run's saved recipe before any stage resumes or starts."""
    path = ctx.run_dir / RECIPE_FILE
    if not path.is_file():
        raise CheckpointError(f"no run to resume in {ctx.run_dir}: {RECIPE_FILE} not found; start without --resume")
    check_recipe_unchanged(ctx.recipe, path.read_text(), ctx.run_dir)
    if ctx.accelerator.is_main_process:
        write_text(path, dump_recipe(ctx.recipe))


def _initial_weights(ctx: RunContext) -> dict[str, torch.Tensor]:
    """Return the linear ExpandNet's initial weights, saved on the first start of the run.

    The file keeps twin, baseline and the not-kept case on the same starting point across
    resumes, whatever the random state of a later session.
    """
    path = ctx.run_dir / "checkpoints" / INITIAL_WEIGHTS
    if ctx.accelerator.is_main_process and not path.is_file():
        save_safetensors(ctx.student.state_dict(), path)
    # Every process waits here: a file check on the others could race with the write.
    ctx.accelerator.wait_for_everyone()
    return load_safetensors(path)


def _seed_stage(ctx: RunContext, offset: int) -> None:
    """Seed every random generator for a stage that starts at its first epoch or resumes."""
    seed = ctx.train.seed + offset
    set_seed(seed, deterministic=ctx.train.deterministic)
    seed_augmentation(ctx.generator, seed, ctx.accelerator.process_index)


def _stage_context(
    ctx: RunContext, name: str, model: nn.Module, train: TrainConfig, distill: DistillConfig
) -> RunContext:
    """Build the context of a stage that trains ``model`` with its own optimizer and loss."""
    accelerator = ctx.accelerator
    model.to(accelerator.device)
    example = ctx.task.example_input(accelerator.device)
    distiller = Distiller(distill, ctx.task.loss, model, ctx.teacher, example)
    distiller.to(accelerator.device)
    optimizer = build_optimizer([*model.parameters(), *distiller.parameters()], train)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    return dataclasses.replace(
        ctx, train=train, stage=name, model=prepared, distiller=distiller, optimizer=optimizer,
        scheduler=build_scheduler(optimizer, train), state=TrainState(),
    )


def _finished_stage(ctx: RunContext, name: str) -> dict[str, Any] | None:
    """Return the metrics of a finished stage, or None when the stage has not finished."""
    marker = ctx.run_dir / "checkpoints" / name / STAGE_MARKER
    if not marker.is_file():
        return None
    logger.info("stage %s finished in an earlier session (%s); not repeating it", name, marker)
    return json.loads(marker.read_text())


def _finish_stage(ctx: RunContext, summary: dict[str, Any]) -> dict[str, Any]:
    """Write the stage's marker with its metrics, after its last checkpoint; main process only."""
    if ctx.accelerator.is_main_process:
        write_json(ctx.checkpoint_dir / STAGE_MARKER, summary)
    ctx.accelerator.wait_for_everyone()
    logger.info("stage %s finished: %s", ctx.stage, {k: v for k, v in summary.items() if k != "history"})
    return summary


def _train_model_stage(
    ctx: RunContext, name: str, model: nn.Module, train: TrainConfig, distill: DistillConfig
) -> dict[str, Any]:
    """Train the twin or the baseline, or return its metrics when it finished earlier."""
    finished = _finished_stage(ctx, name)
    if finished is not None:
        return finished

    stage = _stage_context(ctx, name, model, train, distill)
    _seed_stage(stage, _INIT_STAGE_SEED_OFFSET)
    if (stage.checkpoint_dir / "last.json").is_file():
        resume_run(stage)
    train_stage(stage)

    # The best-validation weights are the ones transferred, so their test score is the twin's.
    weights, best_epoch = load_best_weights(stage.checkpoint_dir)
    best = copy.deepcopy(stage.student)
    best.load_state_dict(weights, strict=True)
    test = evaluate(best, ctx.task, "test", ctx.accelerator)
    ctx.accelerator.log({f"{name}/test/{k}": v for k, v in test.items()}, step=stage.state.epoch)
    metric = ctx.task.primary_metric
    summary = {
        "epochs": stage.state.epoch,
        "best_epoch": best_epoch,
        f"val_{metric}": stage.state.best_score,
        **{f"test_{k}": v for k, v in test.items()},
        "train_seconds": stage.state.train_seconds,
        "history": stage.state.history,
    }
    return _finish_stage(stage, summary)


def _transfer_stage(
    ctx: RunContext, twin: nn.Module, initial: dict[str, torch.Tensor], stages: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """Decide, set the linear ExpandNet's starting weights and evaluate them on val and test."""
    finished = _finished_stage(ctx, "transfer")
    if finished is not None:
        return finished

    metric = ctx.task.primary_metric
    baseline_score = stages["baseline"][f"val_{metric}"] if "baseline" in stages else None
    decision = decide_twin(ctx.recipe.init.twin.keep, metric, stages["twin"][f"val_{metric}"], baseline_score)
    logger.info("twin initialization %s: %s", "kept" if decision["used_twin"] else "not kept", decision["reason"])
    if decision["used_twin"]:
        weights, _ = load_best_weights(ctx.run_dir / "checkpoints" / "twin")
        twin.load_state_dict(weights, strict=True)
        kdexpand.transfer_twin(twin, ctx.student)
    else:
        ctx.student.load_state_dict(initial, strict=True)

    stage = dataclasses.replace(ctx, stage="transfer")
    if ctx.accelerator.is_main_process:
        save_safetensors(ctx.student.state_dict(), stage.checkpoint_dir / TRANSFER_WEIGHTS)
    summary: dict[str, Any] = {"source": "twin" if decision["used_twin"] else "initial", "decision": decision}
    for split in ("val", "test"):
        values = evaluate(ctx.model, ctx.task, split, ctx.accelerator)
        summary.update({f"{split}_{k}": v for k, v in values.items()})
        ctx.accelerator.log({f"transfer/{split}/{k}": v for k, v in values.items()}, step=0)
    return _finish_stage(stage, summary)


def _linear_stage(ctx: RunContext) -> dict[str, Any]:
    """Train the linear ExpandNet from the transferred weights, or resume it."""
    ctx.stage = "linear"
    _seed_stage(ctx, _LINEAR_SEED_OFFSET)
    if (ctx.checkpoint_dir / "last.json").is_file():
        resume_run(ctx)
    else:
        weights = load_safetensors(ctx.run_dir / "checkpoints" / "transfer" / TRANSFER_WEIGHTS)
        ctx.student.load_state_dict(weights, strict=True)
    train_stage(ctx)

    metric = ctx.task.primary_metric
    summary = {
        "epochs": ctx.state.epoch,
        "best_epoch": ctx.state.best_epoch,
        f"val_{metric}": ctx.state.best_score,
        "train_seconds": ctx.state.train_seconds,
    }
    return _finish_stage(ctx, summary)
