"""The record of what ``expand`` did to each conv and linear layer of a model."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["LayerDecision", "ExpansionReport"]


@dataclass(frozen=True)
class LayerDecision:
    """The decision for one layer: expanded (and how) or left alone (and why)."""

    name: str
    layer: str
    expanded: bool
    detail: str


@dataclass
class ExpansionReport:
    """Every conv and linear layer that ``expand`` saw, in module order."""

    decisions: list[LayerDecision] = field(default_factory=list)

    @property
    def expanded(self) -> list[LayerDecision]:
        return [decision for decision in self.decisions if decision.expanded]

    @property
    def skipped(self) -> list[LayerDecision]:
        return [decision for decision in self.decisions if not decision.expanded]

    def add(self, name: str, layer: str, expanded: bool, detail: str) -> None:
        self.decisions.append(LayerDecision(name, layer, expanded, detail))

    def __str__(self) -> str:
        if not self.decisions:
            return "no Conv2d or Linear layer found"
        name_width = max(len(decision.name) for decision in self.decisions)
        layer_width = max(len(decision.layer) for decision in self.decisions)
        lines = [f"{len(self.expanded)} expanded, {len(self.skipped)} left alone"]
        for decision in self.decisions:
            status = "expanded  " if decision.expanded else "left alone"
            lines.append(
                f"  {decision.name:<{name_width}}  {decision.layer:<{layer_width}}  {status}  {decision.detail}"
            )
        return "\n".join(lines)
