"""Run a recipe end to end: set up, evaluate the teacher, train, checkpoint, finish."""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from kdexpand.analysis.gradients import gradient_confusion
from kdexpand.io import write_json, write_text
from kdexpand.recipe import Recipe, dump_recipe, flatten_keys
from kdexpand.trainer.checkpoint import (
    CheckpointError,
    TrainState,
    checkpoint_name,
    current_checkpoint,
    finish_last,
    latest_checkpoint,
    load_distiller_weights,
    load_last,
    restore_rng,
    save_last,
    save_rng,
)
from kdexpand.trainer.evaluate import evaluate
from kdexpand.trainer.finish import finish_run
from kdexpand.trainer.interrupt import StopRequest, TrainingInterrupted
from kdexpand.trainer.setup import RunContext, setup_run
from kdexpand.trainer.step import train_epoch

__all__ = ["RESUMABLE_KEYS", "check_recipe_unchanged", "resume_progress", "resume_run", "run", "train_stage"]

logger = logging.getLogger(__name__)

# Recipe keys that may differ on --resume. More epochs extend a run, except under a cosine
# schedule, whose length is fixed. Logging and outputs are extras, a run directory may have
# moved, and on_nonfinite may rescue a run that stopped on a NaN loss. Analysis never changes
# the training trajectory.
RESUMABLE_KEYS = {
    "analysis.gradient_confusion_batches", "train.epochs", "train.log_every", "train.on_nonfinite", "output.dir", "output.onnx", "output.tensorboard",
}


def check_recipe_unchanged(recipe: Recipe, saved_text: str, run_dir: Path) -> None:
    """Raise unless ``recipe`` equals the saved recipe YAML in every key but :data:`RESUMABLE_KEYS`.

    Raises:
        CheckpointError: Names every changed key, with old and new values for the first five.
    """
    saved = flatten_keys(yaml.safe_load(saved_text))
    current = flatten_keys(yaml.safe_load(dump_recipe(recipe)))
    changed = sorted(key for key in saved.keys() | current.keys() if saved.get(key) != current.get(key))
    changed = [key for key in changed if key not in RESUMABLE_KEYS]
    if changed:
        details = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed[:5])
        if len(changed) > 5:
            details += f", and {', '.join(changed[5:])}"
        raise CheckpointError(
            f"cannot resume {run_dir}: the recipe changed ({details}); only {sorted(RESUMABLE_KEYS)} "
            "may change. Restore the recipe, or start over with --overwrite"
        )


def resume_run(ctx: RunContext) -> None:
    """Restore model, optimizer, scheduler, RNG and progress from the last checkpoint.

    Raises:
        CheckpointError: No checkpoint exists, or the recipe changed in keys other than
            :data:`RESUMABLE_KEYS`.
    """
    target = latest_checkpoint(ctx.checkpoint_dir)
    trainer, weights, rng = load_last(target, ctx.accelerator.process_index, ctx.accelerator.num_processes)
    check_recipe_unchanged(ctx.recipe, trainer["recipe"], ctx.run_dir)
    _check_schedule_length(ctx, trainer)
    if ctx.accelerator.is_main_process:
        _warn_thread_change(trainer.get("torch_threads"))

    ctx.student.load_state_dict(weights, strict=True)
    distiller_weights = load_distiller_weights(target)
    if distiller_weights:
        ctx.distiller.load_state_dict(distiller_weights, strict=True)
    ctx.optimizer.load_state_dict(trainer["optimizer"])
    ctx.scheduler.load_state_dict(trainer["scheduler"])
    restore_rng(rng, ctx.generator)
    ctx.state = TrainState(**trainer["state"])
    if ctx.accelerator.is_main_process:
        write_text(ctx.run_dir / "recipe.yaml", dump_recipe(ctx.recipe))
    logger.info("resumed %s: %s", ctx.run_dir, resume_progress(ctx.state, ctx.train.epochs, ctx.stage))


def resume_progress(state: TrainState, epochs: int, stage: str | None = None) -> str:
    """Describe where a resumed run continues, e.g. ``1 of 3 epochs done, 8 batches into epoch 2``."""
    prefix = "" if stage is None else f"stage {stage}: "
    text = f"{prefix}{state.epoch} of {epochs} epochs done"
    if state.step:
        text += f", {state.step} batches into epoch {state.epoch + 1}"
    return text


def _warn_thread_change(saved: int | None) -> None:
    """Warn when the checkpoint was written with another torch thread count (None: not recorded)."""
    current = torch.get_num_threads()
    if saved is not None and saved != current:
        logger.warning(
            "checkpoint was written with %d torch threads, this process has %d, so CPU results may differ "
            "in the last bits from an uninterrupted run; set OMP_NUM_THREADS=%d for a bit-identical resume",
            saved, current, saved,
        )


