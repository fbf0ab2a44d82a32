"""Checkpoints: ``last`` every epoch with the full trainer state, ``best`` on validation.

Layout under ``<run>/checkpoints``:

- ``epoch_NNNN/model.safetensors``: student weights (expanded form) after epoch NNNN.
- ``epoch_NNNN/distiller.safetensors``: trainable parts of the loss terms, when there are any.
- ``epoch_NNNN/trainer.pt``: epoch, optimizer, scheduler, best-so-far and history.
- ``epoch_NNNN/rng_rank<R>.pt``: Python, NumPy, torch and augmentation RNG states of process R.
- ``epoch_NNNN/best.safetensors``: student weights of the best validation epoch so far, so
  the best weights and the trainer state always come from the same save.
- ``epoch_NNNN_step_SSSSSS/``: the same files, saved after step SSSSSS of epoch NNNN + 1
  when a signal stopped training mid-epoch.
- ``last.json``: names the newest complete folder; written last, so a crash while saving
  leaves the previous checkpoint in force. Folders it does not name are incomplete or old
  and are deleted by the next save.
- ``best.safetensors``: a copy of the newest complete folder's ``best.safetensors``
  (epoch and metric in the file's metadata), published after ``last.json``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import nn

from kdexpand.io import UnreadableFileError, atomic_write, load_safetensors, load_torch, save_safetensors, save_torch, write_json

__all__ = [
    "BEST_FILE",
    "CheckpointError",
    "TrainState",
    "capture_rng",
    "checkpoint_name",
    "current_checkpoint",
    "finish_last",
    "latest_checkpoint",
    "load_best_weights",
    "load_distiller_weights",
    "load_last",
    "read_pointer",
    "restore_rng",
    "save_last",
    "save_rng",
]

logger = logging.getLogger(__name__)

BEST_FILE = "best.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the current run."""


@dataclass
class TrainState:
    """Progress that survives a restart.

    Attributes:
        epoch: Number of completed epochs.
        best_epoch: Completed-epoch count at the best validation score, 0 before any.
        best_score: Best validation value of the task's primary metric.
        history: One dict of validation metrics and train losses per completed epoch.
        train_seconds: Training wall time summed over all sessions of this run.
        step: Batches of epoch ``epoch + 1`` trained before a mid-epoch checkpoint, else 0.
        partial: Running sums (losses, counts, seconds) of those batches, so the resumed
            epoch reports the statistics of the whole epoch.
    """

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = float("-inf")
    history: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    step: int = 0
    partial: dict[str, Any] = field(default_factory=dict)


def checkpoint_name(state: TrainState) -> str:
    """Return the folder name of the checkpoint of ``state``: ``epoch_NNNN[_step_SSSSSS]``."""
    name = f"epoch_{state.epoch:04d}"
    return name if state.step == 0 else f"{name}_step_{state.step:06d}"


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    """Return every RNG state of this process, in types that ``weights_only`` loading accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "torch": torch.get_rng_state(),
        "augment": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    """Restore the RNG states saved by :func:`capture_rng`."""
    random.setstate(state["python"])
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["augment"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_last(
    folder: Path,
    state: TrainState,
    model: nn.Module,
    distiller: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    recipe_text: str,
    is_main: bool,
) -> Path:
    """Write the model and trainer state of the main process; call :func:`finish_last` after.

    The best weights go into the same folder: the model itself when this save ends the best
    epoch so far (``state.best_epoch == state.epoch`` and ``state.step == 0``), else the
    previous checkpoint's best file.
    """
    target = folder / checkpoint_name(state)
    if is_main:
        previous = current_checkpoint(folder)
        if target.exists() and target != previous:
            # Left over from a save that was interrupted; its files are stale or torn.
            shutil.rmtree(target)
        save_safetensors(model.state_dict(), target / "model.safetensors", {"epoch": str(state.epoch)})
        _save_best_copy(folder, previous, target, state, model)
        if len(distiller.state_dict()) > 0:
            save_safetensors(distiller.state_dict(), target / "distiller.safetensors")
        trainer = {
            "state": asdict(state),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "recipe": recipe_text,
            # CPU reductions split work by thread, so the count changes float results.
            "torch_threads": torch.get_num_threads(),
        }
        save_torch(trainer, target / "trainer.pt")
    return target


def _save_best_copy(folder: Path, previous: Path | None, target: Path, state: TrainState, model: nn.Module) -> None:
    if state.best_epoch == 0:
        return
    if state.best_epoch == state.epoch and state.step == 0:
        metadata = {"epoch": str(state.epoch), "score": repr(state.best_score)}
        save_safetensors(model.state_dict(), target / BEST_FILE, metadata)
        return
    # Checkpoints written before best weights lived in the folders have only the published copy.
    source = previous / BEST_FILE if previous is not None and (previous / BEST_FILE).is_file() else folder / BEST_FILE
    if source.is_file():
        _copy_file(source, target / BEST_FILE)


def _copy_file(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination`` atomically, as a hard link where the file system allows."""

    def link(temp: Path) -> None:
        temp.unlink()
        try:
            os.link(source, temp)
        except OSError:
            shutil.copyfile(source, temp)

    atomic_write(destination, link)


