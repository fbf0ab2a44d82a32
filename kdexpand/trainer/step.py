"""One training epoch: forward, loss, backward with accumulation, optimizer step.

An epoch may start in its middle and end early. After a mid-epoch checkpoint,
``ctx.state.step`` batches are done and ``ctx.state.partial`` contains their running sums, so
the epoch continues at the next batch with the same data order and random state. When a
signal asks for a stop (see :mod:`kdexpand.trainer.interrupt`), the epoch returns at the
next optimizer step with ``ctx.state.step`` and ``ctx.state.partial`` set for a checkpoint.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from kdexpand.trainer.checkpoint import current_checkpoint
from kdexpand.trainer.interrupt import StopRequest
from kdexpand.trainer.setup import RunContext

__all__ = ["LossCheckError", "nonfinite_parts", "train_epoch"]

logger = logging.getLogger(__name__)

# Skipped steps logged one by one per epoch; later ones are only counted in the epoch summary.
_LOGGED_SKIPS = 5


class LossCheckError(FloatingPointError):
    """A loss term is NaN or infinite and ``train.on_nonfinite`` is ``stop``."""


@dataclass
class _EpochTotals:
    """Running sums of one epoch, stored in mid-epoch checkpoints."""

    losses: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    counted: int = 0
    skipped: int = 0
    images: int = 0
    data_seconds: float = 0.0
    seconds: float = 0.0

    @classmethod
    def restore(cls, partial: dict[str, Any]) -> _EpochTotals:
        totals = cls(**partial)
        totals.losses = defaultdict(float, totals.losses)
        return totals

    def to_state(self, session_seconds: float) -> dict[str, Any]:
        # asdict cannot copy a defaultdict, and weights_only loading accepts only plain dicts.
        state = {item.name: getattr(self, item.name) for item in fields(self)}
        state["losses"] = dict(self.losses)
        state["seconds"] = self.seconds + session_seconds
        return state


def nonfinite_parts(parts: dict[str, torch.Tensor], accelerator: Accelerator) -> list[str]:
    """Return the names of the loss parts that are NaN or infinite on any process.

    With several processes this is a collective call, so all of them skip or stop together.
    """
    names = list(parts)
    flags = torch.stack([~torch.isfinite(parts[name].detach()).all() for name in names]).float()
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, "max")
    return [name for name, flag in zip(names, flags.tolist()) if flag]


def _on_nonfinite(
    ctx: RunContext, bad: list[str], parts: dict[str, torch.Tensor], epoch: int, step: int, totals: _EpochTotals
) -> None:
    """Stop the run, or count and log the skipped step, as ``train.on_nonfinite`` sets.

    Raises:
        LossCheckError: ``on_nonfinite`` is ``stop``; names the step, the terms and the last
            good checkpoint.
    """
    values = ", ".join(f"{name}={parts[name].item()}" for name in bad)
    where = f"{ctx.log_prefix}epoch {epoch + 1} step {step + 1}"
    if ctx.train.on_nonfinite == "skip":
        totals.skipped += 1
        if totals.skipped <= _LOGGED_SKIPS:
            logger.warning("non-finite loss at %s (%s); skipped the optimizer step of this batch", where, values)
        return

    checkpoint = current_checkpoint(ctx.checkpoint_dir)
    if checkpoint is None:
        advice = (
            "no checkpoint was saved yet; start over with --overwrite and a lower train.lr, a "
            "train.max_grad_norm, or train.on_nonfinite: skip"
        )
    else:
        advice = (
            f"the last good checkpoint is {checkpoint}; resume it with --resume --set "
            "train.on_nonfinite=skip to skip such steps, or start over with --overwrite and a lower "
            "train.lr or a train.max_grad_norm"
        )
    raise LossCheckError(f"non-finite loss at {where} (on at least one process): {values}; {advice}")


def train_epoch(ctx: RunContext, epoch: int, stop: StopRequest | None = None) -> dict[str, float]:
    """Train one epoch and return its mean loss parts, images/s and data-time fraction.

    Gradients are accumulated over ``grad_accum_steps`` batches, and DDP synchronizes them
    only on the last batch of each window. The last window of an epoch may be shorter, so
    its losses are averaged over its own length. A batch with a non-finite loss gets no
    backward pass; with ``on_nonfinite: skip`` its whole window's optimizer step is skipped.

    Returns:
        The epoch's statistics, or an empty dict when ``stop`` ended the epoch early (then
        ``ctx.state.step`` is the number of batches done).

    Raises:
        LossCheckError: A loss part is not finite and ``train.on_nonfinite`` is ``stop``.
    """
    accelerator = ctx.accelerator
    ctx.model.train()
    ctx.distiller.train()
    ctx.distiller.set_epoch(epoch, ctx.train.epochs)
    ctx.train_batches.set_epoch(epoch)
    num_batches = len(ctx.train_batches)

    # A resumed epoch skips the batches its checkpoint already trained on.
    start_step = ctx.state.step
    totals = _EpochTotals.restore(ctx.state.partial)
    start = time.perf_counter()
    window_skipped = False
    # As a context manager the progress bar is cleared on every exit, errors included.
    with tqdm(
        total=num_batches, initial=start_step, desc=f"{ctx.log_prefix}epoch {epoch + 1}/{ctx.train.epochs}",
        leave=False, disable=not accelerator.is_main_process, dynamic_ncols=True,
        # Redirected to a log file, every refresh would become a line: refresh once a minute there.
        mininterval=0.1 if sys.stderr.isatty() else 60.0,
    ) as progress:
        for step, batch in enumerate(ctx.train_batches):
            if step < start_step:
                continue
            boundary, skipped, total = _train_batch(ctx, batch, epoch, step, num_batches, totals)
            window_skipped = window_skipped or skipped
            if boundary:
                _optimizer_step(ctx, skip=window_skipped)
                window_skipped = False
            progress.update(1)
            progress.set_postfix(loss=f"{total:.3f}")
            if boundary and stop is not None and step + 1 < num_batches and stop.poll(accelerator):
                ctx.state.step, ctx.state.partial = step + 1, totals.to_state(time.perf_counter() - start)
                return {}

    ctx.state.step, ctx.state.partial = 0, {}
    return _epoch_stats(accelerator, totals, time.perf_counter() - start)


def _train_batch(
    ctx: RunContext, batch: Any, epoch: int, step: int, num_batches: int, totals: _EpochTotals
) -> tuple[bool, bool, float]:
    """Run forward and backward on one batch and add its losses to ``totals``.

    Returns:
        Whether the batch ends an accumulation window, whether its loss was non-finite (so
        it had no backward pass), and its total loss.
    """
    accelerator = ctx.accelerator
    data_start = time.perf_counter()
    inputs, targets = ctx.task.prepare_batch(batch, train=True, generator=ctx.generator)
    totals.data_seconds += time.perf_counter() - data_start

    accumulation = ctx.train.grad_accum_steps
    window_start = step - step % accumulation
    window = min(accumulation, num_batches - window_start)
    boundary = step == window_start + window - 1
    sync = nullcontext() if boundary else accelerator.no_sync(ctx.model)
    with sync:
        total, parts = _loss(ctx, inputs, targets)
        bad = nonfinite_parts({**parts, "total": total}, accelerator)
        if not bad:
            accelerator.backward(total / window)
    totals.images += ctx.task.batch_size(batch)
    if bad:
        _on_nonfinite(ctx, bad, {**parts, "total": total}, epoch, step, totals)
        return boundary, True, total.item()

    for name, value in {"total": total, **parts}.items():
        totals.losses[name] += value.item()
    totals.counted += 1
    _log_step(ctx, epoch, step, num_batches, total, parts)
    return boundary, False, total.item()


def _optimizer_step(ctx: RunContext, skip: bool) -> None:
    """Step the optimizer on the accumulated gradients, or discard them when ``skip``."""
    if not skip:
        if ctx.train.max_grad_norm is not None:
            ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.train.max_grad_norm)
        ctx.optimizer.step()
    ctx.optimizer.zero_grad(set_to_none=True)


def _epoch_stats(accelerator: Accelerator, totals: _EpochTotals, session_seconds: float) -> dict[str, float]:
    """Average the losses over the counted batches and all processes; add throughput."""
    seconds = totals.seconds + session_seconds
    stats = {f"loss_{name}": value / max(totals.counted, 1) for name, value in totals.losses.items()}
    stats = {name: accelerator.reduce(torch.tensor(value, device=accelerator.device), "mean").item()
             for name, value in stats.items()}
    total_images = accelerator.reduce(torch.tensor(totals.images, device=accelerator.device), "sum").item()
    stats["images_per_s"] = total_images / seconds
    stats["data_time_fraction"] = totals.data_seconds / seconds
    stats["epoch_seconds"] = seconds
    if totals.skipped:
        logger.warning("%d steps of this epoch were skipped for a non-finite loss", totals.skipped)
        stats["skipped_steps"] = float(totals.skipped)
    return stats


def _loss(ctx: RunContext, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run the student (and the teacher when a term needs it) and return the loss parts."""
    teacher_outputs = None
    with ctx.accelerator.autocast(), ctx.distiller.capture():
        outputs = ctx.model(inputs)
        if ctx.distiller.needs_teacher:
            assert ctx.teacher is not None, "transfer terms without a teacher passed validation"
            with torch.no_grad():
                teacher_outputs = ctx.teacher(inputs)
    return ctx.distiller(outputs, targets, teacher_outputs)


def _log_step(
    ctx: RunContext, epoch: int, step: int, num_batches: int, total: torch.Tensor, parts: dict[str, torch.Tensor]
) -> None:
    global_step = epoch * num_batches + step
    if not ctx.recipe.output.tensorboard or global_step % ctx.train.log_every != 0:
        return
    prefix = f"{ctx.log_prefix}step"
    values = {f"{prefix}/loss_total": total.item(), f"{prefix}/lr": ctx.optimizer.param_groups[0]["lr"]}
    values.update({f"{prefix}/loss_{name}": value.item() for name, value in parts.items()})
    ctx.accelerator.log(values, step=global_step)
