"""Multi-seed reports: collect finished run directories, group them by recipe, summarize.

A run directory contains the resolved ``recipe.yaml`` and, once the run has finished,
``metrics.json``. Runs belong to the same group when their recipes are equal in every key
except those of :data:`IGNORED_KEYS` (the seed, where outputs go, logging), so seeds of one
experiment are pooled and nothing else is. Every statistic is mean ± sample standard
deviation (n - 1 in the denominator) over the group's runs, for the test metric of the
best-on-validation epoch and of the last epoch. The test split never selects anything here.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kdexpand.recipe import flatten_keys

__all__ = [
    "IGNORED_KEYS",
    "GroupSummary",
    "RunRecord",
    "Statistic",
    "collect_runs",
    "format_csv",
    "format_markdown",
    "group_runs",
    "plot_curves",
    "summarize",
]

# Recipe keys that do not change what a run measures (the analysis leaves training
# bit-identical). ``name`` is left out too, so a copy of a recipe under another file name
# pools with the original.
IGNORED_KEYS = frozenset({
    "name", "train.seed", "train.log_every", "data.root", "data.cache",
    "output.dir", "output.onnx", "output.tensorboard", "analysis.gradient_confusion_batches",
})


@dataclass(frozen=True)
class RunRecord:
    """One finished run: its directory, flattened recipe and ``metrics.json`` contents."""

    path: Path
    recipe: dict[str, Any]
    metrics: dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.recipe.get("train.seed")

    @property
    def name(self) -> str:
        return str(self.recipe.get("name", self.path.name))


@dataclass(frozen=True)
class Statistic:
    """Mean and sample standard deviation of ``values``; ``std`` is NaN for a single run."""

    values: tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.count > 1 else math.nan

    def format(self, digits: int = 2) -> str:
        if self.count == 1:
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class GroupSummary:
    """The runs of one experiment and the statistics over them."""

    label: str
    runs: list[RunRecord]
    statistics: dict[str, Statistic] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def seeds(self) -> list[Any]:
        return sorted(run.seed for run in self.runs)


def _run_directories(paths: Iterable[str | Path]) -> list[Path]:
    """Return every folder with a ``recipe.yaml`` at or under ``paths``, in sorted order."""
    found: set[Path] = set()
    for path in map(Path, paths):
        if path.is_file() and path.name in ("recipe.yaml", "metrics.json"):
            path = path.parent
        if not path.is_dir():
            raise FileNotFoundError(f"run directory {path} not found; pass run directories or folders that contain them")
        found.update(recipe.parent for recipe in path.rglob("recipe.yaml"))
    return sorted(found)


def collect_runs(paths: Iterable[str | Path]) -> tuple[list[RunRecord], list[str]]:
    """Read the finished runs at or under ``paths``.

    Returns:
        The finished runs, and one message per run directory that was skipped (no
        ``metrics.json`` yet, so the run is unfinished or failed).

    Raises:
        FileNotFoundError: A path does not exist, or no run directory is under any path.
    """
    paths = list(paths)
    directories = _run_directories(paths)
    if not directories:
        raise FileNotFoundError(
            f"no run directory (a folder with recipe.yaml) under {', '.join(map(str, paths))}; "
            "pass the output.dir of finished runs"
        )
    runs: list[RunRecord] = []
    skipped: list[str] = []
    for directory in directories:
        metrics_path = directory / "metrics.json"
        if not metrics_path.is_file():
            skipped.append(f"{directory}: no metrics.json (unfinished or failed run), left out")
            continue
        try:
            recipe = yaml.safe_load((directory / "recipe.yaml").read_text())
            metrics = json.loads(metrics_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:
            skipped.append(f"{directory}: unreadable recipe.yaml or metrics.json ({type(error).__name__}), left out")
            continue
        if not isinstance(recipe, dict) or not isinstance(metrics, dict):
            skipped.append(f"{directory}: recipe.yaml or metrics.json is not a mapping, left out")
            continue
        runs.append(RunRecord(directory, flatten_keys(recipe), metrics))
    return runs, skipped


def _experiment_key(run: RunRecord, ignored: frozenset[str]) -> str:
    kept = {key: value for key, value in run.recipe.items() if key not in ignored}
    return json.dumps(kept, sort_keys=True, default=str)


def _differing_keys(groups: Sequence[list[RunRecord]], ignored: frozenset[str]) -> list[str]:
    """Return the recipe keys whose values differ between groups, sorted."""
    keys = set().union(*(run.recipe for runs in groups for run in runs)) - ignored
    return sorted(
        key for key in keys
        if len({json.dumps(runs[0].recipe.get(key), default=str) for runs in groups}) > 1
    )


def _name(runs: list[RunRecord]) -> str:
    return "+".join(sorted({run.name for run in runs}))


def _labels(grouped: list[list[RunRecord]], ignored: frozenset[str]) -> list[str]:
    """Label groups by recipe name; groups that share a name also get the keys that tell them apart."""
    names = [_name(runs) for runs in grouped]
    labels = []
    for runs, name in zip(grouped, names):
        namesakes = [other for other, other_name in zip(grouped, names) if other_name == name]
        if len(namesakes) == 1:
            labels.append(name)
            continue
        differing = _differing_keys(namesakes, ignored)
        shown = ", ".join(f"{key}={runs[0].recipe.get(key)}" for key in differing[:4])
        more = f", +{len(differing) - 4} more" if len(differing) > 4 else ""
        labels.append(f"{name} ({shown}{more})")
    return labels


def group_runs(runs: Sequence[RunRecord], ignore: Iterable[str] = ()) -> list[GroupSummary]:
    """Group ``runs`` by recipe, ignoring :data:`IGNORED_KEYS` and the extra keys ``ignore``.

    Each group is labelled by its recipe names. Groups that share a name also get the first
    four recipe keys that differ among them, with their values.
    """
    ignored = IGNORED_KEYS | frozenset(ignore)
    by_key: dict[str, list[RunRecord]] = {}
    for run in runs:
        by_key.setdefault(_experiment_key(run, ignored), []).append(run)
    grouped = list(by_key.values())
    return [GroupSummary(label, group) for label, group in zip(_labels(grouped, ignored), grouped)]


def _duplicate_seed_warnings(group: GroupSummary) -> list[str]:
    warnings = []
    for seed in sorted(set(group.seeds)):
        paths = [str(run.path) for run in group.runs if run.seed == seed]
        if len(paths) > 1:
            warnings.append(
                f"{group.label}: seed {seed} appears in {len(paths)} runs ({', '.join(paths)}); "
                "repeated seeds understate the spread, so keep one run per seed"
            )
    return warnings


def _metric_values(group: GroupSummary, name: str, lookup) -> tuple[float, ...] | None:
    """Return the statistic's value of every run, or None (with a warning if some have it)."""
    values = [lookup(run.metrics) for run in group.runs]
    missing = [str(run.path) for run, value in zip(group.runs, values) if value is None]
    if not missing:
        return tuple(float(value) for value in values)
    if len(missing) < len(values):
        group.warnings.append(
            f"{group.label}: {name} is missing or null in {len(missing)} of {len(values)} runs "
            f"({', '.join(missing)}), so it is left out of the table"
        )
    return None


