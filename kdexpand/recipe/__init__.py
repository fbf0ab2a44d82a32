"""Recipes: YAML run descriptions validated against a typed schema."""

from kdexpand.recipe.loader import (
    RecipeError,
    apply_override,
    dump_recipe,
    flatten_keys,
    load_recipe,
    load_recipe_dict,
    validate_recipe,
)
from kdexpand.recipe.schema import (
    AnalysisConfig,
    AugmentConfig,
    DataConfig,
    DistillConfig,
    ExpandConfig,
    InitConfig,
    LossTermConfig,
    OutputConfig,
    Recipe,
    StudentConfig,
    TeacherConfig,
    TrainConfig,
    TwinConfig,
)

__all__ = [
    "AnalysisConfig",
    "AugmentConfig",
    "DataConfig",
    "DistillConfig",
    "ExpandConfig",
    "InitConfig",
    "LossTermConfig",
    "OutputConfig",
    "Recipe",
    "RecipeError",
    "StudentConfig",
    "TeacherConfig",
    "TrainConfig",
    "TwinConfig",
    "apply_override",
    "dump_recipe",
    "flatten_keys",
    "load_recipe",
    "load_recipe_dict",
    "validate_recipe",
]
