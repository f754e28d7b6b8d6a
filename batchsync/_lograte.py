"""How often a Batcher's failed batches are logged at ERROR: the first, then once per interval.

A batch function that fails on every call (the database is down) must not flood the logs of
an application whose callers handle the error. Per Batcher: the first failure is logged at
ERROR with its traceback; later ones within ``interval`` seconds of that record are counted,
not logged at ERROR (a DEBUG line each); the first failure after the interval is logged at
ERROR again, with its traceback and the count of those left out since the previous record.
No threads here and the time is passed in, so the rule is testable on its own.
"""

from __future__ import annotations

import math
import threading

__all__ = ["DEFAULT_INTERVAL", "FailureLog", "set_failure_log_interval"]

#: Seconds between two ERROR records of one Batcher's failures, unless set otherwise.
DEFAULT_INTERVAL = 10.0

#: The interval in force (set_failure_log_interval); 0 logs every failure.
interval = DEFAULT_INTERVAL


class FailureLog:
    """One Batcher's state of the rule: when its last ERROR record was, how many since."""

    __slots__ = ("_last", "_lock", "_suppressed")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = -math.inf
        self._suppressed = 0

    def admit(self, now: float) -> int | None:
        """Count a failure at now: None to leave its ERROR record out, else how many were.

        The number is how many failures were left out since the previous ERROR record.
        """
        with self._lock:  # critical section: one decision per failure
            if now - self._last < interval:
                self._suppressed += 1
                return None
            suppressed, self._last, self._suppressed = self._suppressed, now, 0
            return suppressed


def set_failure_log_interval(seconds: float) -> float:
    """Log each Batcher's failed batches at ERROR at most once per ``seconds``; return the old.

    A Batcher's first failure is always logged with its traceback; within the interval later
    ones are counted (and logged at DEBUG), and the next ERROR record says how many were
    left out. 0 logs every failure at ERROR. The default is 10 seconds.
    """
    global interval
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
        raise TypeError(f"batchsync: the interval must be a number of seconds, not {seconds!r}")
    if math.isnan(seconds) or seconds < 0:
        raise ValueError(f"batchsync: the interval must be a number >= 0, not {seconds!r}")
    old, interval = interval, float(seconds)
    return old