def summarize(groups: Sequence[GroupSummary], metric: str = "top1") -> list[GroupSummary]:
    """Fill every group's statistics for ``metric`` (``top1``, ``top5``, ...) and its warnings.

    A statistic is present when every run of the group has its value. ``compact_best`` and
    ``compact_last`` are the compact network's test metric at the best-on-validation epoch
    and at the last epoch, and ``expanded_best`` is the ExpandNet's. ``val_best`` is the
    validation metric that chose the best epoch, ``best_epoch`` that epoch, and ``teacher``
    the teacher's test metric.
    """
    lookups = {
        "compact_best": lambda m: m.get("best", {}).get(f"compact_{metric}"),
        "compact_last": lambda m: m.get("last", {}).get(f"compact_{metric}"),
        "expanded_best": lambda m: m.get("best", {}).get(f"expanded_{metric}"),
        "val_best": lambda m: m.get("best", {}).get(f"val_{metric}"),
        "best_epoch": lambda m: m.get("best", {}).get("epoch"),
        "teacher": lambda m: m.get(f"teacher_{metric}"),
    }
    for group in groups:
        group.statistics = {}
        group.warnings = []
        for name, lookup in lookups.items():
            values = _metric_values(group, name, lookup)
            if values is not None:
                group.statistics[name] = Statistic(values)
        if all(run.metrics.get("best", {}).get(f"compact_{metric}") is None for run in group.runs):
            group.warnings.append(f"{group.label}: no run has compact_{metric} in metrics.json; check --metric")
        group.warnings.extend(_duplicate_seed_warnings(group))
    return list(groups)


