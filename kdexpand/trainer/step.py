"""One training epoch: forward, loss, backward with accumulation, optimizer step.

An epoch may start in its middle and end early. After a mid-epoch checkpoint,
``ctx.state.step`` batches are done and ``ctx.state.partial`` contains their running sums, so
the epoch continues at the next batch with the same data order and random state. When a
signal requests a stop (see :mod:`kdexpand.trainer.interrupt`), the epoch returns at the
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

__all__ = ["LossCheckError", "check_parameters_finite", "nonfinite_parts", "train_epoch"]

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


def _on_nonfinite(ctx: RunContext, what: str, details: str, epoch: int, step: int, totals: _EpochTotals) -> None:
    """Stop the run, or count and log the skipped step, as ``train.on_nonfinite`` sets.

    ``what`` is the non-finite quantity (``loss`` or ``gradient``), and ``details`` name the failing terms, e.g. ``task=nan``.

    Raises:
        LossCheckError: ``on_nonfinite`` is ``stop``; names the step, the details and the last
            good checkpoint.
    """
    where = f"{ctx.log_prefix}epoch {epoch + 1} step {step + 1}"
    if ctx.train.on_nonfinite == "skip":
        totals.skipped += 1
        if totals.skipped <= _LOGGED_SKIPS:
            logger.warning("non-finite %s at %s (%s); skipped the optimizer step of this batch", what, where, details)
        return

    raise LossCheckError(f"non-finite {what} at {where} (on at least one process): {details}; {_recovery_advice(ctx)}")


def _recovery_advice(ctx: RunContext) -> str:
    checkpoint = current_checkpoint(ctx.checkpoint_dir)
    if checkpoint is None:
        return (
            "no checkpoint was saved yet; start over with --overwrite and a lower train.lr, a "
            "train.max_grad_norm, or train.on_nonfinite: skip"
        )
    return (
        f"the last good checkpoint is {checkpoint}; resume it with --resume --set "
        "train.on_nonfinite=skip to skip such steps, or start over with --overwrite and a lower "
        "train.lr or a train.max_grad_norm"
    )


def check_parameters_finite(ctx: RunContext, epoch: int) -> None:
    """Raise before an epoch's checkpoint is written if a trained parameter is NaN or infinite.

    Finite losses and gradients can still overflow in the update (a huge learning rate),
    and ``skip`` cannot undo an applied step, so this catches what the per-step checks miss.

    Raises:
        LossCheckError: Names the first parameters that are not finite and the last good checkpoint.
    """
    modules = {"": ctx.student, "transfer.": ctx.distiller}
    bad = [
        prefix + name for prefix, module in modules.items() for name, parameter in module.named_parameters()
        if not torch.isfinite(parameter.detach()).all()
    ]
    if bad:
        names = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise LossCheckError(
            f"parameters became non-finite in {ctx.log_prefix}epoch {epoch + 1} ({names}) although every "
            f"loss was finite, so this epoch is not saved; {_recovery_advice(ctx)}"
        )


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
                _optimizer_step(ctx, window_skipped, epoch, step, totals)
                window_skipped = False
            progress.update(1)
            progress.set_postfix(loss=f"{total:.3f}")
            if boundary and stop is not None and step + 1 < num_batches and stop.poll(accelerator):
                ctx.state.step, ctx.state.partial = step + 1, totals.to_state(time.perf_counter() - start)
                return {}

    check_parameters_finite(ctx, epoch)
    if totals.counted == 0:
        raise LossCheckError(
            f"every step of {ctx.log_prefix}epoch {epoch + 1} had a non-finite loss and was skipped, so "
            "training cannot go on; start over with --overwrite and a lower train.lr or a "
            "train.max_grad_norm"
        )
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
    # The forward pass updates batch-norm running statistics even when its loss turns out
    # NaN, so a batch that ``skip`` drops must not leave them behind.
    buffers = _snapshot_buffers(ctx) if ctx.train.on_nonfinite == "skip" else None
    with sync:
        total, parts = _loss(ctx, inputs, targets)
        bad = nonfinite_parts({**parts, "total": total}, accelerator)
        if not bad:
            accelerator.backward(total / window)
    totals.images += ctx.task.batch_size(batch)
    if bad:
        values = {**parts, "total": total}
        details = ", ".join(f"{name}={values[name].item()}" for name in bad)
        _on_nonfinite(ctx, "loss", details, epoch, step, totals)
        _restore_buffers(buffers)
        return boundary, True, total.item()

    for name, value in {"total": total, **parts}.items():
        totals.losses[name] += value.item()
    totals.counted += 1
    _log_step(ctx, epoch, step, num_batches, total, parts)
    return boundary, False, total.item()


def _snapshot_buffers(ctx: RunContext) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``(buffer, copy)`` pairs of the student's and the transfer modules' buffers."""
    modules = (ctx.model, ctx.distiller)
    return [(buffer, buffer.detach().clone()) for module in modules for buffer in module.buffers()]


def _restore_buffers(snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
    with torch.no_grad():
        for buffer, saved in snapshot or ():
            buffer.copy_(saved)


def _gradients_finite(ctx: RunContext) -> bool:
    """Return True when every accumulated gradient is finite (one device sync per step).

    Under fp16 mixed precision the gradient scaler skips steps with inf gradients itself
    and lowers its scale, so this check is left to it there.
    """
    if ctx.accelerator.scaler is not None:
        return True
    gradients = [parameter.grad for group in ctx.optimizer.param_groups for parameter in group["params"]
                 if parameter.grad is not None]
    if not gradients:
        return True
    norms = torch._foreach_norm(gradients)
    return bool(torch.isfinite(torch.stack(norms)).all())


def _optimizer_step(ctx: RunContext, skip: bool, epoch: int, step: int, totals: _EpochTotals) -> None:
    """Step the optimizer on the accumulated gradients, or discard them when ``skip``.

    A non-finite gradient behind finite losses is handled as ``train.on_nonfinite`` sets:
    the step is skipped, or the run stops naming the step.

    Raises:
        LossCheckError: A gradient is not finite and ``train.on_nonfinite`` is ``stop``.
    """
    if not skip and not _gradients_finite(ctx):
        _on_nonfinite(ctx, "gradient", "every loss term was finite", epoch, step, totals)
        skip = True
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
