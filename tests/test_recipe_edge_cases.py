"""Recipe edge cases: timm teacher names, hub downloads, non-finite floats, repeated keys, e-notation.

The bad-recipe table runs :func:`kdexpand.train.main` on real CIFAR-10, as in
``test_reliability_recipes.py``: each case must return its exit status, print exactly one
``error:`` line with the expected fragments and leave no run directory behind. Two cases
run as separate processes to check the exit status and the absence of a traceback as a
user sees them.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from recipe_failures import assert_fails_before_training

from kdexpand.recipe import RecipeError, dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "recipes" / "cifar10_ck.yaml"
QUICK_KD = REPO / "recipes" / "quick_cifar_ck_kd.yaml"
SLICE = ["data.train_limit=256", "data.eval_limit=100", "train.epochs=1", "output.tensorboard=false"]


def sets(*pairs: str) -> list[str]:
    return [part for pair in pairs for part in ("--set", pair)]


# (case id, recipe file text or None for the shipped CK recipe, overrides, exit status,
#  fragments the error line must contain). "{base}" is the shipped CK recipe's path, "{quick}"
#  the quick KD recipe's path and "{junk}" an existing file that is no safetensors file.
CASES = [
    ("unknown_teacher_model", "base: {quick}\n", ["teacher.model=resnet19", "teacher.checkpoint={junk}"], 2,
     ["recipe.yaml: invalid recipe: teacher.model: unknown timm model 'resnet19'; did you mean 'resnet18'?"]),
    ("teacher_model_upper_case", "base: {quick}\n", ["teacher.model=ResNet18", "teacher.checkpoint={junk}"], 2,
     ["teacher.model: unknown timm model 'ResNet18'; did you mean 'resnet18'?"]),
    ("teacher_model_far_from_any", "base: {quick}\n", ["teacher.model=qqqq_zzzz", "teacher.checkpoint={junk}"], 2,
     ["teacher.model: unknown timm model 'qqqq_zzzz'; use a name from timm.list_models()"]),
    ("teacher_model_hub_id_without_prefix", "base: {quick}\n", ["teacher.model=timm/resnet18"], 2,
     ["teacher.model:", "Use 'hf-hub:timm/resnet18'"]),
    ("infinite_lr", None, ["train.lr=.inf"], 2, ["train.lr: Input should be a finite number (got inf)"]),
    ("nan_lr", None, ["train.lr=.nan"], 2, ["train.lr: Input should be a finite number (got nan)"]),
    ("infinite_lr_as_text", None, ["train.lr=inf"], 2, ["train.lr: Input should be a finite number (got 'inf')"]),
    ("negative_infinite_weight_decay", None, ["train.weight_decay=-.inf"], 2,
     ["train.weight_decay: Input should be a finite number (got -inf)"]),
    ("nan_in_mean", None, ["data.mean=[0.5, .nan, 0.5]"], 2, ["data.mean.1: Input should be a finite number (got nan)"]),
    ("infinite_optional_float", None, ["train.max_grad_norm=.inf"], 2,
     ["train.max_grad_norm: Input should be a finite number (got inf)"]),
    ("infinite_twin_lr", None, ["init.twin.epochs=1", "init.twin.lr=.inf"], 2,
     ["init.twin.lr: Input should be a finite number (got inf)"]),
    ("infinite_student_kwarg", None, ["student.kwargs={{dropout: .inf}}"], 2,
     ["student.kwargs: value inf at dropout is not a finite number; write a finite number"]),
    ("nan_nested_in_teacher_kwargs", "base: {quick}\n", ["teacher.kwargs={{block_args: {{scale: [1, .nan]}}}}"], 2,
     ["teacher.kwargs: value nan at block_args.scale.1 is not a finite number"]),
    ("infinite_loss_parameter", "base: {quick}\n", ["distill.losses.0.params.temperature=.inf"], 2,
     ["distill.losses.0.params: value inf at temperature is not a finite number"]),
    ("duplicate_key_in_section", "base: {base}\ntrain:\n  lr: 0.1\n  lr: 0.2\n", [], 2,
     ["recipe.yaml: duplicate key 'train.lr' at line 4 (first at line 3); remove one of them"]),
    ("duplicate_section", "base: {base}\ntrain:\n  lr: 0.1\nexpand:\n  rate: 2\ntrain:\n  epochs: 3\n", [], 2,
     ["recipe.yaml: duplicate key 'train' at line 6 (first at line 2); remove one of them"]),
    ("duplicate_key_in_list_item", "base: {quick}\ndistill:\n  losses:\n    - name: kd\n      name: dkd\n", [], 2,
     ["duplicate key 'distill.losses.0.name' at line 5 (first at line 4)"]),
    ("duplicate_key_in_base", "base: duplicate_base.yaml\n", [], 2,
     ["duplicate_base.yaml: duplicate key 'train.epochs' at line 4 (first at line 3)"]),
    ("duplicate_key_in_override", None, ["train={{lr: 0.1, lr: 0.2}}"], 2,
     ["override 'train={lr: 0.1, lr: 0.2}': duplicate key 'lr'; remove one of them"]),
    ("fractional_count_in_e_notation", None, ["train.epochs=5.125e2"], 2,
     ["train.epochs: Input should be a valid integer, got a number with a fractional part (got 512.5)"]),
    ("python_tag", "base: {base}\nname: !!python/object/apply:os.getcwd []\n", [], 2, ["not valid YAML"]),
]


@pytest.fixture(scope="module")
def junk_file(tmp_path_factory) -> Path:
    """An existing file that is no safetensors file, as a teacher checkpoint."""
    path = tmp_path_factory.mktemp("junk") / "teacher.safetensors"
    path.write_text("not a safetensors file\n")
    return path


@pytest.fixture
def case_args(tmp_path, junk_file):
    """Build the command line of a case: its recipe file in ``tmp_path`` and its overrides."""

    def build(text: str | None, overrides: list[str]) -> list[str]:
        values = {"base": STUDENT, "quick": QUICK_KD, "junk": junk_file}
        (tmp_path / "duplicate_base.yaml").write_text(f"base: {STUDENT}\ntrain:\n  epochs: 2\n  epochs: 3\n")
        recipe = STUDENT
        if text is not None:
            recipe = tmp_path / "recipe.yaml"
            recipe.write_text(text.format(**values))
        pairs = [*SLICE, f"output.dir={tmp_path / 'run'}", *[item.format(**values) for item in overrides]]
        return [str(recipe), *sets(*pairs)]

    return build


@pytest.mark.parametrize(("text", "overrides", "status", "fragments"), [case[1:] for case in CASES],
                         ids=[case[0] for case in CASES])
def test_edge_case_fails_before_training(env, monkeypatch, case_args, tmp_path, capsys, text, overrides, status, fragments):
    assert_fails_before_training(
        case_args(text, overrides), env, monkeypatch, capsys, tmp_path / "run", status, fragments
    )


def run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "kdexpand.train", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_unknown_teacher_model_process(env, junk_file, tmp_path):
    overrides = [*SLICE, "teacher.model=resnet19", f"teacher.checkpoint={junk_file}", f"output.dir={tmp_path / 'run'}"]
    result = run_cli(["recipes/quick_cifar_ck_kd.yaml", *sets(*overrides)], env)

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: recipes/quick_cifar_ck_kd.yaml: invalid recipe: teacher.model: unknown timm model 'resnet19'; "
        "did you mean 'resnet18'?"
    ]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pretrained_teacher_offline_process(env, tmp_path):
    # The env fixture sets HF_HUB_OFFLINE=1, so the hub fails at once instead of retrying.
    overrides = [*SLICE, "teacher.checkpoint=null", "teacher.pretrained=true", f"output.dir={tmp_path / 'run'}"]
    result = run_cli(["recipes/quick_cifar_ck_kd.yaml", *sets(*overrides)], env)

    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: teacher.pretrained=true: failed to download the timm weights of resnet18 (OfflineModeIsEnabled: "
        "Cannot reach https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/pytorch_model.bin: offline mode "
        "is enabled); set teacher.checkpoint to a local safetensors file and teacher.pretrained=false, "
        "or run online with HF_HUB_OFFLINE unset"
    ]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_pretrained_download_failure_names_fix(monkeypatch):
    # Without network, huggingface_hub raises LocalEntryNotFoundError caused by the resolver's OSError.
    import huggingface_hub.constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    from kdexpand.recipe import TeacherConfig
    from kdexpand.teachers import TeacherDownloadError, build_teacher

    def create_model(*args, **kwargs):
        try:
            raise OSError(-2, "Name or service not known")
        except OSError as cause:
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub.") from cause

    monkeypatch.setattr("kdexpand.teachers.timm.create_model", create_model)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(TeacherDownloadError) as error:
        build_teacher(TeacherConfig(model="resnet18", pretrained=True), num_classes=10)
    assert str(error.value) == (
        "teacher.pretrained=true: failed to download the timm weights of resnet18 "
        "(OSError: [Errno -2] Name or service not known); set teacher.checkpoint to a local safetensors file "
        "and teacher.pretrained=false, or run online"
    )
    assert isinstance(error.value, FileNotFoundError), "kdexpand.train maps FileNotFoundError to exit status 1"


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("hf-hub:timm/resnet18.a1_in1k",
         "teacher.model=hf-hub:timm/resnet18.a1_in1k: failed to download its timm config (OfflineModeIsEnabled: "
         "Cannot reach https://huggingface.co/timm/resnet18.a1_in1k/resolve/main/config.json: offline mode is "
         "enabled); use a timm model name such as resnet18, or run online with HF_HUB_OFFLINE unset"),
        ("local-dir:{tmp}/absent",
         "teacher.model=local-dir:{tmp}/absent: failed to load the timm model in {tmp}/absent (FileNotFoundError: "
         "Config file not found: {tmp}/absent/config.json); fix the folder path, or use a timm model name such as "
         "resnet18"),
    ],
)
def test_teacher_source_failure_names_fix(monkeypatch, junk_file, tmp_path, model, expected):
    import huggingface_hub.constants

    from kdexpand.recipe import TeacherConfig
    from kdexpand.teachers import TeacherDownloadError, build_teacher

    # huggingface_hub reads HF_HUB_OFFLINE when it is imported, so the constant is set here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = TeacherConfig(model=model.format(tmp=tmp_path), checkpoint=junk_file)
    with pytest.raises(TeacherDownloadError) as error:
        build_teacher(config, num_classes=10)
    assert str(error.value) == expected.format(tmp=tmp_path)


@pytest.mark.parametrize(
    "model",
    ["resnet18", "resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", "local-dir:/models/resnet18"],
)
def test_teacher_model_accepts_timm_names(model):
    # A source-prefixed name is resolved only when the teacher is built, so no download happens here.
    recipe = load_recipe(STUDENT, ["teacher.model=" + model, "teacher.checkpoint=t.safetensors"])
    assert recipe.teacher.model == model


@pytest.mark.parametrize(
    ("override", "key", "expected"),
    [
        ("data.train_limit=5.12e2", "train_limit", 512),
        ("data.train_limit=.5e3", "train_limit", 500),
        ("data.train_limit=1e2", "train_limit", 100),
        ("data.eval_limit=5.12E+2", "eval_limit", 512),
        ("data.mean=[-1.5E-3, .5e0, 5.e-1]", "mean", (-0.0015, 0.5, 0.5)),
    ],
)
def test_override_reads_decimal_e_notation(override, key, expected):
    recipe = load_recipe(STUDENT, [override])
    value = getattr(recipe.data, key)
    assert value == expected
    assert type(value) is type(expected)


def test_count_in_e_notation_is_whole_number():
    recipe = load_recipe(STUDENT, ["train.epochs=5.12e2"])
    assert recipe.train.epochs == 512
    assert type(recipe.train.epochs) is int


def test_recipe_file_reads_decimal_e_notation(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {STUDENT}\ndata:\n  train_limit: 5.12e2\ntrain:\n  lr: .5e-1\n  weight_decay: 5e-4\n")
    recipe = load_recipe(path)
    assert recipe.data.train_limit == 512
    assert recipe.train.lr == 0.05
    assert recipe.train.weight_decay == 0.0005


def test_quoted_e_notation_stays_text(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {STUDENT}\nname: '5.12e2'\n")
    assert load_recipe(path).name == "5.12e2"


def test_dump_quotes_e_notation_text(tmp_path):
    # A recipe named after its file 1e3.yaml must read back with the name as text.
    path = tmp_path / "1e3.yaml"
    path.write_text(f"base: {STUDENT}\n")
    recipe = load_recipe(path)
    dumped = dump_recipe(recipe)
    assert "name: '1e3'" in dumped

    copy = tmp_path / "copy.yaml"
    copy.write_text(dumped)
    assert load_recipe(copy) == recipe


def test_merge_key_may_override(tmp_path):
    # Keys that a << merge brings in are no duplicates of the mapping's own keys.
    path = tmp_path / "recipe.yaml"
    path.write_text(
        f"base: {STUDENT}\n"
        "defaults: &defaults\n  lr: 0.1\n  epochs: 3\n"
        "train:\n  <<: *defaults\n  lr: 0.2\n"
    )
    raw = yaml.safe_load(path.read_text())
    assert raw["train"] == {"lr": 0.2, "epochs": 3}
    with pytest.raises(RecipeError, match="defaults: unknown key"):
        load_recipe(path)


def test_recursive_anchor_loads(tmp_path):
    # The duplicate-key and non-finite checks visit each node of a cycle once.
    path = tmp_path / "recipe.yaml"
    path.write_text(f"base: {STUDENT}\nstudent:\n  kwargs: &loop\n    nested: [*loop]\n")
    recipe = load_recipe(path)
    assert list(recipe.student.kwargs) == ["nested"]
