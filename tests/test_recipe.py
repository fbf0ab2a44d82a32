"""Recipe schema, inheritance, overrides and error messages."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from kdexpand.recipe import Recipe, RecipeError, dump_recipe, load_recipe, validate_recipe

MINIMAL = {
    "data": {"name": "cifar10", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
    "student": {"model": "smallnet7"},
    "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "schedule": "constant"},
}


def write(path: Path, content: dict | str) -> Path:
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    path.write_text(text)
    return path


def test_minimal_recipe_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path / "tiny.yaml", MINIMAL))
    assert recipe.name == "tiny"
    assert recipe.run_dir == Path("runs/tiny")
    assert recipe.teacher is None
    assert not recipe.expand.enabled
    assert recipe.data.val_size == 5000


@pytest.mark.parametrize("folder", ["recipes", "teachers"])
def test_shipped_recipes_validate(repo_root, folder):
    paths = sorted((repo_root / folder).glob("*.yaml"))
    assert paths, f"no recipes in {folder}/"
    for path in paths:
        recipe = load_recipe(path)
        assert recipe.name == path.stem
        if "kd" in path.stem.split("_"):
            assert recipe.teacher is not None, path
            assert [term.name for term in recipe.distill.losses] == ["kd"], path
        if recipe.teacher is None:
            assert recipe.distill.losses == [], path


def test_table1_variants_without_kd(recipes_dir):
    for dataset in ("cifar10", "cifar100"):
        for variant in ("smallnet7", "fc", "acnet", "cl", "ck", "clfc", "ckfc"):
            recipe = load_recipe(recipes_dir / f"{dataset}_{variant}.yaml")
            assert recipe.teacher is None, variant
            assert recipe.distill.losses == [], variant
            assert recipe.student.model == "smallnet7", variant
            assert recipe.expand.rate == 4.0, variant


def test_table1_recipes_exist(recipes_dir):
    for dataset in ("cifar10", "cifar100"):
        for variant in ("smallnet7", "cl", "ck", "clfc", "ckfc"):
            for suffix in ("", "_kd"):
                assert (recipes_dir / f"{dataset}_{variant}{suffix}.yaml").is_file()


def test_main_recipe_is_paper_setting(recipes_dir):
    recipe = load_recipe(recipes_dir / "cifar_ck_kd.yaml")
    assert recipe.expand.conv == "ck"
    assert recipe.expand.rate == 4.0
    assert recipe.student.model == "smallnet7"
    assert recipe.teacher.model == "resnet18"
    assert recipe.train.epochs == 150
    assert recipe.train.batch_size == 128
    assert recipe.train.lr == 0.01
    assert recipe.train.milestones == [50, 100]
    assert recipe.distill.ce_weight == pytest.approx(0.1)
    assert recipe.distill.losses[0].params == {"temperature": 4.0}


def test_base_inheritance_merges_deeply(tmp_path):
    write(tmp_path / "parent.yaml", MINIMAL)
    child = write(tmp_path / "child.yaml", "base: parent.yaml\ntrain: {lr: 0.5}\n")
    recipe = load_recipe(child)
    assert recipe.train.lr == 0.5
    assert recipe.train.epochs == 2
    assert recipe.name == "child"


def test_base_list_later_wins(tmp_path):
    write(tmp_path / "a.yaml", MINIMAL)
    write(tmp_path / "b.yaml", "train: {lr: 0.2, epochs: 7}\n")
    child = write(tmp_path / "c.yaml", "base: [a.yaml, b.yaml]\ntrain: {epochs: 3}\n")
    recipe = load_recipe(child)
    assert recipe.train.lr == 0.2
    assert recipe.train.epochs == 3


def test_base_cycle_is_reported(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle") as info:
        load_recipe(tmp_path / "a.yaml")
    assert "a.yaml -> " in str(info.value)


def test_missing_base_names_parent(tmp_path):
    child = write(tmp_path / "child.yaml", "base: nowhere.yaml\n")
    with pytest.raises(RecipeError, match="nowhere.yaml not found"):
        load_recipe(child)


def test_typo_names_path_and_closest_key(tmp_path):
    raw = {**MINIMAL, "train": {**MINIMAL["train"], "lrr": 0.1}}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "typo.yaml", raw))
    message = str(info.value)
    assert "train.lrr: unknown key" in message
    assert "did you mean 'lr'?" in message


def test_typo_in_top_level_section(tmp_path):
    raw = {**MINIMAL, "distil": {"ce_weight": 1.0}}
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "typo.yaml", raw))
    assert "distil: unknown key; did you mean 'distill'?" in str(info.value)


def test_typo_inside_list_item(tmp_path):
    raw = {
        **MINIMAL,
        "teacher": {"model": "resnet18", "checkpoint": "t.safetensors"},
        "distill": {"losses": [{"name": "kd", "wieght": 0.9}]},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path / "typo.yaml", raw))
    message = str(info.value)
    assert "distill.losses.0.wieght: unknown key" in message
    assert "did you mean 'weight'?" in message


def test_wrong_type_names_path(tmp_path):
    raw = {**MINIMAL, "train": {**MINIMAL["train"], "epochs": "ten"}}
    with pytest.raises(RecipeError, match=r"train\.epochs: .*'ten'"):
        load_recipe(write(tmp_path / "bad.yaml", raw))


def test_missing_required_section(tmp_path):
    raw = {key: value for key, value in MINIMAL.items() if key != "train"}
    with pytest.raises(RecipeError, match=r"invalid recipe: train: Field required"):
        load_recipe(write(tmp_path / "bad.yaml", raw))


def test_missing_required_key(tmp_path):
    data = {key: value for key, value in MINIMAL["data"].items() if key != "mean"}
    with pytest.raises(RecipeError, match=r"data\.mean: Field required"):
        load_recipe(write(tmp_path / "bad.yaml", {**MINIMAL, "data": data}))


def test_kd_without_teacher_rejected(tmp_path):
    raw = {**MINIMAL, "distill": {"losses": [{"name": "kd"}]}}
    with pytest.raises(RecipeError, match="need a teacher"):
        load_recipe(write(tmp_path / "bad.yaml", raw))


def test_teacher_needs_one_weight_source(tmp_path):
    raw = {**MINIMAL, "teacher": {"model": "resnet18", "checkpoint": "t.safetensors", "pretrained": True}}
    with pytest.raises(RecipeError, match="exactly one weight source"):
        load_recipe(write(tmp_path / "bad.yaml", raw))


def test_step_schedule_needs_milestones(tmp_path):
    raw = {**MINIMAL, "train": {**MINIMAL["train"], "schedule": "step"}}
    with pytest.raises(RecipeError, match="milestones"):
        load_recipe(write(tmp_path / "bad.yaml", raw))


def test_overrides_parse_yaml_values(tmp_path):
    path = write(tmp_path / "r.yaml", MINIMAL)
    recipe = load_recipe(
        path,
        [
            "train.lr=1e-3",
            "train.schedule=step",
            "train.milestones=[1, 2]",
            "train.deterministic=true",
            "data.train_limit=512",
            "expand.conv=ck",
            "teacher.model=resnet18",
            "teacher.checkpoint=t.safetensors",
            "distill.losses=[{name: kd, weight: 0.9}]",
            "distill.losses.0.params.temperature=2",
        ],
    )
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.train.milestones == [1, 2]
    assert recipe.train.deterministic is True
    assert recipe.data.train_limit == 512
    assert recipe.expand.conv == "ck"
    assert recipe.teacher.checkpoint == Path("t.safetensors")
    assert recipe.distill.losses[0].params == {"temperature": 2}


def test_override_can_remove_section(recipes_dir):
    recipe = load_recipe(recipes_dir / "cifar10_ck_kd.yaml", ["teacher=null", "distill.losses=[]"])
    assert recipe.teacher is None


def test_override_unknown_key_hint(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'epochs'"):
        load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["train.epoch=3"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr", "not of the form key.sub=value"),
        ("train.lr.x=1", "train.lr is a value"),
        ("distill.losses.3.weight=1", "must index the list"),
        ("train.lr=[1", "not valid YAML"),
    ],
)
def test_bad_overrides(tmp_path, override, message):
    raw = {**MINIMAL, "distill": {"losses": []}}
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path / "r.yaml", raw), [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.seed=-1", "train.seed: Input should be greater than or equal to 0 (got -1)"),
        ("train.seed=99999999999999", "train.seed: Input should be less than or equal to 4294967295"),
        ("TRAIN.lr=1", "TRAIN: unknown key; did you mean 'train'?"),
        ("train.LR=0.1", "train.LR: unknown key; did you mean 'lr'?"),
        ("task=segmentation", "task: unknown task 'segmentation'. Valid choices: classification"),
        ("student.kwargs={num_classes: 100}", "student.kwargs: num_classes must not be set here, because the dataset"),
        ("train.epochs=true", "train.epochs: expected a number, got the boolean true"),
        ("train.lr=false", "train.lr: expected a number, got the boolean false"),
        ("train.epochs=1.5e0", "train.epochs: Input should be a valid integer"),
        ("train.milestones=[true]", "train.milestones: expected a list of numbers, got booleans"),
        ("data.mean=[true, 0, 0]", "data.mean: expected a list of numbers, got booleans"),
        ("train.mixed_precision=true", "train.mixed_precision: Input should be 'no', 'bf16' or 'fp16'"),
    ],
)
def test_invalid_value_names_key(tmp_path, override, message):
    with pytest.raises(RecipeError) as error:
        load_recipe(write(tmp_path / "r.yaml", MINIMAL), [override])
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_upper_case_section_in_file(tmp_path):
    raw = {**MINIMAL, "Train": {"epochs": 2}}
    with pytest.raises(RecipeError, match="Train: unknown key; did you mean 'train'"):
        load_recipe(write(tmp_path / "r.yaml", raw))


def test_seed_accepts_full_range(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["train.seed=4294967295"])
    assert recipe.train.seed == 2**32 - 1


def test_override_reads_e_notation(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["train.epochs=1e2", "train.lr=5e-3"])
    assert recipe.train.epochs == 100
    assert type(recipe.train.epochs) is int
    assert recipe.train.lr == 0.005


def test_booleans_kept_for_flags(tmp_path):
    recipe = load_recipe(write(tmp_path / "r.yaml", MINIMAL), ["train.nesterov=true", "train.deterministic=true"])
    assert recipe.train.nesterov is True
    assert recipe.train.deterministic is True


def test_dump_round_trip(recipes_dir):
    recipe = load_recipe(recipes_dir / "cifar_ck_kd.yaml", ["data.train_limit=512"])
    reloaded = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert reloaded == recipe
    assert isinstance(reloaded, Recipe)


def scheduled_lrs(**train) -> list[float]:
    """Return the learning rate of every epoch under the recipe's schedule."""
    from kdexpand.recipe import TrainConfig
    from kdexpand.trainer.optim import build_optimizer, build_scheduler

    config = TrainConfig(batch_size=8, **train)
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], config)
    scheduler = build_scheduler(optimizer, config)
    rates = []
    for _ in range(config.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_step_schedule_lrs():
    rates = scheduled_lrs(epochs=6, lr=0.01, schedule="step", milestones=[2, 4], gamma=0.1)
    assert rates == pytest.approx([0.01, 0.01, 0.001, 0.001, 0.0001, 0.0001])


def test_cosine_schedule_lrs():
    # lr_t = lr * (1 + cos(pi * t / T)) / 2 with T = 4 epochs
    rates = scheduled_lrs(epochs=4, lr=0.1, schedule="cosine")
    assert rates == pytest.approx([0.1 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)])


def test_warmup_then_step_lrs():
    rates = scheduled_lrs(epochs=5, lr=0.1, schedule="step", milestones=[4], warmup_epochs=2)
    assert rates == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.01])


def test_weight_decay_on_every_factor():
    import kdexpand
    from kdexpand.models import SmallNet
    from kdexpand.recipe import TrainConfig
    from kdexpand.trainer.optim import build_optimizer

    expanded = kdexpand.expand(SmallNet(), conv="ck", fc=True, rate=4.0)
    config = TrainConfig(epochs=1, batch_size=8, lr=0.01, schedule="constant", weight_decay=5e-4)
    optimizer = build_optimizer(expanded.parameters(), config)
    optimized = {id(p) for group in optimizer.param_groups if group["weight_decay"] == 5e-4 for p in group["params"]}
    for name, parameter in expanded.named_parameters():
        assert id(parameter) in optimized, name
