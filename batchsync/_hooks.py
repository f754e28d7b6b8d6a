"""The observer hook: how an optional integration (``batchsync.otel``) sees loads and batches.

At most one hook is installed per process (``install``). The core calls it at two places,
and only when one is installed; without a hook each place costs one global read and a
``None`` test:

- ``on_load(name, n)``, in the caller's thread, when one call of ``load``, ``load_many``,
  ``get`` or ``get_many`` queues `n` keys. It returns a token (e.g. the caller's span and
  the time), which rides with that caller's waiter; None means "nothing to carry".
- ``run_batch(name, keys, partition, tokens, batch_fn)``, around one batch call, in the
  call's fresh contextvars context, on whichever thread runs it. `tokens` are those of every
  caller whose key is in the chunk, once each. It must call ``batch_fn(keys)`` exactly once
  and return its result or let its exception through unchanged.

A hook must not call back into the Batcher and must not raise from ``on_load`` (its error
would reach the caller of ``load``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

__all__ = ["Hook", "install", "installed"]


class Hook(Protocol):
    """What the core calls; see the module docstring."""

    def on_load(self, name: str, n: int) -> object: ...

    def run_batch(
        self,
        name: str,
        keys: list[Any],
        partition: Hashable,
        tokens: list[object],
        batch_fn: Callable[[list[Any]], Any],
    ) -> Any: ...


#: The installed hook, read by the core at each call site.
installed: Hook | None = None


def install(hook: Hook | None) -> Hook | None:
    """Install `hook` (None removes it); return the one it replaces."""
    global installed
    previous, installed = installed, hook
    return previous
