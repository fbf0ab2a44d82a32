"""One run per run directory: an advisory lock on the run's marker file.

The main process of a run holds an exclusive ``flock`` on ``<run_dir>/.kdexpand-run`` from
the moment it creates or clears the directory until the run ends, and writes its PID there.
A second run on the same directory (a copy started by mistake, a ``--resume`` or
``--overwrite`` while the first still trains) is rejected before it touches anything.
The kernel drops the lock when the process dies, SIGKILL included, so a killed run never
leaves a stale lock behind.

NOTE: ``flock`` is advisory and POSIX-only. On Windows no lock is taken, and some network
file systems do not share ``flock`` between machines.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["MARKER_FILE", "RunDirectoryBusy", "RunDirectoryLock", "check_not_in_use"]

# Written by every run at its top level; it marks the folder as a run and carries the lock.
MARKER_FILE = ".kdexpand-run"

# How long acquiring waits for a shared probe lock of the same run's other processes.
_ACQUIRE_SECONDS = 5.0


class RunDirectoryBusy(FileExistsError):
    """Another process holds the run directory."""


def _busy_message(marker: Path) -> str:
    try:
        pid = marker.read_text().strip() or "unknown"
    except OSError:
        pid = "unknown"
    return (
        f"run directory {marker.parent} is in use by another run (PID {pid}); wait for it to end, "
        "or set output.dir to another folder"
    )


def check_not_in_use(run_dir: Path) -> None:
    """Raise :class:`RunDirectoryBusy` when a live run holds ``run_dir``; change nothing.

    The probe takes a shared lock for a moment, so the processes of one run can all probe.
    """
    marker = run_dir / MARKER_FILE
    if fcntl is None or not marker.is_file():
        return
    with open(marker, "rb") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunDirectoryBusy(_busy_message(marker)) from None
        fcntl.flock(handle, fcntl.LOCK_UN)


class RunDirectoryLock:
    """The exclusive lock of one run directory, held from :meth:`acquire` to :meth:`release`."""

    def __init__(self, run_dir: Path) -> None:
        self.marker = run_dir / MARKER_FILE
        self._handle = None

    def acquire(self) -> RunDirectoryLock:
        """Create the marker if needed, lock it and write this process's PID into it.

        Raises:
            RunDirectoryBusy: Another run holds the lock.
        """
        handle = open(self.marker, "a+")
        if fcntl is not None:
            deadline = time.monotonic() + _ACQUIRE_SECONDS
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        handle.close()
                        raise RunDirectoryBusy(_busy_message(self.marker)) from None
                    time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._handle = handle
        return self

    def release(self) -> None:
        """Unlock and close; safe to call twice."""
        if self._handle is None:
            return
        if fcntl is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
