"""Malformed recipes fail through the real command line before training starts.

Each case runs :func:`kdexpand.train.main` on real CIFAR-10 and must return a non-zero
status, print exactly one ``error:`` line naming the key or value and the fix, print no
traceback, and leave no run directory behind. Two cases run as separate processes to check
the exit status and the absence of a traceback as a user sees them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from recipe_failures import assert_fails_before_training

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "recipes" / "cifar10_ck.yaml"
KD_STUDENT = REPO / "recipes" / "cifar10_ck_kd.yaml"
SLICE = ["data.train_limit=128", "data.eval_limit=32", "train.batch_size=16", "train.epochs=1", "output.tensorboard=false"]


def sets(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


# (case id, recipe file text or None for the shipped CK recipe, overrides, exit status,
#  fragments the error line must contain). "{base}" is the shipped CK recipe's path, "{tmp}" a
#  scratch folder, "{teacher100}" a teacher checkpoint with a 100-class classifier and "{student}" a
#  SmallNet-7 student checkpoint.
CASES = [
    ("yaml_syntax", "base: {base}\ntrain: {{epochs: 2\n", [], 2, ["not valid YAML"]),
    ("unknown_section", "base: {base}\ntrian:\n  epochs: 2\n", [], 2, ["trian: unknown key", "did you mean 'train'"]),
    ("typo_of_known_key", None, ["train.lrr=0.1"], 2, ["train.lrr: unknown key", "did you mean 'lr'"]),
    ("wrong_type", None, ["train.epochs=ten"], 2, ["train.epochs", "valid integer", "'ten'"]),
    ("zero_epochs", None, ["train.epochs=0"], 2, ["train.epochs", "greater than 0", "(got 0)"]),
    ("negative_epochs", None, ["train.epochs=-3"], 2, ["train.epochs", "greater than 0", "(got -3)"]),
    ("zero_lr", None, ["train.lr=0"], 2, ["train.lr", "greater than 0"]),
    ("negative_lr", None, ["train.lr=-0.1"], 2, ["train.lr", "greater than 0", "-0.1"]),
    ("zero_rate", None, ["expand.rate=0"], 2, ["expand.rate", "greater than 0"]),
    ("negative_rate", None, ["expand.rate=-4"], 2, ["expand.rate", "greater than 0"]),
    ("unknown_precision", None, ["train.mixed_precision=fp8"], 2, ["train.mixed_precision", "'fp8'"]),
    ("milestones_not_increasing", None, ["train.milestones=[100, 50]"], 2, ["train.milestones must increase"]),
    ("base_cycle", "base: cycle_b.yaml\n", [], 2, ["recipe inheritance cycle", "remove one of the base: keys"]),
    ("base_missing", "base: nowhere.yaml\n", [], 2, ["nowhere.yaml not found"]),
    ("base_not_a_path", "base: 42\n", [], 2, ["base must be a file path"]),
    ("base_not_a_mapping", "base: list_base.yaml\n", [], 2, ["must be a mapping of sections"]),
    ("python_tag", "base: {base}\nname: !!python/object/apply:os.mkdir ['{tmp}/created']\n", [], 2, ["not valid YAML"]),
    ("missing_teacher_checkpoint", "base: {kd}\n", ["teacher.checkpoint={tmp}/none.safetensors"], 1,
     ["teacher checkpoint", "none.safetensors not found", "create it with"]),
    ("teacher_other_classes", "base: {kd}\n", ["teacher.model=test_resnet", "teacher.checkpoint={teacher100}"], 2,
     ["classifier for 100 classes", "dataset has 10", "use a teacher trained on this dataset"]),
    ("student_weights_as_teacher", "base: {kd}\n", ["teacher.model=test_resnet", "teacher.checkpoint={student}"], 2,
     ["compact.safetensors: its keys do not match teacher.model 'test_resnet'", "missing: ['", "unexpected: ['"]),
    ("teacher_checkpoint_is_directory", "base: {kd}\n", ["teacher.checkpoint={tmp}"], 2,
     ["teacher.checkpoint", "is a directory, but a .safetensors file is expected"]),
    ("tap_not_in_model", "base: {kd}\n",
     ["distill.losses=[{{name: hint, weight: 1.0, student: features.99, teacher: layer2}}]"], 2,
     ["distill.losses.0.student", "features.99", "Valid choices"]),
    ("ck_without_large_kernels", None, ["student.model=smallnet3"], 2,
     ["expand.conv='ck' expands no convolution", "3x3", "set expand.fallback: cl"]),
    ("unknown_model", None, ["student.model=smallnet9"], 2, ["student: unknown model 'smallnet9'", "smallnet7"]),
    ("bad_model_argument", None, ["student.kwargs={{depth: 3}}"], 2, ["student:", "depth", "check student.kwargs"]),
    ("kernel_size_from_model_name", None, ["student.kwargs={{kernel_size: 4}}"], 2,
     ["student: kernel_size is set by the model name 'smallnet7'", "remove kernel_size from student.kwargs"]),
    ("num_classes_from_dataset", None, ["student.kwargs={{num_classes: 100}}"], 2,
     ["student.kwargs: num_classes must not be set here, because the dataset sets them"]),
    ("seed_out_of_range", None, ["train.seed=99999999999999"], 2, ["train.seed", "less than or equal to 4294967295"]),
    ("negative_seed", None, ["train.seed=-1"], 2, ["train.seed", "greater than or equal to 0"]),
    ("upper_case_section", None, ["TRAIN.lr=1"], 2, ["TRAIN: unknown key", "did you mean 'train'"]),
    ("upper_case_key", None, ["train.LR=0.1"], 2, ["train.LR: unknown key", "did you mean 'lr'"]),
    ("unknown_task", None, ["task=segmentation"], 2, ["unknown task 'segmentation'", "classification"]),
    ("boolean_epochs", None, ["train.epochs=true"], 2, ["train.epochs", "got the boolean true"]),
    ("output_dir_is_file", None, ["output.dir={tmp}/cycle_b.yaml"], 1,
     ["output.dir", "cycle_b.yaml is a file, not a folder", "set output.dir to a new folder path"]),
    ("output_dir_inside_file", None, ["output.dir={tmp}/cycle_b.yaml/run"], 1,
     ["output.dir", "lies inside", "cycle_b.yaml, which is a file"]),
    ("include_matches_nothing", None, ["expand.include=[head.*]"], 2, ["expand:", "'head.*' matches no"]),
    ("missing_dataset_path", None, ["data.root={tmp}/no_data"], 1, ["data.root", "does not contain train.parquet"]),
    ("unknown_test_split", None, ["data.test_split=tst"], 2,
     ["data: split 'tst' not found in", "cifar10; available: test, train", "data.test_split"]),
    ("label_column_missing", None, ["data.label_column=fine_label"], 2, ["no column 'fine_label'", "data.label_column"]),
    ("empty_validation_slice", None, ["data.val_size=0"], 2, ["the val split is empty", "data.val_size"]),
    ("no_training_images", None, ["data.train_limit=1"], 2, ["leaves no training images", "data.train_limit"]),
    ("batch_larger_than_data", None, ["train.batch_size=4096"], 2,
     ["train.batch_size=4096 is larger than the 115 training images", "lower train.batch_size"]),
]


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory) -> dict[str, str]:
    return dict(
        os.environ, KDEXPAND_DATA=str(shared_data), KDEXPAND_CACHE=str(tmp_path_factory.mktemp("cache")),
        HF_HUB_OFFLINE="1",
    )


@pytest.fixture(scope="module")
def teacher100(tmp_path_factory) -> Path:
    """A timm test_resnet checkpoint with a 100-class classifier (CIFAR-100 shape)."""
    path = tmp_path_factory.mktemp("teacher") / "teacher100.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=100).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def student_weights(tmp_path_factory) -> Path:
    """The compact.safetensors of a SmallNet-7 student, which is no timm teacher."""
    from kdexpand.models import build_model

    path = tmp_path_factory.mktemp("student") / "compact.safetensors"
    save_file(build_model("smallnet7", 10).state_dict(), str(path))
    return path


@pytest.fixture
def case_args(tmp_path, teacher100, student_weights):
    """Build the command line of a case: its recipe file in ``tmp_path`` and its overrides."""

    def build(text: str | None, overrides: list[str]) -> list[str]:
        values = {
            "base": STUDENT, "kd": KD_STUDENT, "tmp": tmp_path, "teacher100": teacher100, "student": student_weights,
        }
        (tmp_path / "cycle_b.yaml").write_text("base: recipe.yaml\n")
        (tmp_path / "list_base.yaml").write_text("- a\n- b\n")
        recipe = STUDENT
        if text is not None:
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(text.format(**values))
        pairs = [*SLICE, f"output.dir={tmp_path / 'run'}", *[item.format(**values) for item in overrides]]
        return [str(recipe), *sets(*pairs)]

    return build


def test_table_has_twenty_cases():
    assert len(CASES) >= 20
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize(("text", "overrides", "status", "fragments"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_bad_recipe_fails_before_training(env, monkeypatch, case_args, tmp_path, capsys, text, overrides, status, fragments):
    assert_fails_before_training(
        case_args(text, overrides), env, monkeypatch, capsys, tmp_path / "run", status, fragments
    )
    assert not (tmp_path / "created").exists()


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdexpand.train", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_process_exit_status_without_traceback(env, case_args):
    result = run_cli(case_args(None, ["train.lr=-0.1"]), env)
    assert result.returncode == 2
    expected = f"error: {STUDENT}: invalid recipe: train.lr: Input should be greater than 0 (got -0.1)"
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.slow
def test_debug_shows_traceback(env, case_args, tmp_path):
    # A check that needs the data: it fails after loading, still before any folder exists.
    result = run_cli([*case_args(None, ["student.model=smallnet3"]), "--debug"], env)
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "RecipeError: expand.conv='ck' expands no convolution" in result.stderr
    assert not (tmp_path / "run").exists()


def test_resume_and_overwrite_exclude_each_other(capsys):
    from kdexpand.train import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(STUDENT), "--resume", "--overwrite"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_overwrite_refuses_folder_that_is_no_run(env, monkeypatch, tmp_path, capsys):
    from kdexpand.train import main

    for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("keep me")
    returned = main([str(STUDENT), *sets(*SLICE, f"output.dir={precious}"), "--overwrite"])
    assert returned == 1
    assert "not a kdexpand run; refusing to delete it" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "keep me"


def test_overwrite_keeps_user_folder_with_recipe(env, monkeypatch, tmp_path, capsys):
    from kdexpand.train import main

    for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "recipe.yaml").write_text("name: mine\n")
    (precious / "thesis.tex").write_text("keep me")
    returned = main([str(STUDENT), *sets(*SLICE, f"output.dir={precious}"), "--overwrite"])
    assert returned == 1
    assert "not a kdexpand run; refusing to delete it" in capsys.readouterr().err
    assert (precious / "thesis.tex").read_text() == "keep me"
    assert (precious / "recipe.yaml").read_text() == "name: mine\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 mixed precision is valid with CUDA")
def test_fp16_without_cuda_is_rejected(env, monkeypatch, case_args, tmp_path, capsys):
    from kdexpand.train import main

    for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    returned = main(case_args(None, ["train.mixed_precision=fp16"]))
    error = capsys.readouterr().err
    assert returned == 2, error
    assert error.strip().splitlines() == [
        "error: train.mixed_precision=fp16 needs a CUDA GPU, and this machine has none, so the run would "
        "train in float32; set train.mixed_precision to bf16 or no"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("processes", "expected"),
    [
        (1, "python -m kdexpand.train r.yaml --set train.lr=0.1 --resume"),
        (2, "accelerate launch --multi_gpu --num_processes 2 -m kdexpand.train r.yaml --set train.lr=0.1 --resume"),
    ],
)
def test_resume_command_per_process_count(processes, expected):
    from kdexpand.train import parse_args, resume_command

    args = parse_args(["r.yaml", "--set", "train.lr=0.1"])
    assert resume_command(args, processes) == expected


@pytest.mark.parametrize(
    ("epoch", "step", "stage", "expected"),
    [
        (0, 8, None, "0 of 3 epochs done, 8 batches into epoch 1"),
        (2, 0, None, "2 of 3 epochs done"),
        (1, 4, "twin", "stage twin: 1 of 3 epochs done, 4 batches into epoch 2"),
    ],
)
def test_resume_progress_message(epoch, step, stage, expected):
    from kdexpand.trainer.checkpoint import TrainState
    from kdexpand.trainer.run import resume_progress

    assert resume_progress(TrainState(epoch=epoch, step=step), 3, stage) == expected


def test_summary_separates_session_and_training_time():
    from kdexpand.train import summary

    result = {"epoch": 1, "expanded_top1": 50.0, "compact_top1": 50.0, "contraction_max_abs_diff": 1e-6}
    metrics = {
        "best": result, "last": result, "params_compact": 1, "params_expanded": 2, "macs_compact": 3,
        "macs_expanded": 4, "wall_seconds": 21.2, "train_seconds": 22.4,
    }
    assert summary(metrics).splitlines()[-1] == "wall time 21 s in this session | training 22 s in all sessions"
