"""The queue of one Batcher and its window: entries, their states, what is due, taking a chunk.

No threads and no lock here: the core calls every method under its own lock, and passes the
time in, so the rules can be tested on their own (tests/test_queue.py).

The queue holds entries in arrival order. The first ``due`` of them are *due*: they go to
the next free slot. The rest wait in the *open window*, which closes at ``deadline``::

    push ──> held in the window ──(deadline | full | make_due)──> due ──(take)──> a chunk
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Hashable
from typing import Any

__all__ = ["DONE", "QUEUED", "RUNNING", "Entry", "Queue"]

QUEUED, RUNNING, DONE = 0, 1, 2


class Entry:
    """One unique key, queued or running, with everyone who waits for it."""

    __slots__ = (
        "failed",
        "ident",
        "key",
        "mkey",
        "partition",
        "slot",
        "state",
        "uncached",
        "value",
        "waiters",
    )

    def __init__(
        self,
        key: Any,
        ident: Hashable,
        mkey: Hashable,
        partition: Hashable,
        waiters: list[Any] | None = None,
    ) -> None:
        self.key = key
        self.ident = ident  # the key's identity (key_fn(key) or the key itself)
        self.mkey = mkey  # identity within the batcher: (partition, ident) when partitioned
        self.partition = partition
        self.state = QUEUED
        self.value: Any = None
        self.failed = False
        # On a chunk's first entry: the chunk holds a slot and its keys count in flight
        # (from taking it until _finish frees them).
        self.slot = False
        self.uncached = False  # a clear() came during its flight: do not cache its value
        # Who waits: futures and latches. A one-item list may be shared by several entries
        # (the core's _join copies it before adding): replace it, never change it in place.
        self.waiters: list[Any] = [] if waiters is None else waiters


class Queue:
    """Queued entries in arrival order, how many of them are due, and the window's deadline.

    The queued entries are ``entries[head:]`` (the core appends to ``entries``), after the
    ready chunks when partitioned: taking an unpartitioned chunk moves ``head`` on instead of
    moving every entry behind it, and the taken ones are cut off once they are half of the
    list, so a long queue costs O(1) per key taken.
    """

    __slots__ = (
        "deadline",
        "due",
        "entries",
        "head",
        "linger",
        "max_batch_size",
        "partitioned",
        "ready",
        "ready_n",
        "window",
    )

    def __init__(self, window: float, max_batch_size: int, partitioned: bool) -> None:
        self.window = window
        self.max_batch_size = max_batch_size
        self.partitioned = partitioned
        self.entries: list[Entry] = []
        self.head = 0  # entries before it were taken
        self.due = 0  # how many entries are due for dispatch: the ready ones, then the head
        # Partitioned: due entries already split into chunks (see _split), and their count.
        self.ready: deque[list[Entry]] = deque()
        self.ready_n = 0
        self.deadline = 0.0  # when the open window closes (valid while held > 0)
        self.linger = math.inf  # an earlier close the dispatch rule may set (hold_until)

    def __len__(self) -> int:
        return len(self.entries) - self.head + self.ready_n

    @property
    def held(self) -> int:
        """How many entries wait in the open window (not due yet)."""
        return len(self.entries) - self.head + self.ready_n - self.due

    def push(self, entry: Entry, now: float) -> bool:
        """Queue entry; return True when a worker must look (the window opened, or is full)."""
        was_open = self.held > 0
        self.entries.append(entry)
        return self.pushed(was_open, now)

    def pushed(self, was_open: bool, now: float) -> bool:
        """Apply the window's rules after entries were appended to ``entries``.

        was_open tells whether a window was open before they came. A full window
        (max_batch_size keys held) is due at once; the first key opens a window that
        closes at now + window. Return True when a worker must look.
        """
        if self.held >= self.max_batch_size:
            self.due = len(self)
            return True
        if not was_open:
            self.deadline = now + self.window
            self.linger = math.inf
            return True
        return False

    def make_due(self) -> bool:
        """Make everything queued due (close the window); return True when anything changed."""
        if self.due < len(self):
            self.due = len(self)
            return True
        return False

    def hold_until(self, when: float) -> None:
        """Close the open window at when, if that is before its deadline (latest call wins)."""
        self.linger = when

    def expire(self, now: float) -> float | None:
        """Close the window if its deadline (or linger) has passed; return the seconds left."""
        if self.due == len(self):
            return None
        delay = min(self.deadline, self.linger) - now
        if delay <= 0:
            self.due = len(self)
            return None
        return delay

    def take(self) -> list[Entry]:
        """Take the next chunk of due entries: at most max_batch_size, one partition only.

        Unpartitioned, the chunk is the head of the due entries. Partitioned, it is the due
        entries of the first one's partition (up to max_batch_size), in order; the others
        stay due, split into their chunks by the same one pass (see _split).
        """
        queue, size, head = self.entries, self.max_batch_size, self.head
        if not self.partitioned:
            n = min(self.due, size)
            end = head + n
            chunk = queue[head:end]
            total = len(queue)
            # No call from here on: an interrupt (a signal handler that raises) lands only at a
            # call, so it finds the queue as it was or with the chunk taken, nothing between.
            if end == total:
                del queue[:]
                end = 0
            elif end > 1024 and 2 * end > total:
                del queue[:end]  # moves fewer entries than were taken since the last cut
                end = 0
            self.head = end
            self.due -= n
            return chunk
        if not self.ready:
            self._split()
        chunk = self.ready.popleft()
        self.due -= len(chunk)
        self.ready_n -= len(chunk)
        return chunk

    def _split(self) -> None:
        """Move the due entries into ready chunks: by partition, in order, max_batch_size each.

        One pass over the due entries for all the chunks they make (linear: a scan per chunk
        was quadratic in a long queue of one partition), grouped as dict keys are, so a
        partition equal to nothing, not even itself (NaN), still groups by identity.
        """
        queue, size, head = self.entries, self.max_batch_size, self.head
        n = self.due - self.ready_n
        groups: dict[Any, list[tuple[int, Entry]]] = {}
        for i, entry in enumerate(queue[head : head + n]):
            group = groups.get(entry.partition)
            if group is None:
                group = groups[entry.partition] = []
            group.append((i, entry))
        del queue[: head + n]
        self.head = 0
        # The chunks go in the order of their first entry, as one scan per chunk sent them.
        chunks = [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
        chunks.sort(key=lambda chunk: chunk[0][0])
        self.ready.extend([entry for _, entry in chunk] for chunk in chunks)
        self.ready_n += n

    def untake(self, chunk: list[Entry]) -> None:
        """Put back a chunk that take() returned, due and first (its taking was interrupted)."""
        if not chunk:
            return
        if self.partitioned:
            self.ready.appendleft(chunk)
            self.ready_n += len(chunk)
        else:
            self.entries[self.head : self.head] = chunk
        self.due += len(chunk)

    def clear(self) -> list[Entry]:
        """Take every queued entry out; return them."""
        entries = [entry for chunk in self.ready for entry in chunk]
        entries += self.entries[self.head :]
        self.entries = []
        self.head = 0
        self.ready.clear()
        self.due = self.ready_n = 0
        return entries
