"""Expansion of compact layers into linear sub-networks and their exact contraction."""

from kdexpand.expansion.report import ExpansionReport, LayerDecision
from kdexpand.expansion.surgery import contract, expand, expanded_units, is_expanded, set_mode, transfer_twin
from kdexpand.expansion.units import ACNetConv2d, ExpandedConv2d, ExpandedLinear, ExpandedUnit

__all__ = [
    "ACNetConv2d",
    "ExpandedConv2d",
    "ExpandedLinear",
    "ExpandedUnit",
    "ExpansionReport",
    "LayerDecision",
    "contract",
    "expand",
    "expanded_units",
    "is_expanded",
    "set_mode",
    "transfer_twin",
]