def save_rng(target: Path, rank: int, generator: torch.Generator) -> None:
    """Write this process's RNG states into the checkpoint folder ``target``."""
    save_torch(capture_rng(generator), target / f"rng_rank{rank}.pt")


def finish_last(folder: Path, target: Path, world_size: int) -> None:
    """Point ``last.json`` at ``target`` and delete older epoch folders (main process only)."""
    missing = [f"rng_rank{r}.pt" for r in range(world_size) if not (target / f"rng_rank{r}.pt").is_file()]
    assert not missing, f"checkpoint {target} lacks {missing}"
    write_json(folder / "last.json", {"dir": target.name, "world_size": world_size})
    if (target / BEST_FILE).is_file():
        _copy_file(target / BEST_FILE, folder / BEST_FILE)
    for old in folder.glob("epoch_*"):
        if old.is_dir() and old != target:
            shutil.rmtree(old)


def read_pointer(pointer: Path) -> dict[str, Any]:
    """Read ``last.json``: the name of the newest complete folder and the number of processes.

    Raises:
        UnreadableFileError: The file is not JSON, or ``dir`` is not a folder name or
            ``world_size`` not a positive integer.
    """
    fix = "start the run again with --overwrite, or restore the file from a backup"
    try:
        content = json.loads(pointer.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UnreadableFileError(f"checkpoint pointer {pointer} is unreadable ({error}); {fix}") from error
    valid = (
        isinstance(content, dict)
        and isinstance(content.get("dir"), str)
        and content["dir"] not in ("", ".", "..")
        and "/" not in content["dir"]
        and type(content.get("world_size")) is int
        and content["world_size"] > 0
    )
    if not valid:
        raise UnreadableFileError(
            f"checkpoint pointer {pointer} is unreadable: expected {{\"dir\": folder name, \"world_size\": "
            f"positive integer}}, got {content!r}; {fix}"
        )
    return content


def current_checkpoint(folder: Path) -> Path | None:
    """Return the folder that ``last.json`` names, or None before the first complete save.

    Raises:
        UnreadableFileError: ``last.json`` is damaged (see :func:`read_pointer`).
    """
    pointer = folder / "last.json"
    return folder / read_pointer(pointer)["dir"] if pointer.is_file() else None


def latest_checkpoint(folder: Path) -> Path:
    """Return the newest complete epoch folder.

    Raises:
        CheckpointError: There is no ``last.json`` or the folder it names is incomplete.
        UnreadableFileError: ``last.json`` is damaged.
    """
    pointer = folder / "last.json"
    if not pointer.is_file():
        raise CheckpointError(
            f"no checkpoint to resume from: {pointer} not found, so no epoch of this run was saved; "
            "start it again with --overwrite"
        )
    target = folder / read_pointer(pointer)["dir"]
    for name in ("model.safetensors", "trainer.pt"):
        if not (target / name).is_file():
            raise CheckpointError(f"checkpoint {target} lacks {name}; start the run again with --overwrite")
    return target


def load_last(target: Path, rank: int, world_size: int) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """Load (trainer state, model weights, this process's RNG state) from ``target``.

    Raises:
        CheckpointError: The checkpoint was written by a different number of processes.
    """
    saved_world = read_pointer(target.parent / "last.json")["world_size"]
    if saved_world != world_size:
        raise CheckpointError(
            f"checkpoint {target} was written by {saved_world} processes, this run has {world_size}; "
            f"resume with --num_processes {saved_world}"
        )
    trainer = load_torch(target / "trainer.pt")
    weights = load_safetensors(target / "model.safetensors")
    rng = load_torch(target / f"rng_rank{rank}.pt")
    return trainer, weights, rng


def load_distiller_weights(target: Path) -> dict[str, torch.Tensor]:
    """Return the saved distiller weights of ``target``, or an empty dict when it had none."""
    path = target / "distiller.safetensors"
    return load_safetensors(path) if path.is_file() else {}


def load_best_weights(folder: Path) -> tuple[dict[str, torch.Tensor], int]:
    """Return the best-epoch weights of the newest complete checkpoint and their epoch."""
    current = current_checkpoint(folder)
    path = current / BEST_FILE if current is not None and (current / BEST_FILE).is_file() else folder / BEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found; the run has not completed an epoch")
    with safe_open(str(path), framework="pt") as handle:
        epoch = int(handle.metadata()["epoch"])
    return load_safetensors(path), epoch

