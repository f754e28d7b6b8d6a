"""Shared fixtures: a guard that fails any test leaking a batchsync worker thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.pg_fixtures"]


def _batchsync_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("batchsync-") and t.is_alive()}


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves a batchsync worker thread running after it ends.

    A test must close() its Batchers (or use them in a with block). A closed Batcher's
    workers end on their own; give them a moment to do so before judging.
    """
    before = _batchsync_threads()
    yield
    deadline = time.monotonic() + 15.0
    leaked = _batchsync_threads() - before
    while leaked and time.monotonic() < deadline:
        time.sleep(0.01)  # polling for threads to end; there is no event to wait on
        leaked = _batchsync_threads() - before
    assert not leaked, f"test leaked batchsync threads: {sorted(t.name for t in leaked)}"
