"""Multi-seed reports: grouping by recipe, mean ± sample std, skipped and repeated runs.

Golden statistics are computed by hand: for 80.0, 81.0 and 82.5 the mean is 81.1667 and the
sample standard deviation sqrt(((-7/6)^2 + (-1/6)^2 + (4/3)^2) / 2) = sqrt(19/12) = 1.25831.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from kdexpand.analysis.runs import collect_runs, format_csv, format_markdown, group_runs, summarize
from kdexpand.recipe import dump_recipe, load_recipe
from kdexpand.report import main

REPO = Path(__file__).resolve().parents[1]


def make_run(folder: Path, seed: int, compact_best: float, *, extra: tuple[str, ...] = (), finished: bool = True) -> Path:
    """Write a run directory as the trainer does: the resolved recipe and, if finished, metrics."""
    recipe = load_recipe(REPO / "recipes" / "cifar10_ck.yaml", [f"train.seed={seed}", f"output.dir={folder}", *extra])
    folder.mkdir(parents=True)
    (folder / "recipe.yaml").write_text(dump_recipe(recipe))
    if finished:
        metrics = {
            "best": {"compact_top1": compact_best, "expanded_top1": compact_best, "val_top1": compact_best + 1, "epoch": 10 + seed},
            "last": {"compact_top1": compact_best - 0.5, "expanded_top1": compact_best - 0.5, "val_top1": compact_best, "epoch": 20},
        }
        metrics["history"] = [{"epoch": epoch, "val_top1": compact_best - 20 + epoch} for epoch in range(1, 21)]
        (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def three_seeds(tmp_path) -> Path:
    for seed, value in enumerate((80.0, 81.0, 82.5)):
        make_run(tmp_path / "ck" / f"seed{seed}", seed, value)
    return tmp_path


def test_seeds_pool_into_one_group(three_seeds):
    runs, skipped = collect_runs([three_seeds])
    groups = group_runs(runs)

    assert skipped == []
    assert len(groups) == 1
    assert groups[0].seeds == [0, 1, 2]
    assert groups[0].label == "cifar10_ck"


def test_mean_and_sample_std_golden(three_seeds):
    runs, _ = collect_runs([three_seeds])
    statistics = summarize(group_runs(runs))[0].statistics

    assert statistics["compact_best"].mean == pytest.approx(81.1666667, abs=1e-6)
    assert statistics["compact_best"].std == pytest.approx(1.2583057, abs=1e-6)
    assert statistics["compact_last"].mean == pytest.approx(80.6666667, abs=1e-6)
    assert statistics["compact_last"].std == pytest.approx(1.2583057, abs=1e-6)
    assert statistics["best_epoch"].mean == pytest.approx(11.0)
    assert "teacher" not in statistics


def test_markdown_row_shows_mean_std(three_seeds):
    runs, _ = collect_runs([three_seeds])
    table = format_markdown(summarize(group_runs(runs)))
    row = table.splitlines()[2]

    assert row.startswith("| cifar10_ck | 3 | 0,1,2 | 81.17 ± 1.26 | 80.67 ± 1.26 | 82.17 ± 1.26 | 11.0 ± 1.0 |")


def test_csv_has_mean_and_std(three_seeds):
    runs, _ = collect_runs([three_seeds])
    header, row = format_csv(summarize(group_runs(runs))).splitlines()
    values = dict(zip(header.split(","), row.split(",")))

    assert float(values["compact_best_mean"]) == pytest.approx(81.1666667, abs=1e-6)
    assert float(values["compact_best_std"]) == pytest.approx(1.2583057, abs=1e-6)
    assert values["teacher_mean"] == ""


def test_different_recipes_split_and_labelled(three_seeds):
    make_run(three_seeds / "ck_lr" / "seed0", 0, 70.0, extra=("train.lr=0.05",))
    runs, _ = collect_runs([three_seeds])
    groups = summarize(group_runs(runs))
    labels = sorted(group.label for group in groups)

    assert len(groups) == 2
    assert labels == ["cifar10_ck (train.lr=0.01)", "cifar10_ck (train.lr=0.05)"]
    single = next(group for group in groups if "0.05" in group.label)
    assert single.statistics["compact_best"].format() == "70.00"
    assert math.isnan(single.statistics["compact_best"].std)


def test_ignore_key_pools_runs(three_seeds):
    make_run(three_seeds / "val4000" / "seed3", 3, 79.0, extra=("data.val_size=4000",))
    runs, _ = collect_runs([three_seeds])

    assert len(group_runs(runs)) == 2
    assert len(group_runs(runs, ignore=["data.val_size"])) == 1


def test_unfinished_run_left_out(three_seeds):
    make_run(three_seeds / "ck" / "seed3", 3, 0.0, finished=False)
    runs, skipped = collect_runs([three_seeds])

    assert len(runs) == 3
    assert len(skipped) == 1
    assert "seed3: no metrics.json" in skipped[0]


def test_repeated_seed_warns(three_seeds):
    make_run(three_seeds / "ck_again" / "seed0", 0, 80.2)
    runs, _ = collect_runs([three_seeds])
    group = summarize(group_runs(runs))[0]

    assert len(group.runs) == 4
    assert len(group.warnings) == 1
    assert "seed 0 appears in 2 runs" in group.warnings[0]


def test_unknown_metric_warns(three_seeds):
    runs, _ = collect_runs([three_seeds])
    group = summarize(group_runs(runs), metric="miou")[0]

    assert set(group.statistics) == {"best_epoch"}
    assert "no run has compact_miou" in group.warnings[0]


def test_cli_missing_path_one_line(tmp_path, capsys):
    status = main([str(tmp_path / "nowhere")])
    error = capsys.readouterr().err

    assert status == 1
    assert error.count("\n") == 1
    assert "nowhere not found" in error


def test_cli_plot_writes_png(three_seeds, tmp_path, capsys):
    plot = tmp_path / "curves.png"

    assert main([str(three_seeds / "ck"), "--plot", str(plot)]) == 0
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "curves written" in capsys.readouterr().err


def test_cli_plot_bad_format(three_seeds, tmp_path, capsys):
    status = main([str(three_seeds / "ck"), "--plot", str(tmp_path / "curves.xyz")])
    error = capsys.readouterr().err

    assert status == 1
    assert error.count("\n") == 1
    assert "Format 'xyz' is not supported" in error


def test_cli_plot_unknown_curve(three_seeds, tmp_path, capsys):
    status = main([str(three_seeds / "ck"), "--plot", str(tmp_path / "curves.png"), "--curve", "grad_cos_min"])
    error = capsys.readouterr().err

    assert status == 1
    assert "no run has 'grad_cos_min' in its epoch history" in error
    assert not (tmp_path / "curves.png").exists()


def test_cli_no_finished_runs(tmp_path, capsys):
    make_run(tmp_path / "seed0", 0, 0.0, finished=False)

    assert main([str(tmp_path)]) == 1
    assert "nothing to report" in capsys.readouterr().err


def test_report_on_real_runs(env, tmp_path):
    """Two seeds of a short real CIFAR-10 run, then the report over both."""
    slice_ = ["data.train_limit=256", "data.eval_limit=200", "train.epochs=2"]
    for seed in (0, 1):
        out = tmp_path / f"seed{seed}"
        command = [sys.executable, "-m", "kdexpand.train", "recipes/cifar10_ck.yaml"]
        for pair in (*slice_, f"train.seed={seed}", f"output.dir={out}", "output.tensorboard=false"):
            command += ["--set", pair]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    report = subprocess.run(
        [sys.executable, "-m", "kdexpand.report", str(tmp_path), "--format", "csv"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert report.returncode == 0, report.stderr
    header, row = report.stdout.strip().splitlines()
    values = dict(zip(header.split(","), row.split(",")))
    expected = [json.loads((tmp_path / f"seed{seed}" / "metrics.json").read_text()) for seed in (0, 1)]
    best = [metrics["best"]["compact_top1"] for metrics in expected]
    last = [metrics["last"]["compact_top1"] for metrics in expected]

    assert values["runs"] == "2"
    assert float(values["compact_best_mean"]) == pytest.approx(sum(best) / 2)
    assert float(values["compact_best_std"]) == pytest.approx(abs(best[0] - best[1]) / math.sqrt(2))
    assert float(values["compact_last_mean"]) == pytest.approx(sum(last) / 2)


def test_labels_use_keys_differing_among_namesakes(three_seeds):
    make_run(three_seeds / "lr" / "seed0", 0, 70.0, extra=("train.lr=0.05",))
    make_run(three_seeds / "epochs" / "seed0", 0, 71.0, extra=("train.epochs=20",))
    runs, _ = collect_runs([three_seeds])
    labels = sorted(group.label for group in group_runs(runs))

    assert labels == [
        "cifar10_ck (train.epochs=150, train.lr=0.01)",
        "cifar10_ck (train.epochs=150, train.lr=0.05)",
        "cifar10_ck (train.epochs=20, train.lr=0.01)",
    ]


def test_analysis_setting_pools_runs(three_seeds):
    make_run(three_seeds / "measured" / "seed3", 3, 80.5, extra=("analysis.gradient_confusion_batches=4",))
    runs, _ = collect_runs([three_seeds])

    assert len(group_runs(runs)) == 1


def test_damaged_metrics_left_out(three_seeds):
    broken = make_run(three_seeds / "ck" / "seed3", 3, 80.0)
    (broken / "metrics.json").write_text('{"best": {"compact_top1": 8')
    listed = make_run(three_seeds / "ck" / "seed4", 4, 80.0)
    (listed / "metrics.json").write_text("[1, 2]")
    runs, skipped = collect_runs([three_seeds])

    assert len(runs) == 3
    assert any("seed3: unreadable recipe.yaml or metrics.json (JSONDecodeError)" in line for line in skipped)
    assert any("seed4: recipe.yaml or metrics.json is not a mapping" in line for line in skipped)


def test_null_value_warns_and_plot_skips_it(three_seeds, tmp_path):
    path = three_seeds / "ck" / "seed1" / "metrics.json"
    metrics = json.loads(path.read_text())
    metrics["last"]["compact_top1"] = None
    metrics["history"][4]["val_top1"] = None
    path.write_text(json.dumps(metrics))
    runs, _ = collect_runs([three_seeds])
    group = summarize(group_runs(runs))[0]

    assert "compact_last" not in group.statistics
    assert "compact_best" in group.statistics
    assert len(group.warnings) == 1
    assert "compact_last is missing or null in 1 of 3 runs" in group.warnings[0]
    assert main([str(three_seeds), "--plot", str(tmp_path / "curves.png")]) == 0


def test_cli_rejects_plot_without_extension(three_seeds, tmp_path, capsys):
    assert main([str(three_seeds), "--plot", str(tmp_path / "curves")]) == 2
    assert "has no file extension" in capsys.readouterr().err
    assert main([str(three_seeds), "--curve", "loss_total"]) == 2
    assert "--curve needs --plot FILE" in capsys.readouterr().err


def test_cli_warns_about_unknown_ignore_key(three_seeds, capsys):
    assert main([str(three_seeds), "--ignore", "train.lrr"]) == 0
    assert "warning: --ignore train.lrr: no run's recipe has this key" in capsys.readouterr().err


def test_cli_accepts_metrics_file(three_seeds, capsys):
    assert main([str(three_seeds / "ck" / "seed0" / "metrics.json")]) == 0
    assert "| cifar10_ck | 1 | 0 |" in capsys.readouterr().out
