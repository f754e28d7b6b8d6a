"""SIGTERM and SIGINT turned into an orderly exit, so that every cleanup block runs.

Python's default SIGTERM ends the process at once, skipping ``finally`` blocks and context
managers: the embedded PostgreSQL, the PgBouncer and the proxy the demo started would be
left running (``timeout``, CI cancellation and ``docker stop`` all send SIGTERM). Inside
`stop_on_signals()` the first SIGTERM or SIGINT raises `Stopped` in the main thread, so
the stack unwinds through the cleanup code; further signals are ignored until the block
has exited, so a second Ctrl-C cannot interrupt the cleanup half way.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["Stopped", "stop_on_signals"]

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(BaseException):
    """A SIGTERM or SIGINT arrived: unwind and exit with `exit_code` (128 + the signal).

    A BaseException, as KeyboardInterrupt is, so that ``except Exception`` blocks on the
    way out do not swallow it.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Raise `Stopped` in the main thread on the first SIGTERM or SIGINT within the block.

    Must be entered in the main thread (signal handlers can only be set there). The
    previous handlers are restored when the block exits.
    """

    def handle(signum: int, frame: FrameType | None) -> None:
        for sig in SIGNALS:  # the unwinding that follows must run to its end
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous: dict[signal.Signals, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, handle)
    try:
        yield
    finally:
        for restored, old in previous.items():
            signal.signal(restored, old)
