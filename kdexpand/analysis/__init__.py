"""Analysis tools: parameter and MAC counts."""

from kdexpand.analysis.counts import count_macs, count_params

__all__ = ["count_macs", "count_params"]
