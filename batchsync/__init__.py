"""batchsync: the DataLoader pattern for threaded Python.

Many threads ask for one key each; a Batcher gathers the keys for a short window and answers
them all with one bulk call of your batch function.
"""

from ._batcher import Batcher, aload, batched
from ._lograte import set_failure_log_interval
from ._scope import current_partition, in_scope, scope
from ._stats import Stats, stats_by_name
from .errors import BatchCycleError, BatcherClosed, BatchError, BatchsyncError, ForkedPoolError

__version__ = "0.1.0"

__all__ = [
    "BatchCycleError",
    "BatchError",
    "Batcher",
    "BatcherClosed",
    "BatchsyncError",
    "ForkedPoolError",
    "Stats",
    "__version__",
    "aload",
    "batched",
    "current_partition",
    "in_scope",
    "scope",
    "set_failure_log_interval",
    "stats_by_name",
]
