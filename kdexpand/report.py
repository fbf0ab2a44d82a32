"""Command line entry point: ``python -m kdexpand.report RUN_DIR [RUN_DIR ...]``.

Prints one row per experiment (runs whose recipes differ only in the seed and the output
location) with mean ± sample standard deviation over its seeds. Exit status 0 on success,
1 when no finished run is found, a path is missing or the plot cannot be written, 2 for
invalid options.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdexpand.analysis.runs import (
    IGNORED_KEYS,
    collect_runs,
    format_csv,
    format_markdown,
    group_runs,
    plot_curves,
    summarize,
)

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m kdexpand.report",
        description="Summarize finished runs over seeds: mean ± std of the best-on-validation and last epochs.",
    )
    parser.add_argument("paths", nargs="+", help="run directories, or folders searched for them (e.g. runs/)")
    parser.add_argument("--metric", default="top1", help="metric name in metrics.json, e.g. top1 or top5 (default top1)")
    parser.add_argument(
        "--ignore", action="append", default=[], metavar="KEY",
        help=(
            "another recipe key to ignore when grouping, e.g. teacher.checkpoint when each seed has its own "
            f"teacher (repeatable; always ignored: {', '.join(sorted(IGNORED_KEYS))})"
        ),
    )
    parser.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="output format (default markdown)")
    parser.add_argument("--plot", metavar="FILE", help="also plot per-epoch curves, mean ± std per group, to FILE (.png, .pdf, .svg)")
    parser.add_argument(
        "--curve", metavar="KEY",
        help="epoch-history key to plot, e.g. loss_total or grad_cos_min (default val_<metric>)",
    )
    return parser.parse_args(argv)


def _argument_error(args: argparse.Namespace) -> str | None:
    """Return what is wrong with option combinations that argparse cannot check, or None."""
    if args.curve and not args.plot:
        return "--curve needs --plot FILE, which names the file to draw the curves into"
    if args.plot:
        plot = Path(args.plot)
        if plot.is_dir() or not plot.suffix:
            return f"--plot {args.plot} has no file extension; name a file such as curves.png, curves.pdf or curves.svg"
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = _argument_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        runs, skipped = collect_runs(args.paths)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for message in skipped:
        print(f"note: {message}", file=sys.stderr)
    if not runs:
        print("error: none of the run directories has finished (no metrics.json); nothing to report", file=sys.stderr)
        return 1

    known = set().union(*(run.recipe for run in runs))
    for key in args.ignore:
        if key not in known:
            print(f"warning: --ignore {key}: no run's recipe has this key, so it changes nothing", file=sys.stderr)
    groups = summarize(group_runs(runs, args.ignore), args.metric)
    print(format_markdown(groups, args.metric) if args.format == "markdown" else format_csv(groups))
    if args.plot:
        try:
            written = plot_curves(groups, args.plot, args.curve or f"val_{args.metric}")
        except (OSError, ValueError) as error:
            print(f"error: cannot write the plot to {args.plot}: {error}", file=sys.stderr)
            return 1
        print(f"note: curves written to {written}", file=sys.stderr)
    for group in groups:
        for warning in group.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
