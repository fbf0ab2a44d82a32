"""Data location, decoding, splits, batching and on-device augmentation on real CIFAR-10."""

from __future__ import annotations

import io

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kdexpand.data import (
    BatchAugment,
    TensorBatches,
    load_classification_data,
    resolve_source,
    split_sizes,
)
from kdexpand.recipe import DataConfig

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def cifar_config(**overrides) -> DataConfig:
    return DataConfig(name="cifar10", mean=CIFAR_MEAN, std=CIFAR_STD, **overrides)


def pil_decode(parquet_path, rows: range) -> tuple[np.ndarray, np.ndarray]:
    """Decode rows of a CIFAR parquet file with pyarrow and PIL only (independent path)."""
    table = pq.read_table(parquet_path).slice(rows.start, len(rows))
    images = [np.asarray(Image.open(io.BytesIO(cell["bytes"])).convert("RGB")) for cell in table["img"].to_pylist()]
    return np.stack(images).transpose(0, 3, 1, 2), np.asarray(table["label"].to_pylist())


@pytest.mark.parametrize(
    ("total", "val_size", "limit", "expected"),
    [
        (50000, 5000, None, (45000, 5000)),
        (50000, 5000, 512, (461, 51)),
        (50000, 5000, 60000, (45000, 5000)),
        (50000, 0, 100, (100, 0)),
        (50000, 5000, 3, (2, 1)),
    ],
)
def test_split_sizes(total, val_size, limit, expected):
    assert split_sizes(total, val_size, limit) == expected


def test_split_sizes_too_small():
    with pytest.raises(ValueError, match="leaves no training images"):
        split_sizes(10, 10, None)


