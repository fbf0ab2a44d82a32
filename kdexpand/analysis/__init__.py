"""Analysis tools: parameter and MAC counts, multi-seed reports over run directories."""

from kdexpand.analysis.counts import count_macs, count_params
from kdexpand.analysis.runs import collect_runs, format_csv, format_markdown, group_runs, summarize

__all__ = ["collect_runs", "count_macs", "count_params", "format_csv", "format_markdown", "group_runs", "summarize"]
