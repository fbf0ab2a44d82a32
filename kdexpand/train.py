"""Command line entry point: ``accelerate launch -m kdexpand.train RECIPE [--set k=v]...``.

Runs with plain ``python -m kdexpand.train`` too (one process).

Exit status:

- 0: the run finished.
- 2: the recipe or the command line is invalid.
- 1: the run failed (missing files, a changed recipe on ``--resume``, a non-finite loss, a
  failed contraction check, a failed checkpoint write).
- 128 + the signal number (130 for SIGINT, 143 for SIGTERM): a signal stopped training
  after a checkpoint.

Errors print as one ``error:`` message without a traceback unless ``--debug`` is given.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from typing import Any

import torch
from accelerate import PartialState

from kdexpand.io import UnreadableFileError
from kdexpand.recipe import RecipeError, load_recipe
from kdexpand.trainer import ContractionError, LossCheckError, RunDirectoryError, run
from kdexpand.trainer.checkpoint import CheckpointError
from kdexpand.trainer.interrupt import TrainingInterrupted, stop_with_launcher
from kdexpand.trainer.lock import RunDirectoryBusy
from kdexpand.trainer.setup import cpu_processes

__all__ = ["main", "parse_args", "resume_command", "summary"]

# Failures of a valid recipe's run. Their messages name the fix, so no traceback is shown.
# FileNotFoundError covers a missing teacher checkpoint and missing data.
_RUN_ERRORS = (
    CheckpointError, ContractionError, FileNotFoundError, LossCheckError, RunDirectoryBusy, RunDirectoryError,
    UnreadableFileError,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m kdexpand.train",
        description="Train a recipe: an ExpandNet student, optionally with KD, then contract it.",
    )
    parser.add_argument("recipe", help="YAML recipe file, e.g. recipes/cifar_ck_kd.yaml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a recipe key, e.g. --set train.epochs=5 (value parsed as YAML; repeatable)",
    )
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true", help="continue the run from its last checkpoint")
    existing.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    parser.add_argument(
        "--debug", action="store_true",
        help="debug logging, autograd anomaly detection (slow) and tracebacks on errors",
    )
    return parser.parse_args(argv)


def _configure_logging(debug: bool) -> None:
    state = PartialState(cpu=cpu_processes())
    level = logging.DEBUG if debug else logging.INFO
    logging.basicConfig(
        level=level if state.is_main_process else logging.WARNING,
        format=f"%(asctime)s [rank {state.process_index}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def summary(metrics: dict[str, Any], primary: str = "top1") -> str:
    """Format the end-of-run summary: accuracies of teacher, twin, expanded and compact, and sizes."""
    lines = []
    teacher = metrics.get(f"teacher_{primary}")
    if teacher is not None:
        lines.append(f"teacher            test {primary} {teacher:6.2f}")
    init = metrics.get("init")
    if init is not None:
        decision = init["decision"]
        verdict = "kept" if decision["used_twin"] else "not kept"
        lines.append(
            f"twin               test {primary} {init['stages']['twin'][f'test_{primary}']:6.2f}"
            f" | initialization {verdict}: {decision['reason']}"
        )
    for tag in ("best", "last"):
        result = metrics[tag]
        lines.append(
            f"{tag:4s} (epoch {result['epoch']:3d})  expanded test {primary} {result[f'expanded_{primary}']:6.2f}"
            f" | compact test {primary} {result[f'compact_{primary}']:6.2f}"
            f" | contraction max |diff| {result['contraction_max_abs_diff']:.2e}"
        )
    lines.append(
        f"params: compact {metrics['params_compact']:,}  expanded {metrics['params_expanded']:,}"
        f" | MACs: compact {metrics['macs_compact']:,}  expanded {metrics['macs_expanded']:,}"
    )
    # A resumed run trained partly in earlier sessions, so its training time can exceed this wall time.
    lines.append(
        f"wall time {metrics['wall_seconds']:.0f} s in this session | training {metrics['train_seconds']:.0f} s "
        "in all sessions"
    )
    return "\n".join(lines)


def resume_command(args: argparse.Namespace, processes: int) -> str:
    """Return the shell command that resumes the run that ``args`` started.

    With several processes the command passes ``--multi_gpu``, because without it
    ``accelerate launch`` starts one process on a machine without GPUs.
    """
    launcher = (
        ["python", "-m"]
        if processes == 1
        else ["accelerate", "launch", "--multi_gpu", "--num_processes", str(processes), "-m"]
    )
    words = [*launcher, "kdexpand.train", args.recipe]
    for override in args.overrides:
        words += ["--set", override]
    return shlex.join([*words, "--resume"])


def _fail(error: Exception, status: int, debug: bool) -> int:
    if debug:
        raise error
    print(f"error: {error}", file=sys.stderr)
    return status


def _interrupted(stop: TrainingInterrupted, args: argparse.Namespace) -> int:
    state = PartialState()
    if state.is_main_process:
        print(f"{stop}; resume with: {resume_command(args, state.num_processes)}", file=sys.stderr)
    return stop.exit_code


def _stopped_outside_training(stop: KeyboardInterrupt, debug: bool) -> int:
    if debug:
        raise stop
    print("error: interrupted; checkpoints saved so far are kept", file=sys.stderr)
    return 130


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit status."""
    args = parse_args(argv)
    _configure_logging(args.debug)
    stop_with_launcher()
    torch.autograd.set_detect_anomaly(args.debug)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        metrics = run(recipe, resume=args.resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        return _interrupted(stop, args)
    except RecipeError as error:
        return _fail(error, 2, args.debug)
    except _RUN_ERRORS as error:
        return _fail(error, 1, args.debug)
    except KeyboardInterrupt as stop:
        return _stopped_outside_training(stop, args.debug)

    if PartialState().is_main_process:
        print(f"\nrun directory: {recipe.run_dir}")
        print(summary(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
