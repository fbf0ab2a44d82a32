"""Find a dataset: recipe path, ``$KDEXPAND_DATA``, ``./data``, then the Hugging Face hub."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import datasets
import huggingface_hub.constants

from kdexpand.recipe import DataConfig

__all__ = ["DataSource", "load_splits", "resolve_source"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSource:
    """A resolved dataset location: local parquet files per split, or a hub dataset id."""

    description: str
    files: dict[str, list[Path]] | None = None
    hub_id: str | None = None
    tried: tuple[str, ...] = ()


def _split_files(folder: Path, split: str) -> list[Path]:
    exact = folder / f"{split}.parquet"
    if exact.is_file():
        return [exact]
    return sorted(folder.glob(f"{split}-*.parquet"))


def _local_source(folder: Path, splits: list[str]) -> DataSource | None:
    files = {split: _split_files(folder, split) for split in splits}
    if all(files.values()):
        return DataSource(description=str(folder), files=files)
    return None


def _available_splits(folder: Path) -> list[str]:
    """Return the split names of the parquet files in ``folder`` (``test-00001.parquet`` is split ``test``)."""
    if not folder.is_dir():
        return []
    return sorted({path.stem.split("-")[0] for path in folder.glob("*.parquet")})


def _missing_split_error(folder: Path, splits: list[str]) -> KeyError:
    missing = [split for split in splits if not _split_files(folder, split)]
    return KeyError(
        f"data: split {missing[0]!r} not found in {folder}; available: {', '.join(_available_splits(folder))}. "
        "Set data.train_split and data.test_split to available splits"
    )


def _hub_offline() -> bool:
    flag = os.environ.get("HF_HUB_OFFLINE", os.environ.get("HF_DATASETS_OFFLINE", ""))
    return huggingface_hub.constants.HF_HUB_OFFLINE or flag.upper() in {"1", "ON", "YES", "TRUE"}


def resolve_source(config: DataConfig, splits: list[str]) -> DataSource:
    """Return the first location that has every split, trying them in the documented order.

    Order: ``config.root``; ``$KDEXPAND_DATA/<name>``; ``./data/<name>``; ``config.hub_id``.
    An explicit ``config.root`` without the splits is an error rather than a fall-through,
    because the recipe asked for that folder.

    A folder with parquet files but without a requested split stops the search before the
    hub, because a split name is then more likely wrong than the folder.

    Raises:
        FileNotFoundError: No location has the data; the message lists every place tried.
        KeyError: A folder has parquet files, but not those of a requested split.
    """
    wanted = ", ".join(f"{split}.parquet" for split in splits)
    if config.root is not None:
        source = _local_source(config.root, splits)
        if source is None and _available_splits(config.root):
            raise _missing_split_error(config.root, splits)
        if source is None:
            raise FileNotFoundError(
                f"data.root {config.root} does not contain {wanted}; fix data.root or remove "
                "it to search $KDEXPAND_DATA, ./data and the hub"
            )
        return source

    tried = []
    env = os.environ.get("KDEXPAND_DATA")
    candidates = ([Path(env) / config.name] if env else []) + [Path("data") / config.name]
    for folder in candidates:
        source = _local_source(folder, splits)
        if source is not None:
            return source
        tried.append(f"{folder}/ ({wanted})")
    partial = [folder for folder in candidates if _available_splits(folder)]
    if partial:
        raise _missing_split_error(partial[0], splits)
    if env is None:
        tried.insert(0, "$KDEXPAND_DATA (not set)")

    if config.hub_id is None:
        tried.append("hub (data.hub_id not set)")
    elif _hub_offline():
        tried.append(f"hub dataset {config.hub_id} (offline: HF_HUB_OFFLINE is set)")
    else:
        return DataSource(description=f"hub:{config.hub_id}", hub_id=config.hub_id, tried=tuple(tried))
    raise FileNotFoundError(
        f"dataset {config.name!r} not found; tried: {'; '.join(tried)}. Set data.root or "
        "KDEXPAND_DATA to the folder that holds the parquet files"
    )


def load_splits(config: DataConfig, splits: list[str]) -> tuple[DataSource, datasets.DatasetDict]:
    """Resolve the dataset location and open the requested splits with ``datasets``.

    Raises:
        FileNotFoundError: No location has the data, or the hub cannot be reached.
        KeyError: A split or column is missing from the dataset.
    """
    source = resolve_source(config, splits)
    if source.files is not None:
        data_files = {split: [str(path) for path in paths] for split, paths in source.files.items()}
        dataset = datasets.load_dataset("parquet", data_files=data_files)
    else:
        try:
            dataset = datasets.load_dataset(source.hub_id)
        except ConnectionError as error:
            raise FileNotFoundError(
                f"dataset {config.name!r} not found; tried: {'; '.join(source.tried)}; hub dataset "
                f"{source.hub_id} (unreachable: {error}). Set data.root or KDEXPAND_DATA to the "
                "folder that holds the parquet files"
            ) from error
    logger.info("dataset %s from %s", config.name, source.description)

    for split in splits:
        if split not in dataset:
            raise KeyError(f"dataset {source.description} has no split {split!r}; splits: {list(dataset)}")
        columns = dataset[split].column_names
        for column in (config.image_column, config.label_column):
            if column not in columns:
                raise KeyError(
                    f"dataset {source.description} split {split!r} has no column {column!r}; "
                    f"columns: {columns}; set data.image_column / data.label_column"
                )
    return source, dataset