def _schedule_lengths(state: Any) -> list[Any]:
    """Collect every ``T_max`` (cosine length) in a scheduler state, nested ones included."""
    if isinstance(state, dict):
        own = [state["T_max"]] if "T_max" in state else []
        return own + [length for value in state.values() for length in _schedule_lengths(value)]
    if isinstance(state, list):
        return [length for value in state for length in _schedule_lengths(value)]
    return []


def _check_schedule_length(ctx: RunContext, trainer: dict[str, Any]) -> None:
    """Reject epoch counts that a resumed run cannot honour.

    Raises:
        CheckpointError: ``train.epochs`` is below the epochs already trained, or it changed
            under a cosine schedule, whose length the saved scheduler state fixes.
    """
    done = trainer["state"]["epoch"]
    if ctx.train.epochs < done:
        raise CheckpointError(
            f"cannot resume {ctx.run_dir}: train.epochs={ctx.train.epochs} is below the {done} epochs "
            f"already trained; set train.epochs >= {done}"
        )
    saved, current = _schedule_lengths(trainer["scheduler"]), _schedule_lengths(ctx.scheduler.state_dict())
    if saved != current:
        raise CheckpointError(
            f"cannot resume {ctx.run_dir}: the cosine schedule was built for other train.epochs (length "
            f"{saved} epochs, now {current}) and keeps its saved length on resume; restore train.epochs, "
            "or start over with --overwrite"
        )


def _save_epoch(ctx: RunContext) -> Path:
    """Save a checkpoint of ``ctx.state`` on every process and make it the one to resume from.

    Raises:
        CheckpointError: A file could not be written on some process (e.g. a full disk). The
            previous checkpoint stays in force and the incomplete folder is removed.
    """
    accelerator = ctx.accelerator
    previous = current_checkpoint(ctx.checkpoint_dir)
    target = ctx.checkpoint_dir / checkpoint_name(ctx.state)
    failure: OSError | None = None
    try:
        save_last(
            ctx.checkpoint_dir, ctx.state, ctx.student, ctx.distiller, ctx.optimizer, ctx.scheduler,
            dump_recipe(ctx.recipe), accelerator.is_main_process,
        )
    except OSError as error:
        failure = error
    # save_last may first delete a stale folder of the same name, so the other processes
    # write their RNG files only after it has finished.
    _agree_on_write(ctx, failure, target, previous)
    try:
        save_rng(target, accelerator.process_index, ctx.generator)
    except OSError as error:
        failure = error
    _agree_on_write(ctx, failure, target, previous)
    if accelerator.is_main_process:
        try:
            finish_last(ctx.checkpoint_dir, target, accelerator.num_processes)
        except OSError as error:
            failure = error
    _agree_on_write(ctx, failure, target, previous)
    return target


def _agree_on_write(ctx: RunContext, failure: OSError | None, target: Path, previous: Path | None) -> None:
    """Wait for every process; raise on all of them when any failed to write its files."""
    accelerator = ctx.accelerator
    failed = torch.tensor(float(failure is not None), device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, "max")
    if not failed.item():
        return
    if accelerator.is_main_process and target != previous:
        # Frees the space the incomplete folder took; last.json does not name it.
        shutil.rmtree(target, ignore_errors=True)
    reason = failure if failure is not None else "a file write failed on another process"
    kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
    raise CheckpointError(f"writing checkpoint {target} failed ({reason}); {kept}. Free disk space, then resume with --resume")


def _stop_if_requested(ctx: RunContext, stop: StopRequest) -> None:
    """Raise :class:`TrainingInterrupted` before an epoch when a signal asked for a stop.

    Only a run with a checkpoint polls here, so a stop always leaves something to resume.
    The first epoch of a fresh run stops after its first optimizer step instead.
    """
    if not (ctx.state.epoch or ctx.state.step):
        return
    signal_number = stop.poll(ctx.accelerator)
    if signal_number:
        checkpoint = current_checkpoint(ctx.checkpoint_dir)
        assert checkpoint is not None, "a run with completed steps has a checkpoint"
        raise TrainingInterrupted(signal_number, checkpoint)


def train_stage(ctx: RunContext) -> None:
    """Train from ``ctx.state.epoch`` to ``train.epochs``, validating and saving every epoch.

    SIGINT and SIGTERM stop training at the next step boundary with a checkpoint (see
    :mod:`kdexpand.trainer.interrupt`).

    Raises:
        TrainingInterrupted: A signal stopped training; the checkpoint it names resumes it.
    """
    with StopRequest() as stop:
        for epoch in range(ctx.state.epoch, ctx.train.epochs):
            _stop_if_requested(ctx, stop)
            _train_and_save_epoch(ctx, epoch, stop)