_COLUMNS = [
    ("compact_best", "compact test {metric} @ best val"),
    ("compact_last", "compact test {metric} @ last"),
    ("val_best", "val {metric} @ best"),
    ("best_epoch", "best epoch"),
    ("teacher", "teacher test {metric}"),
]


def format_markdown(groups: Sequence[GroupSummary], metric: str = "top1") -> str:
    """Return a Markdown table: one row per group, mean ± std over its seeds."""
    header = ["experiment", "runs", "seeds"] + [title.format(metric=metric) for _, title in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(_COLUMNS)]
    for group in groups:
        cells = [group.label, str(len(group.runs)), ",".join(map(str, group.seeds))]
        for key, _ in _COLUMNS:
            statistic = group.statistics.get(key)
            digits = 1 if key == "best_epoch" else 2
            cells.append(statistic.format(digits) if statistic is not None else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_csv(groups: Sequence[GroupSummary]) -> str:
    """Return CSV with one row per group: count, mean and std of every statistic."""
    names = [key for key, _ in _COLUMNS] + ["expanded_best"]
    header = ["experiment", "runs", "seeds"] + [f"{key}_{part}" for key in names for part in ("mean", "std")]
    rows = [",".join(header)]
    for group in groups:
        cells = [json.dumps(group.label), str(len(group.runs)), json.dumps(" ".join(map(str, group.seeds)))]
        for key in names:
            statistic = group.statistics.get(key)
            cells += ["", ""] if statistic is None else [repr(statistic.mean), repr(statistic.std)]
        rows.append(",".join(cells))
    return "\n".join(rows)


def _history_values(run: RunRecord, key: str) -> dict[int, float]:
    """Return ``{epoch: value}`` of ``key`` in the run's epoch history, null values left out."""
    values = {}
    for entry in run.metrics.get("history", []):
        if isinstance(entry, dict) and isinstance(entry.get(key), (int, float)) and "epoch" in entry:
            values[entry["epoch"]] = float(entry[key])
    return values


def plot_curves(groups: Sequence[GroupSummary], path: str | Path, key: str = "val_top1") -> Path:
    """Plot the per-epoch history value ``key`` of every group, mean line and ± std band, to ``path``.

    ``key`` is any entry of the epoch history in ``metrics.json``: ``val_top1``,
    ``loss_total``, ``grad_cos_min`` (with ``analysis.gradient_confusion_batches``) and so on.
    Entries are matched by their ``epoch`` field. Epochs that not every run of a group has a
    finite value for (not reached, or written as null) are left out of that group's curve.

    Raises:
        ValueError: No run has ``key`` in its history, or ``path`` has an unknown format.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, so no display is needed
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    plotted = 0
    for group in groups:
        curves = [_history_values(run, key) for run in group.runs]
        epochs = sorted(set.intersection(*(set(curve) for curve in curves)))
        if not epochs:
            continue
        per_epoch = [Statistic(tuple(curve[epoch] for curve in curves)) for epoch in epochs]
        means = [statistic.mean for statistic in per_epoch]
        spreads = [0.0 if statistic.count == 1 else statistic.std for statistic in per_epoch]
        axes.plot(epochs, means, label=f"{group.label} (n={len(group.runs)})")
        plotted += 1
        lower = [mean - spread for mean, spread in zip(means, spreads)]
        upper = [mean + spread for mean, spread in zip(means, spreads)]
        axes.fill_between(epochs, lower, upper, alpha=0.2)
    if not plotted:
        plt.close(figure)
        raise ValueError(f"no run has {key!r} in its epoch history; name a key of the history in metrics.json")
    axes.set_xlabel("epoch")
    axes.set_ylabel(key)
    axes.legend(fontsize="small")
    axes.grid(alpha=0.3)
    path = Path(path)
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
