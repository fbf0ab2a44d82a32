"""Graceful stops: SIGTERM or SIGINT ends training at the next step boundary, after a checkpoint.

While a :class:`StopRequest` is entered, SIGINT and SIGTERM only set a flag. The trainer
polls the flag after every optimizer step and before every epoch, saves a checkpoint there
and raises :class:`TrainingInterrupted`. The command line prints the resume command and
exits with 128 + the signal number (130 for SIGINT, 143 for SIGTERM). A second signal more
than a second after the first stops the process at once through the previous handlers, and
the last complete checkpoint is kept. A second signal within a second is the same request
delivered twice, so it is ignored.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType

import torch
from accelerate import Accelerator

__all__ = ["StopRequest", "TrainingInterrupted", "stop_with_launcher"]

logger = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

# A second signal this soon after the first is taken as the same request, not as "stop now".
_REPEAT_SECONDS = 1.0

# Environment variables that ``accelerate launch`` and ``torchrun`` set in the processes they start.
_LAUNCHER_VARIABLES = ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID", "LOCAL_RANK")
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def stop_with_launcher() -> bool:
    """Make the Linux kernel send SIGTERM to this process when the launcher that started it exits.

    ``accelerate launch`` with one process (Accelerate 1.15) exits at once on SIGTERM without
    passing the signal on, so training would go on unseen and unstoppable by the launcher.
    With this request the kernel delivers SIGTERM here when the launcher exits, and the
    usual graceful stop saves a checkpoint. Only processes that a launcher started (they
    carry its environment variables) ask for it.

    Returns:
        True when the request was made; False elsewhere (not Linux, or no launcher).
    """
    if not sys.platform.startswith("linux") or not any(name in os.environ for name in _LAUNCHER_VARIABLES):
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        logger.debug("prctl(PR_SET_PDEATHSIG) failed with errno %d", ctypes.get_errno())
        return False
    if os.getppid() == 1:
        # The launcher exited before the request took effect: act as if the signal came.
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint.

    Attributes:
        signal_number: The signal that asked for the stop.
        checkpoint: The checkpoint folder that a resumed run starts from.
    """

    def __init__(self, signal_number: int, checkpoint: Path) -> None:
        self.signal_number = signal_number
        self.checkpoint = checkpoint
        name = signal.Signals(signal_number).name
        super().__init__(f"training stopped by {name}; checkpoint {checkpoint} saved")

    @property
    def exit_code(self) -> int:
        """The shell convention for a process ended by a signal: 128 + the signal number."""
        return 128 + self.signal_number


class StopRequest:
    """Record SIGINT / SIGTERM while entered, for the trainer to act on at a step boundary.

    Outside the ``with`` block, or in a thread other than the main one (where Python cannot
    install handlers), no handler is installed and :meth:`poll` returns 0 unless a signal
    was recorded before.
    """

    def __init__(self) -> None:
        self.signal_number = 0
        self._first_seconds = 0.0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for number in _SIGNALS:
                self._previous[number] = signal.signal(number, self._record)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            # None: the handler was installed outside Python, so it cannot be put back; the
            # default action is the closest Python can set.
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _record(self, number: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signal_number:
            if now - self._first_seconds < _REPEAT_SECONDS:
                # The same request delivered twice: a launcher that passes the signal on and
                # then exits makes the kernel send the parent-death signal as well.
                return
            self._restore()
            signal.raise_signal(number)
            return
        self.signal_number = number
        self._first_seconds = now
        logger.warning(
            "received %s: training stops after the current step and saves a checkpoint; "
            "send the signal again to stop at once (the last complete checkpoint is kept)",
            signal.Signals(number).name,
        )

    def poll(self, accelerator: Accelerator) -> int:
        """Return the signal number that asked for a stop on any process, or 0.

        With several processes this is a collective call (a max-reduction), so every
        process must call it at the same step. They then all stop at that step.
        """
        if accelerator.num_processes == 1:
            return self.signal_number
        flag = torch.tensor(self.signal_number, device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item())
