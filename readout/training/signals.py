"""Signals that arrive before ``readout.fit`` has imported torch: remembered, not fatal.

``python -m readout.fit`` calls :func:`catch_early` in its first lines, before its imports (seconds
of torch and Lightning): from then on SIGTERM and SIGUSR1 (SLURM's requeue signal) only append
their number to :data:`EARLY`, where the default action of SIGUSR1 would kill the process. Once
the trainer's :class:`readout.training.faults.Preemption` is set up it takes the numbers over and handles
them. Standard library only: this module must stay cheap to import.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

#: Signal numbers received between :func:`catch_early` and the hand-over to Preemption.
EARLY: list[int] = []
_previous: dict[int, Any] = {}


def _remember(number: int, frame: FrameType | None) -> None:
    EARLY.append(number)


def catch_early() -> None:
    """Makes SIGTERM and SIGUSR1 append to :data:`EARLY` (main thread only; idempotent)."""
    if _previous or threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        _previous[signum] = signal.getsignal(signum)
        signal.signal(signum, _remember)


def hand_over() -> tuple[list[int], dict[int, Any]]:
    """The numbers received so far and the handlers :func:`catch_early` replaced; resets both."""
    numbers, previous = list(EARLY), dict(_previous)
    EARLY.clear()
    _previous.clear()
    return numbers, previous
