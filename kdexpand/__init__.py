"""kdexpand: train compact CNNs as linearly expanded ExpandNets, then contract them exactly."""

from kdexpand.expansion import (
    ExpansionReport,
    contract,
    expand,
    expanded_units,
    is_expanded,
    set_mode,
    transfer_twin,
)

__all__ = [
    "ExpansionReport",
    "contract",
    "expand",
    "expanded_units",
    "is_expanded",
    "set_mode",
    "transfer_twin",
]

__version__ = "0.1.0"
