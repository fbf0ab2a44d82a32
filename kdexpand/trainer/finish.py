"""End of a run: contract, verify, evaluate and write the run directory's results."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

import kdexpand
from kdexpand.analysis import count_macs, count_params
from kdexpand.export import export_onnx
from kdexpand.io import load_safetensors, save_safetensors
from kdexpand.trainer.checkpoint import latest_checkpoint, load_best_weights
from kdexpand.trainer.evaluate import evaluate
from kdexpand.trainer.setup import RunContext

__all__ = ["ContractionError", "contract_checked", "finish_run", "max_logit_difference"]

logger = logging.getLogger(__name__)


class ContractionError(RuntimeError):
    """The contracted model's outputs differ from the expanded model's beyond the tolerance."""


@torch.no_grad()
def max_logit_difference(expanded: nn.Module, compact: nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """Return ``(max |expanded(x) - compact(x)|, max |expanded(x)|)`` in eval mode.

    The expanded side runs in ``sequential`` mode (each sub-layer applied in turn), so the
    check compares contraction with the literal ExpandNet rather than with the composed
    kernels that the collapsed mode shares with contraction.
    """
    reference = copy.deepcopy(expanded).eval()
    if kdexpand.is_expanded(reference):
        kdexpand.set_mode(reference, "sequential")
    expected = reference(inputs).float()
    actual = compact.eval()(inputs).float()
    return float((expected - actual).abs().max()), float(expected.abs().max())


def contract_checked(expanded: nn.Module, inputs: torch.Tensor, tolerance: float) -> tuple[nn.Module, float]:
    """Contract ``expanded`` and verify it on ``inputs``.

    Returns:
        The compact model and the maximum absolute logit difference (0 when nothing is expanded).

    Raises:
        ContractionError: The difference exceeds ``tolerance * max(1, max |expanded logits|)``.
    """
    compact, difference, scale = _contract_and_compare(expanded, inputs)
    _check_difference(difference, scale, tolerance)
    return compact, difference


def _contract_and_compare(expanded: nn.Module, inputs: torch.Tensor) -> tuple[nn.Module, float, float]:
    """Return the contracted model, the max logit difference and the max expanded logit."""
    if not kdexpand.is_expanded(expanded):
        return expanded, 0.0, 0.0
    compact = kdexpand.contract(expanded)
    difference, scale = max_logit_difference(expanded, compact, inputs)
    return compact, difference, scale


def _check_difference(difference: float, scale: float, tolerance: float) -> None:
    if not (math.isfinite(difference) and math.isfinite(scale)):
        raise ContractionError(
            f"contraction check failed: the logits are not finite (max |expanded - contracted| = "
            f"{difference:.3g}, max |logit| = {scale:.3g}), so the trained ExpandNet diverged; lower "
            "train.lr or set train.max_grad_norm, and start over with --overwrite"
        )
    bound = tolerance * max(1.0, scale)
    if difference > bound:
        raise ContractionError(
            f"contraction check failed: max |expanded - contracted| logits = {difference:.3g} > "
            f"{bound:.3g} (expand.verify_tolerance={tolerance} x max(1, {scale:.3g})); the "
            "contracted model does not reproduce the ExpandNet"
        )


def _validation_inputs(ctx: RunContext) -> torch.Tensor:
    batch = next(iter(ctx.task.eval_batches("val", ctx.accelerator.device, ctx.accelerator.process_index, ctx.accelerator.num_processes)))
    inputs, _ = ctx.task.prepare_batch(batch, train=False)
    return inputs


def _evaluate_weights(ctx: RunContext, weights: dict[str, torch.Tensor], inputs: torch.Tensor) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """Load ``weights`` into a copy of the student, contract, verify and test both forms.

    Both forms run in float32 here even after mixed-precision training: the copy drops the
    autocast wrapper that Accelerate puts on the trained model's forward, and the test
    evaluation disables autocast. Reduced-precision rounding would otherwise swamp the
    contraction check.
    """
    expanded = extract_model_from_parallel(copy.deepcopy(ctx.student), keep_fp32_wrapper=False)
    expanded.load_state_dict(weights, strict=True)
    compact, difference, scale = _contract_and_compare(expanded, inputs)
    # The largest values over processes decide, so every process agrees on failure.
    reduced = ctx.accelerator.reduce(torch.tensor([difference, scale], device=ctx.accelerator.device), "max")
    difference, scale = reduced.tolist()
    _check_difference(difference, scale, ctx.recipe.expand.verify_tolerance)

    expanded_test = evaluate(expanded, ctx.task, "test", ctx.accelerator, autocast=False)
    # Without expansion the compact model is the trained model itself: one evaluation serves both.
    if compact is expanded:
        compact_test = expanded_test
    else:
        compact_test = evaluate(compact, ctx.task, "test", ctx.accelerator, autocast=False)
    results: dict[str, Any] = {f"expanded_{k}": v for k, v in expanded_test.items()}
    results.update({f"compact_{k}": v for k, v in compact_test.items()})
    results["contraction_max_abs_diff"] = difference
    return results, expanded, compact


def _model_stats(ctx: RunContext, expanded: nn.Module, compact: nn.Module) -> dict[str, int]:
    example = ctx.task.example_input(ctx.accelerator.device)
    return {
        "params_compact": count_params(compact),
        "params_expanded": count_params(expanded),
        "macs_compact": count_macs(compact, example),
        "macs_expanded": count_macs(expanded, example),
    }


def finish_run(ctx: RunContext) -> dict[str, Any]:
    """Contract the best and last students, verify, evaluate and write the results.

    Writes ``compact.safetensors`` and ``expanded.safetensors`` (best validation epoch),
    optionally ``compact.onnx``, and returns the metrics for ``metrics.json``.

    Raises:
        ContractionError: The contraction check fails for the best or the last weights. The
            best weights are then still written to ``expanded.safetensors``.
    """
    inputs = _validation_inputs(ctx)
    best_weights, best_epoch = load_best_weights(ctx.checkpoint_dir)
    last_weights = load_safetensors(latest_checkpoint(ctx.checkpoint_dir) / "model.safetensors")

    metrics: dict[str, Any] = {}
    try:
        metrics["best"], expanded, compact = _evaluate_weights(ctx, best_weights, inputs)
        if best_epoch == ctx.state.epoch:
            metrics["last"] = dict(metrics["best"])
        else:
            metrics["last"], _, _ = _evaluate_weights(ctx, last_weights, inputs)
    except ContractionError as error:
        kept = ctx.run_dir / "expanded.safetensors"
        if ctx.accelerator.is_main_process:
            save_safetensors(best_weights, kept, {"epoch": str(best_epoch)})
        raise ContractionError(f"{error}; the trained ExpandNet (epoch {best_epoch}) is kept in {kept}") from error
    metrics["best"]["epoch"], metrics["last"]["epoch"] = best_epoch, ctx.state.epoch
    for tag, epoch in (("best", best_epoch), ("last", ctx.state.epoch)):
        validation = ctx.state.history[epoch - 1]
        metrics[tag].update({key: value for key, value in validation.items() if key.startswith("val_")})
    metrics.update(_model_stats(ctx, expanded, compact))

    if ctx.accelerator.is_main_process:
        save_safetensors(compact.state_dict(), ctx.run_dir / "compact.safetensors", {"epoch": str(best_epoch)})
        save_safetensors(expanded.state_dict(), ctx.run_dir / "expanded.safetensors", {"epoch": str(best_epoch)})
        _check_strict_load(ctx, ctx.run_dir / "compact.safetensors")
        if ctx.recipe.output.onnx:
            example = ctx.task.example_input(torch.device("cpu"))
            metrics.update(export_onnx(copy.deepcopy(compact), example, ctx.run_dir / "compact.onnx", inputs))
    ctx.accelerator.wait_for_everyone()
    return metrics


def _check_strict_load(ctx: RunContext, path) -> None:
    """Load the saved compact weights strictly into a freshly built compact model."""
    fresh = ctx.task.build_model(ctx.recipe.student.model, ctx.recipe.student.kwargs)
    fresh.load_state_dict(load_safetensors(path), strict=True)
