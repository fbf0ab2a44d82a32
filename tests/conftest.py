"""Shared fixtures: where the real datasets live and where the recipes are."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Return the shared real-data folder: ``$KDEXPAND_SHARED_DATA``, else ``../shared/data``."""
    env = os.environ.get("KDEXPAND_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not (path / "cifar10" / "train.parquet").is_file():
        pytest.fail(
            f"real CIFAR-10 not found under {path}; set KDEXPAND_SHARED_DATA to the folder "
            "that holds cifar10/train.parquet"
        )
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def recipes_dir() -> Path:
    return REPO_ROOT / "recipes"


@pytest.fixture(scope="module")
def env(shared_data, tmp_path_factory) -> dict[str, str]:
    """Environment of a subprocess run on the real data: offline, with its own decode cache."""
    variables = dict(os.environ)
    variables.update(
        KDEXPAND_DATA=str(shared_data),
        KDEXPAND_CACHE=str(tmp_path_factory.mktemp("cache")),
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return variables
