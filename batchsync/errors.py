"""The exceptions batchsync raises.

::

    BatchsyncError          base of everything batchsync raises itself
     +-- BatcherClosed      a load after close(), or a key abandoned by close(timeout=...)
     +-- BatchError         the batch function broke its contract (wrong type, wrong length)
          +-- BatchCycleError  a batch function waited on a key its own call is computing
     +-- ForkedPoolError    a pg loader's pool was opened in another process, before a fork

Exceptions raised by the user's batch function are delivered unchanged, never wrapped.
"""

from __future__ import annotations

__all__ = ["BatchCycleError", "BatchError", "BatcherClosed", "BatchsyncError", "ForkedPoolError"]


class BatchsyncError(Exception):
    """Base class of the errors batchsync raises itself."""


class BatcherClosed(BatchsyncError):
    """The Batcher is closed: it takes no more loads, or it gave up on a key at close()."""


class BatchError(BatchsyncError):
    """The batch function returned something that breaks the batch contract."""


class BatchCycleError(BatchError):
    """A batch function waited on a key that its own, still running, call is computing."""


class ForkedPoolError(BatchsyncError):
    """A pg loader's pool was opened in another process, before a fork: it is not used."""
