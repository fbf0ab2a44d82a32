"""Analysis tools: parameter and MAC counts, gradient confusion, multi-seed reports."""

from kdexpand.analysis.counts import count_macs, count_params
from kdexpand.analysis.gradients import GradientConfusion, gradient_confusion
from kdexpand.analysis.runs import collect_runs, format_csv, format_markdown, group_runs, plot_curves, summarize

__all__ = [
    "GradientConfusion",
    "collect_runs",
    "count_macs",
    "count_params",
    "format_csv",
    "format_markdown",
    "gradient_confusion",
    "group_runs",
    "plot_curves",
    "summarize",
]
