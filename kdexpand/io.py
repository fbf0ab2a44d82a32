"""Crash-safe file writes and safe reads: weights as safetensors, trainer state as torch pickles.

Every writer goes through :func:`atomic_write`: the content is written to a temporary file
in the destination folder, flushed and fsynced, then moved over the destination with
``os.replace``. A crash leaves either the old file or the new one, never a torn one.

Readers never run code from a file: safetensors holds only tensors, and torch pickles are
read with ``weights_only=True``, which rejects any object other than tensors, numbers,
strings and plain containers.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "UnreadableFileError",
    "UnsafeFileError",
    "atomic_write",
    "load_safetensors",
    "load_torch",
    "save_safetensors",
    "save_torch",
    "write_json",
    "write_text",
]


class UnreadableFileError(ValueError):
    """A file is truncated or not in the format its reader expects."""


class UnsafeFileError(UnreadableFileError):
    """A pickle holds objects whose loading could run code, so it was not loaded."""


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(temp_path)`` and move the finished file to ``path`` atomically.

    Args:
        path: Destination; its folder is created if missing.
        write: Writes the whole content to the path it receives.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp = Path(temp_name)
    try:
        write(temp)
        with temp.open("rb+") as stream:
            os.fsync(stream.fileno())
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would.
        os.chmod(temp, 0o666 & ~_current_umask())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)

    # Persist the rename itself; without this a power loss can forget the new directory entry.
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path


def _current_umask() -> int:
    # os.umask can only be read by setting it, so set it back at once.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> Path:
    """Write a text file atomically."""
    return atomic_write(path, lambda temp: temp.write_text(text))


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically; NaN and infinite floats become ``null``.

    JSON has no NaN or infinity, and strict parsers reject Python's ``NaN`` extension.
    """
    return write_text(path, json.dumps(_finite_or_null(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


def _finite_or_null(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: _finite_or_null(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite_or_null(value) for value in data]
    return data


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> Path:
    """Save tensors (e.g. a state dict) as a safetensors file atomically, moved to CPU."""
    cpu = {name: tensor.detach().to("cpu").contiguous() for name, tensor in tensors.items()}
    return atomic_write(path, lambda temp: save_file(cpu, str(temp), metadata=dict(metadata or {})))


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file into a dict of tensors on ``device``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"safetensors file {path} not found")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as error:
        raise UnreadableFileError(
            f"{path} is not a readable safetensors file ({error}); kdexpand reads weights only "
            "from safetensors, so convert a torch checkpoint you trust with safetensors.torch.save_file"
        ) from error


def save_torch(state: Any, path: str | Path) -> Path:
    """Save trainer state (tensors, numbers, strings, nested containers) atomically."""
    return atomic_write(path, lambda temp: torch.save(state, temp))


def load_torch(path: str | Path) -> Any:
    """Load trainer state saved by :func:`save_torch`, refusing arbitrary pickled objects.

    Raises:
        UnsafeFileError: The pickle names a function or class outside torch's allowed set.
        UnreadableFileError: The file is truncated or not a torch file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        culprit = f" ({found.group(1)})" if found else ""
        raise UnsafeFileError(
            f"{path} contains a pickled object{culprit} other than tensors and plain containers; "
            "it was not loaded because unpickling it could run code. Use checkpoints written by kdexpand"
        ) from error
    except (RuntimeError, EOFError) as error:
        reason = str(error).split(". ")[0] if str(error) else type(error).__name__
        raise UnreadableFileError(f"{path} is truncated or not a torch file ({reason}); it was not loaded") from error
