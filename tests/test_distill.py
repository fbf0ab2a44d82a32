"""The distiller: feature terms through taps, stages, regressor state, recipe checks."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import kdexpand
from kdexpand.distill import Distiller
from kdexpand.losses import HintLoss
from kdexpand.models import SmallNet
from kdexpand.recipe import DistillConfig, Recipe, RecipeError, load_recipe, load_recipe_dict

HINT = {"name": "hint", "student": "features.7", "teacher": "layer3", "params": {"kernel_size": 3}}
PKT = {"name": "pkt", "student": "fc", "teacher": "global_pool"}
KD = {"name": "kd", "params": {"temperature": 4.0}}
# Modules of the 3x3 SmallNet at or above its second pooling layer (features.7).
UPPER_SMALLNET = ("features.8", "features.9", "fc", "classifier")


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10).eval()
    return model.requires_grad_(False)


@pytest.fixture
def student() -> SmallNet:
    torch.manual_seed(0)
    return SmallNet(kernel_size=3).train()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    return torch.randn(8, 3, 32, 32), torch.arange(8) % 10


def build(config: dict, student, teacher) -> Distiller:
    example = torch.zeros(1, 3, 32, 32)
    return Distiller(DistillConfig(**config), F.cross_entropy, student, teacher, example)


def step(distiller: Distiller, student, teacher, batch):
    images, targets = batch
    with distiller.capture():
        outputs = student(images)
        with torch.no_grad():
            teacher_outputs = teacher(images)
    return distiller(outputs, targets, teacher_outputs)


def test_joint_terms_sum_and_gradients(student, teacher, batch):
    distiller = build({"ce_weight": 0.5, "losses": [HINT, PKT, KD]}, student, teacher)
    total, parts = step(distiller, student, teacher, batch)
    total.backward()

    assert sorted(parts) == ["hint", "kd", "pkt", "task"]
    expected = 0.5 * parts["task"] + parts["hint"] + parts["pkt"] + parts["kd"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    for name, parameter in student.named_parameters():
        assert parameter.grad is not None, name
    for parameter in distiller.parameters():
        assert parameter.grad is not None
        assert parameter.grad.abs().sum() > 0
    for parameter in teacher.parameters():
        assert parameter.grad is None


def test_term_values_match_direct_losses(student, teacher, batch):
    distiller = build({"losses": [PKT]}, student, teacher)
    _, parts = step(distiller, student, teacher, batch)
    images, _ = batch
    fc = student.fc(torch.flatten(student.features(images), 1))
    pooled = teacher.global_pool(teacher.forward_features(images))
    assert parts["pkt"].item() == pytest.approx(distiller.losses[0](fc, pooled).item(), rel=1e-6)


def test_regressor_sized_from_probe(student, teacher):
    distiller = build({"losses": [HINT]}, student, teacher)
    loss = distiller.losses[0]
    assert isinstance(loss, HintLoss)
    conv = loss.regressor.layers[0]
    # features.7 of the 3x3 SmallNet: 16 x 6 x 6; layer3 of resnet18 on 32x32: 256 x 2 x 2.
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (16, 256, (3, 3))
    assert loss.regressor.teacher_size == (2, 2)


def test_probe_keeps_batchnorm_statistics(student, teacher):
    before = student.features[1].running_mean.clone()
    build({"losses": [HINT]}, student, teacher)
    assert torch.equal(student.features[1].running_mean, before)
    assert student.training


def test_two_stage_hint_trains_lower_part(student, teacher, batch):
    config = {"ce_weight": 0.1, "losses": [KD], "hint_stage": {"epochs": 2, "losses": [HINT]}}
    distiller = build(config, student, teacher)
    distiller.set_epoch(0, 5)
    assert distiller.stage == "hint"
    total, parts = step(distiller, student, teacher, batch)
    total.backward()

    assert sorted(parts) == ["hint_stage.hint", "task"]
    assert total.item() == pytest.approx(parts["hint_stage.hint"].item(), rel=1e-6)
    for name, parameter in student.named_parameters():
        if name.startswith(UPPER_SMALLNET):
            assert parameter.grad is None, name
        else:
            assert parameter.grad is not None, name
            assert parameter.grad.abs().sum() > 0, name
    assert distiller.losses[0].regressor.layers[0].weight.grad is not None


def test_hint_stage_freezes_upper_part(student, teacher, batch):
    config = {"losses": [KD], "hint_stage": {"epochs": 1, "losses": [HINT]}}
    distiller = build(config, student, teacher)
    parameters = [*student.parameters(), *distiller.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1, momentum=0.9, weight_decay=0.1)
    before = {name: value.clone() for name, value in student.state_dict().items()}

    distiller.set_epoch(0, 2)
    for name, parameter in student.named_parameters():
        assert parameter.requires_grad == (not name.startswith(UPPER_SMALLNET)), name
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        step(distiller, student, teacher, batch)[0].backward()
        optimizer.step()
    for name, parameter in student.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == (not name.startswith(UPPER_SMALLNET)), name

    distiller.set_epoch(1, 2)
    for name, parameter in student.named_parameters():
        assert parameter.requires_grad, name


def test_two_stage_switches_to_main_loss(student, teacher, batch):
    config = {"ce_weight": 0.1, "losses": [KD], "hint_stage": {"epochs": 2, "losses": [HINT]}}
    distiller = build(config, student, teacher)
    distiller.set_epoch(2, 5)
    assert distiller.stage == "main"
    total, parts = step(distiller, student, teacher, batch)
    total.backward()

    assert sorted(parts) == ["kd", "task"]
    assert total.item() == pytest.approx((0.1 * parts["task"] + parts["kd"]).item(), rel=1e-6)
    assert distiller.losses[0].regressor.layers[0].weight.grad is None
    assert student.classifier.weight.grad is not None


def test_main_stage_without_teacher_terms(student, teacher, batch):
    config = {"losses": [], "hint_stage": {"epochs": 1, "losses": [HINT]}}
    distiller = build(config, student, teacher)
    distiller.set_epoch(0, 3)
    assert distiller.needs_teacher
    distiller.set_epoch(1, 3)
    assert not distiller.needs_teacher

    images, targets = batch
    with distiller.capture():
        outputs = student(images)
    total, parts = distiller(outputs, targets)
    assert sorted(parts) == ["task"]
    assert total.item() == pytest.approx(F.cross_entropy(outputs, targets).item(), rel=1e-6)


def test_forward_outside_capture_raises(student, teacher, batch):
    distiller = build({"losses": [PKT]}, student, teacher)
    images, targets = batch
    outputs, teacher_outputs = student(images), teacher(images)
    with pytest.raises(RuntimeError, match="outside Distiller.capture"):
        distiller(outputs, targets, teacher_outputs)


def test_evaluation_passes_record_nothing(student, teacher, batch):
    distiller = build({"losses": [PKT]}, student, teacher)
    images, _ = batch
    with torch.no_grad():
        student.eval()(images)
        teacher(images)
    assert distiller._student_taps._records == {}
    assert distiller._teacher_taps._records == {}
    student.train()
    total, _ = step(distiller, student, teacher, batch)
    assert torch.isfinite(total)


def test_feature_terms_need_models():
    with pytest.raises(ValueError, match="pass student=, teacher= and example_input="):
        Distiller(DistillConfig(losses=[PKT]), F.cross_entropy)


def test_unknown_tap_raises_at_build(student, teacher):
    with pytest.raises(KeyError, match="Did you mean 'layer3'"):
        build({"losses": [{**HINT, "teacher": "layer33"}]}, student, teacher)


def test_regressor_state_roundtrip(student, teacher, batch):
    distiller = build({"losses": [HINT]}, student, teacher)
    state = distiller.state_dict()
    assert "losses.0.regressor.layers.0.weight" in state
    torch.manual_seed(5)
    other = build({"losses": [HINT]}, SmallNet(kernel_size=3), teacher)
    key = "losses.0.regressor.layers.0.weight"
    assert not torch.equal(other.state_dict()[key], state[key])
    other.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(other.state_dict()[key], value), key


def test_regressor_not_in_student_state(student, teacher):
    build({"losses": [HINT]}, student, teacher)
    assert not any("regressor" in key for key in student.state_dict())
    assert sorted(student.state_dict()) == sorted(SmallNet(kernel_size=3).state_dict())


def test_taps_on_expanded_student(teacher, batch):
    torch.manual_seed(0)
    expanded = kdexpand.expand(SmallNet(kernel_size=3), conv="cl", fc=True)
    distiller = build({"losses": [HINT, PKT]}, expanded, teacher)
    total, parts = step(distiller, expanded, teacher, batch)
    total.backward()
    assert sorted(parts) == ["hint", "pkt", "task"]
    for name, parameter in expanded.named_parameters():
        assert parameter.grad is not None, name


def test_kd_temperature_follows_epoch(student, teacher):
    params = {"temperature": 4.0, "schedule": "linear", "final_temperature": 2.0}
    distiller = build({"losses": [{"name": "kd", "params": params}]}, student, teacher)
    distiller.set_epoch(2, 3)
    assert distiller.losses[0].temperature == pytest.approx(2.0)


# Recipe checks -------------------------------------------------------------------------

RECIPE = "recipes/cifar_ck_kd.yaml"


def hint_overrides(student_tap: str = "features.7", teacher_tap: str = "layer3") -> list[str]:
    return [
        "distill.losses.0.name=hint",
        "distill.losses.0.params={}",
        f"distill.losses.0.student={student_tap}",
        f"distill.losses.0.teacher={teacher_tap}",
    ]


def test_recipe_unknown_loss_lists_choices(repo_root):
    expected = r"unknown loss 'pktt'\. Did you mean 'pkt'\? Valid choices: at, dkd"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(repo_root / RECIPE, ["distill.losses.0.name=pktt"])


def test_recipe_unknown_param_lists_valid(repo_root):
    with pytest.raises(RecipeError, match=r"params.temprature: .*valid parameters: temperature"):
        load_recipe(repo_root / RECIPE, ["distill.losses.0.params.temprature=2"])


def test_recipe_unknown_student_tap_lists_choices(repo_root):
    expected = r"student tap 'features.77'.*Valid choices: features, features.0"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(repo_root / RECIPE, hint_overrides(student_tap="features.77"))


def test_recipe_unknown_teacher_tap_lists_choices(repo_root):
    with pytest.raises(RecipeError, match=r"teacher tap 'layer33'.*Did you mean 'layer3'"):
        load_recipe(repo_root / RECIPE, hint_overrides(teacher_tap="layer33"))


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("student.model=smallnett", r"student: cannot build 'smallnett': unknown model"),
        ("teacher.model=resnet188", r"teacher.model: unknown timm model 'resnet188'; did you mean 'resnet18'"),
        ("student.kwargs={bogus: 1}", r"student: cannot build 'smallnet7': .*'bogus'"),
        ("teacher.kwargs={bogus: 1}", r"teacher.kwargs do not fit 'resnet18': .*'bogus'"),
    ],
)
def test_recipe_unbuildable_models_rejected(repo_root, override, expected):
    with pytest.raises(RecipeError, match=expected):
        load_recipe(repo_root / "recipes/cifar_ck_hint.yaml", [override])


def test_recipe_feature_term_needs_taps(repo_root):
    overrides = ["distill.losses.0.name=pkt", "distill.losses.0.params={}"]
    with pytest.raises(RecipeError, match="needs both taps"):
        load_recipe(repo_root / RECIPE, overrides)


def test_recipe_hint_stage_too_long(repo_root):
    stage = "distill.hint_stage={epochs: 150, losses: [{name: hint, student: fc, teacher: fc}]}"
    with pytest.raises(RecipeError, match=r"hint_stage.epochs=150 must be < train.epochs=150"):
        load_recipe(repo_root / RECIPE, [stage])


def test_recipe_hint_stage_rejects_logit_terms(repo_root):
    stage = "distill.hint_stage={epochs: 5, losses: [{name: kd}]}"
    with pytest.raises(RecipeError, match="may only hold feature terms"):
        load_recipe(repo_root / RECIPE, [stage])


def test_recipe_hint_stage_needs_teacher(repo_root):
    raw = load_recipe_dict(repo_root / "recipes/cifar10_smallnet7.yaml")
    raw["name"] = "no_teacher"
    assert "teacher" not in raw
    raw["distill"] = {"hint_stage": {"epochs": 1, "losses": [HINT]}}
    with pytest.raises(ValidationError, match="hint_stage needs a teacher"):
        Recipe.model_validate(raw)


# Student, conv expansion, fc expansion, main-stage terms and hint-stage terms of each
# transfer-table recipe.
TABLE = {
    "cifar10_smallnet3.yaml": ("smallnet3", None, False, [], []),
    "cifar10_smallnet3_kd.yaml": ("smallnet3", None, False, ["kd"], []),
    "cifar10_smallnet3_hint.yaml": ("smallnet3", None, False, ["kd"], ["hint"]),
    "cifar10_smallnet3_pkt.yaml": ("smallnet3", None, False, ["pkt"], []),
    "cifar10_smallnet3_clfc.yaml": ("smallnet3", "cl", True, [], []),
    "cifar10_smallnet3_clfc_kd.yaml": ("smallnet3", "cl", True, ["kd"], []),
    "cifar10_smallnet3_clfc_hint.yaml": ("smallnet3", "cl", True, ["kd"], ["hint"]),
    "cifar10_smallnet3_clfc_pkt.yaml": ("smallnet3", "cl", True, ["pkt"], []),
    "cifar10_smallnet3_clfc_hint_init.yaml": ("smallnet3", "cl", True, ["kd"], ["hint"]),
    "cifar10_smallnet3_clfc_pkt_init.yaml": ("smallnet3", "cl", True, ["pkt"], []),
    "cifar_ck_hint.yaml": ("smallnet7", "ck", False, ["kd"], ["hint"]),
    "cifar_ck_pkt.yaml": ("smallnet7", "ck", False, ["pkt"], []),
    "cifar_ck_fc_kd.yaml": ("smallnet7", "ck", True, ["kd"], []),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_transfer_table_recipe(recipes_dir, name):
    model, conv, fc, losses, hint_losses = TABLE[name]
    recipe = load_recipe(recipes_dir / name)
    hint_stage = recipe.distill.hint_stage

    assert recipe.student.model == model
    assert recipe.expand.conv == conv
    assert recipe.expand.fc == fc
    assert [term.name for term in recipe.distill.losses] == losses
    assert [term.name for term in (hint_stage.losses if hint_stage else [])] == hint_losses
    assert (recipe.init is not None) == name.endswith("_init.yaml")
    if losses or hint_losses:
        assert recipe.teacher.model == "resnet18"
    if hint_stage is not None:
        assert (hint_stage.epochs, recipe.train.epochs, recipe.train.milestones) == (30, 180, [80, 130])