def _train_and_save_epoch(ctx: RunContext, epoch: int, stop: StopRequest) -> None:
    accelerator, metric, prefix = ctx.accelerator, ctx.task.primary_metric, ctx.log_prefix
    lr = ctx.optimizer.param_groups[0]["lr"]
    stats = train_epoch(ctx, epoch, stop)
    if ctx.state.step:
        # The epoch stopped early on a signal; its checkpoint resumes at the next batch.
        raise TrainingInterrupted(stop.signal_number, _save_epoch(ctx))
    ctx.scheduler.step()
    val = evaluate(ctx.model, ctx.task, "val", accelerator)

    analysis = _measure_gradient_confusion(ctx, epoch)

    ctx.state.epoch = epoch + 1
    ctx.state.train_seconds += stats["epoch_seconds"]
    ctx.state.history.append(
        {"epoch": epoch + 1, "lr": lr, **stats, **{f"val_{k}": v for k, v in val.items()}, **analysis}
    )
    if val[metric] > ctx.state.best_score:
        # The checkpoint below stores the best weights with this state.
        ctx.state.best_score, ctx.state.best_epoch = val[metric], epoch + 1
    _save_epoch(ctx)

    logger.info(
        "%sepoch %d/%d: loss %.4f, val %s %.2f (best %.2f at epoch %d), %.0f images/s, data %.1f%% of time",
        prefix, epoch + 1, ctx.train.epochs, stats["loss_total"], metric, val[metric], ctx.state.best_score,
        ctx.state.best_epoch, stats["images_per_s"], 100 * stats["data_time_fraction"],
    )
    logged = {f"{prefix}train/{k}": v for k, v in stats.items()} | {f"{prefix}val/{k}": v for k, v in val.items()}
    logged |= {f"{prefix}analysis/{k}": v for k, v in analysis.items()}
    accelerator.log({**logged, f"{prefix}train/lr": lr}, step=epoch + 1)


def _measure_gradient_confusion(ctx: RunContext, epoch: int) -> dict[str, float]:
    """Return the gradient confusion after ``epoch`` when the recipe requests it, else an empty dict.

    Every process measures the same mini-batches (the first ones of the next epoch's order
    on one shard) with the same weights, so histories agree without communication.
    """
    count = ctx.recipe.analysis.gradient_confusion_batches
    if not count:
        return {}
    batches = ctx.task.train_batches(ctx.accelerator.device, rank=0, world_size=1)
    batches.set_epoch(epoch + 1)
    prepared = (ctx.task.prepare_batch(batch, train=False) for batch in itertools.islice(batches, count))
    confusion = gradient_confusion(ctx.student, ctx.task.loss, prepared)
    return {"grad_cos_min": confusion.minimum, "grad_cos_mean": confusion.mean, "grad_pairs": confusion.pairs}


def run(recipe: Recipe, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run ``recipe`` and return the metrics written to ``metrics.json``."""
    start = time.perf_counter()
    ctx = setup_run(recipe, resume=resume, overwrite=overwrite)
    try:
        return _run_stages(ctx, resume, start)
    finally:
        if ctx.lock is not None:
            ctx.lock.release()


def _run_stages(ctx: RunContext, resume: bool, start: float) -> dict[str, Any]:
    recipe = ctx.recipe
    if resume and recipe.init is None:
        resume_run(ctx)

    if ctx.teacher is not None:
        ctx.teacher_metrics = {
            **{f"teacher_val_{k}": v for k, v in evaluate(ctx.teacher, ctx.task, "val", ctx.accelerator).items()},
            **{f"teacher_{k}": v for k, v in evaluate(ctx.teacher, ctx.task, "test", ctx.accelerator).items()},
        }
        logger.info("teacher %s: %s", recipe.teacher.model, ctx.teacher_metrics)
        ctx.accelerator.log(ctx.teacher_metrics, step=ctx.state.epoch)

    if recipe.init is None:
        train_stage(ctx)
        metrics = finish_run(ctx)
    else:
        # Imported here because the pipeline module builds on train_stage and resume_run.
        from kdexpand.trainer.pipeline import train_with_twin_init

        metrics = train_with_twin_init(ctx, resume)
    metrics.update(ctx.teacher_metrics)
    metrics["history"] = ctx.state.history
    metrics["train_seconds"] = ctx.state.train_seconds
    metrics["wall_seconds"] = time.perf_counter() - start
    metrics["processes"] = ctx.accelerator.num_processes
    if ctx.accelerator.is_main_process:
        write_json(ctx.run_dir / "metrics.json", metrics)
    ctx.accelerator.end_training()
    return metrics
