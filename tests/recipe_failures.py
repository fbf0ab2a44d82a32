"""Shared check of the bad-recipe tables: the run fails before training with one error line."""

from __future__ import annotations

from pathlib import Path

import torch


def assert_fails_before_training(
    args: list[str], env: dict[str, str], monkeypatch, capsys, run_dir: Path, status: int, fragments: list[str]
) -> None:
    """Run ``kdexpand.train`` in-process on real data and check its one-line failure.

    The exit status must be ``status``, stderr one ``error:`` line containing every fragment,
    and ``run_dir`` must not exist afterwards.
    """
    from kdexpand.train import main

    for name in ("KDEXPAND_DATA", "KDEXPAND_CACHE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(name, env[name])
    try:
        returned = main(args)
    finally:
        torch.use_deterministic_algorithms(False)
    error = capsys.readouterr().err

    assert returned == status, error
    lines = [line for line in error.splitlines() if line.strip()]
    assert len(lines) == 1, error
    assert lines[0].startswith("error: ")
    for fragment in fragments:
        assert fragment in lines[0]
    assert not run_dir.exists()