def test_resolve_recipe_root_first(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("KDEXPAND_DATA", str(tmp_path))
    source = resolve_source(cifar_config(root=shared_data / "cifar10"), ["train", "test"])
    assert source.files["train"] == [shared_data / "cifar10" / "train.parquet"]


def test_resolve_bad_root_is_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root .* does not contain train.parquet"):
        resolve_source(cifar_config(root=tmp_path), ["train", "test"])


def test_resolve_env_then_local(shared_data, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDEXPAND_DATA", str(shared_data))
    assert resolve_source(cifar_config(), ["train"]).description == str(shared_data / "cifar10")

    monkeypatch.delenv("KDEXPAND_DATA")
    (tmp_path / "data").symlink_to(shared_data, target_is_directory=True)
    assert resolve_source(cifar_config(), ["train"]).description == "data/cifar10"


def test_resolve_offline_lists_places(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KDEXPAND_DATA", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        resolve_source(cifar_config(hub_id="uoft-cs/cifar10"), ["train", "test"])
    message = str(info.value)
    assert f"{tmp_path / 'nowhere' / 'cifar10'}/" in message
    assert "data/cifar10/" in message
    assert "hub dataset uoft-cs/cifar10 (offline" in message


def test_resolve_hub_when_online(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDEXPAND_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    source = resolve_source(cifar_config(hub_id="uoft-cs/cifar10"), ["train"])
    assert source.hub_id == "uoft-cs/cifar10"


def test_cifar_splits_match_pil(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("KDEXPAND_CACHE", str(tmp_path / "cache"))
    config = cifar_config(root=shared_data / "cifar10", train_limit=600, eval_limit=40)
    data = load_classification_data(config)

    assert data.num_classes == 10
    assert data.class_names[0] == "airplane"
    assert data.image_shape == (3, 32, 32)
    assert len(data.train) == 540
    assert len(data.val) == 40
    assert len(data.test) == 40
    assert data.train.images.dtype == torch.uint8

    # Train is rows 0..539 and validation rows 540..579 of train.parquet: disjoint by construction.
    images, labels = pil_decode(shared_data / "cifar10" / "train.parquet", range(0, 580))
    assert torch.equal(data.train.images, torch.from_numpy(images[:540]))
    assert torch.equal(data.val.images, torch.from_numpy(images[540:]))
    assert torch.equal(data.val.labels, torch.from_numpy(labels[540:]))
    test_images, test_labels = pil_decode(shared_data / "cifar10" / "test.parquet", range(0, 40))
    assert torch.equal(data.test.images, torch.from_numpy(test_images))
    assert torch.equal(data.test.labels, torch.from_numpy(test_labels))


def test_decode_cache_round_trip(shared_data, monkeypatch, tmp_path):
    monkeypatch.setenv("KDEXPAND_CACHE", str(tmp_path / "cache"))
    config = cifar_config(root=shared_data / "cifar10", train_limit=100, eval_limit=10)
    first = load_classification_data(config)
    cached = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(cached) == 2

    second = load_classification_data(config)
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert sorted((tmp_path / "cache").glob("*")) == cached


def numpy_augment(images, offsets, flips, padding, mean, std):
    """Crop, flip and normalize one image at a time with NumPy (independent path)."""
    out = []
    for image, (top, left), flip in zip(images, offsets, flips):
        padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
        crop = padded[:, top : top + image.shape[1], left : left + image.shape[2]]
        if flip:
            crop = crop[:, :, ::-1]
        out.append((crop / 255.0 - np.asarray(mean)[:, None, None]) / np.asarray(std)[:, None, None])
    return np.stack(out)


def test_augment_matches_numpy(shared_data):
    images, _ = pil_decode(shared_data / "cifar10" / "train.parquet", range(0, 64))
    augment = BatchAugment(CIFAR_MEAN, CIFAR_STD, padding=4, flip=True)
    offsets, flips = augment.sample(64, torch.Generator().manual_seed(3))
    result = augment.apply(torch.from_numpy(images), offsets, flips)

    expected = numpy_augment(images, offsets.numpy(), flips.numpy(), 4, CIFAR_MEAN, CIFAR_STD)
    assert result.dtype == torch.float32
    assert result.shape == (64, 3, 32, 32)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-5)


def test_augment_draws_cover_range():
    augment = BatchAugment(CIFAR_MEAN, CIFAR_STD, padding=4, flip=True)
    offsets, flips = augment.sample(4096, torch.Generator().manual_seed(0))
    assert set(offsets.unique().tolist()) == set(range(9))
    assert 0.45 < flips.float().mean().item() < 0.55


def test_augment_disabled_is_normalize():
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    augment = BatchAugment(CIFAR_MEAN, CIFAR_STD, padding=0, flip=False)
    result = augment(images, torch.Generator().manual_seed(0))
    expected = numpy_augment(images.numpy(), np.zeros((4, 2), int), [False] * 4, 0, CIFAR_MEAN, CIFAR_STD)
    np.testing.assert_allclose(result.numpy(), expected, atol=1e-5)


def test_train_batches_shard_disjoint():
    labels = torch.arange(103)
    images = torch.zeros(103, 1, 1, 1, dtype=torch.uint8)
    shards = [TensorBatches(images, labels, 10, shuffle=True, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([batch_labels for _, batch_labels in shard]) for shard in shards]
    assert len(seen[0]) == len(seen[1]) == 51
    assert len(shards[0]) == len(shards[1]) == 6
    assert not set(seen[0].tolist()) & set(seen[1].tolist())

    repeat = torch.cat([b for _, b in TensorBatches(images, labels, 10, True, seed=5, rank=0, world_size=2)])
    assert torch.equal(seen[0], repeat)
    shards[0].set_epoch(1)
    assert not torch.equal(torch.cat([b for _, b in shards[0]]), seen[0])


def test_eval_batches_cover_each_once():
    labels = torch.arange(103)
    images = torch.zeros(103, 1, 1, 1, dtype=torch.uint8)
    seen = torch.cat(
        [b for rank in range(2) for _, b in TensorBatches(images, labels, 16, shuffle=False, rank=rank, world_size=2)]
    )
    assert sorted(seen.tolist()) == list(range(103))


def test_unreachable_hub_lists_places(monkeypatch, tmp_path):
    import datasets

    from kdexpand.data import load_splits

    def unreachable(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'uoft-cs/cifar10' on the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KDEXPAND_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(FileNotFoundError) as info:
        load_splits(cifar_config(hub_id="uoft-cs/cifar10"), ["train", "test"])
    message = str(info.value)
    assert "$KDEXPAND_DATA (not set)" in message
    assert "data/cifar10/" in message
    assert "hub dataset uoft-cs/cifar10 (unreachable" in message
