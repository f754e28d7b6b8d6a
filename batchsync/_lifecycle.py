"""Process-level lifecycle: the registry of live batcher cores, the exit hook, the fork hook.

At interpreter exit (after the non-daemon threads have ended, from ``atexit``) every live core
is closed: its queued keys are dispatched and the batches in flight are waited for, for at
most ``EXIT_TIMEOUT`` seconds in all, so no load is silently lost and a hung batch function
cannot keep the process from ending. Workers are daemon threads and never block exit.

After ``os.fork()`` the child gets every core back fresh and empty: new lock, no queue, no
workers (a new one starts on the first load) and an empty cache. Nothing the parent had
queued or in flight is dispatched twice, and the child never resolves the parent's futures.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from typing import Any

__all__ = ["EXIT_TIMEOUT", "live_cores", "register"]

#: Seconds the exit hook waits, in all, for queued keys and batches in flight.
EXIT_TIMEOUT = 30.0

_cores: weakref.WeakSet[Any] = weakref.WeakSet()


def register(core: Any) -> None:
    """Track a core for the exit and fork hooks (weakly: a collected core drops out)."""
    _cores.add(core)


def live_cores() -> list[Any]:
    """The cores of the Batchers alive now (for stats_by_name)."""
    return list(_cores)


def _at_exit() -> None:
    end = time.monotonic() + EXIT_TIMEOUT
    for core in list(_cores):
        core.close(max(0.0, end - time.monotonic()))


def _after_fork_in_child() -> None:
    for core in list(_cores):
        closed = core.closed
        core._reset()
        core._closing = closed


atexit.register(_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
