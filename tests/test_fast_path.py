"""The get_many fast path against the general path: the same calls, values and Stats.

Without key_fn, partition or cache, ``get_many`` takes a path of its own
(``_Core._get_many_plain``: one dict for de-duplication, one push of the whole list); with
``key_fn=lambda k: k`` the same keys take the general path (``_Core.get_many``). Hypothesis
runs one random program on both and asserts that every step agrees: the keys each batch call
received (a multiset per call: the contract promises unique keys, not their order), what
each caller got, and ``Stats``. With ``cache=True`` both run the general path; the program
then also checks that ``key_fn=lambda k: k`` changes nothing.

Every program is deterministic whatever the scheduler does: the window never closes by
itself (an hour) and ``eager=True`` sends the queue when a caller blocks, so a batch call
holds the same keys in every run; keys loaded without waiting stay below ``max_batch_size``,
so nothing is sent before the program blocks on it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchsync import Batcher, BatcherClosed

T = 10.0  # generous bound for a result that must come; a hang fails here
LONG = 3600.0  # a window that never closes by itself within a test


class KeyFailed(Exception):
    """The exception instance the batch function returns for a failing key."""


class CallFailed(Exception):
    """What the batch function raises for a call that holds a poison key."""


class Primed(Exception):
    """An exception instance primed into the cache."""


def shown(value: Any) -> Any:
    """Make an outcome comparable across runs: exceptions by type and args, keys by repr.

    repr keeps 1, 1.0 and True apart: they are one key (equal and of equal hash), and
    which of them a call receives is part of what the two paths must agree on.
    """
    if isinstance(value, BaseException):
        return ("raised", type(value).__name__, repr(value.args))
    return ("ok", repr(value))


@dataclass
class Program:
    """A batch function's behaviour, the Batcher's options and the steps to run."""

    cache: bool
    missing: str  # "none" or "raise"
    mapping: bool  # the batch function returns a Mapping (else a list)
    max_batch_size: int
    max_concurrency: int
    failing: frozenset[int]  # keys answered with an exception instance
    absent: frozenset[int]  # keys left out of a Mapping, None in a list
    poison: frozenset[int]  # keys that make their call raise
    steps: list[tuple[Any, ...]]

    def answer(self, keys: list[Hashable]) -> Any:
        """The batch function's result for one call: it depends on the keys alone."""
        if any(k in self.poison for k in keys):
            raise CallFailed(sorted(map(repr, keys)))

        def value(k: Hashable) -> Any:
            return KeyFailed(repr(k)) if k in self.failing else ("v", repr(k))

        if self.mapping:  # a key of `absent` is left out: None, or KeyError(key)
            return {k: value(k) for k in keys if k not in self.absent}
        return [None if k in self.absent else value(k) for k in keys]

    def run(self, general: bool) -> list[Any]:
        """Run every step; return, per step, its outcome, its batch calls and the Stats."""
        calls: list[tuple[int, list[str]]] = []
        step_no = 0
        lock = threading.Lock()

        def batch_fn(keys: list[Hashable]) -> Any:
            with lock:
                calls.append((step_no, sorted(map(repr, keys))))
            return self.answer(keys)

        def calls_of(n: int) -> list[list[str]]:
            with lock:
                return sorted(keys for i, keys in calls if i == n)

        key_fn: Callable[[Hashable], Hashable] | None = (lambda k: k) if general else None
        trace: list[Any] = []
        with Batcher(
            batch_fn,
            window=LONG,
            eager=True,
            max_batch_size=self.max_batch_size,
            max_concurrency=self.max_concurrency,
            cache=self.cache,
            missing=self.missing,  # type: ignore[arg-type]
            key_fn=key_fn,
            name="differential",  # one name: it is in the error messages compared
        ) as b:
            # Which path each run takes: the fast one only without key_fn and cache.
            assert b._core.plain is (not general and not self.cache)
            for step_no, step in enumerate(self.steps):  # step_no: read by batch_fn
                outcome = self.step(b, step)
                trace.append((step_no, step, outcome, calls_of(step_no), b.stats()))
            step_no = len(self.steps)
        stats = b.stats()
        assert (stats.queued, stats.in_flight) == (0, 0)
        trace.append(("close", calls_of(step_no), stats))
        return trace

    def step(self, b: Batcher[Hashable, Any], step: tuple[Any, ...]) -> Any:
        what = step[0]
        try:
            if what == "get_many":
                return get_many(b, step[1])
            if what == "load_then_get_many":
                return self.load_then_get_many(b, step[1], step[2])
            if what == "prime":
                b.prime(step[1], Primed(repr(step[1])) if step[2] else ("primed", repr(step[1])))
            elif what == "clear":
                b.clear(step[1])
            elif what == "clear_all":
                b.clear_all()
            else:
                b.close()
        except (ValueError, BatcherClosed) as exc:  # no cache for prime/clear; after close
            return shown(exc)
        return None

    def load_then_get_many(
        self, b: Batcher[Hashable, Any], loads: list[tuple[Hashable, bool]], keys: list[Hashable]
    ) -> Any:
        """load_many (cancelling some futures), then get_many, then wait on the futures.

        The loaded keys stay fewer than max_batch_size with what is still queued (keys whose
        every caller cancelled, left from earlier steps), so none of them is sent before
        the get_many blocks: the get_many joins them, whatever the scheduler does.
        """
        room = self.max_batch_size - 1 - b.stats().queued
        kept: list[tuple[Hashable, bool]] = []
        distinct: list[Hashable] = []
        for key, cancel in loads:
            if key not in distinct:
                if len(distinct) == room:
                    continue
                distinct.append(key)
            kept.append((key, cancel))
        futures = b.load_many([key for key, _ in kept])
        cancels = [cancel for _, cancel in kept]
        cancelled = [f.cancel() if c else False for f, c in zip(futures, cancels, strict=True)]
        many = get_many(b, keys)
        return ([k for k, _ in kept], cancelled, many, [future_outcome(f) for f in futures])


def get_many(b: Batcher[Hashable, Any], keys: list[Hashable]) -> Any:
    try:
        return [shown(v) for v in b.get_many(keys, timeout=T)]
    except (KeyFailed, CallFailed, Primed, KeyError) as exc:
        return shown(exc)


def future_outcome(f: Future[Any]) -> Any:
    if f.cancelled():
        return "cancelled"
    error = f.exception(T)
    return shown(error) if error is not None else shown(f.result(0))


# 1, 1.0 and True are one key; so are 2 and 2.0. NAN is one key (a dict finds it by
# identity), each fresh NaN another.
NAN = math.nan
keys = st.one_of(
    st.integers(0, 9),
    st.integers(0, 9),
    st.sampled_from([1.0, 2.0, True, NAN]),
    st.builds(float, st.just("nan")),
)
steps = st.lists(
    st.one_of(
        st.tuples(st.just("get_many"), st.lists(keys, max_size=12)),
        st.tuples(
            st.just("load_then_get_many"),
            st.lists(st.tuples(keys, st.booleans()), max_size=6),
            st.lists(keys, max_size=10),
        ),
        st.tuples(st.just("prime"), keys, st.booleans()),
        st.tuples(st.just("clear"), keys),
        st.tuples(st.just("clear_all")),
        st.tuples(st.just("close")),
    ),
    max_size=8,
)
programs = st.builds(
    Program,
    cache=st.booleans(),
    missing=st.sampled_from(["none", "raise"]),
    mapping=st.booleans(),
    max_batch_size=st.integers(1, 4),
    max_concurrency=st.integers(1, 2),
    failing=st.frozensets(st.integers(0, 9), max_size=3),
    absent=st.frozensets(st.integers(0, 9), max_size=3),
    poison=st.frozensets(st.integers(0, 9), max_size=2),
    steps=steps,
)

# Run every time, whatever hypothesis draws: between them they take each branch above (a
# repeated key, equal keys of other types, a failing key, a raising call, a missing key both
# ways, a load joined by a get_many, cancelled loads left queued, a hit on a primed value
# and on a primed exception, a prime that leaves a cached value alone, clears, close).
EXAMPLES = [
    Program(
        cache=False,
        missing="none",
        mapping=True,
        max_batch_size=4,
        max_concurrency=1,
        failing=frozenset({3}),
        absent=frozenset({4}),
        poison=frozenset({7}),
        steps=[
            ("get_many", [1, 3, 1, 4, 5, True, 1.0]),
            ("load_then_get_many", [(2, False), (6, True), (8, True)], [2, 8, 2, 9, 0]),
            ("get_many", [7, 5]),
            ("load_then_get_many", [(6, True)], []),
            ("get_many", [6, 2.0]),
            ("prime", 1, False),
            ("close",),
            ("get_many", []),
        ],
    ),
    Program(
        cache=True,
        missing="raise",
        mapping=True,
        max_batch_size=3,
        max_concurrency=2,
        failing=frozenset({3}),
        absent=frozenset({4}),
        poison=frozenset(),
        steps=[
            ("get_many", [1, 2, 1, 0]),
            ("prime", 5, False),
            ("prime", 6, True),
            ("prime", 1, False),
            ("get_many", [5, 1, 5]),
            ("get_many", [6]),
            ("load_then_get_many", [(5, False), (7, True), (2, False)], [7, 7, 3]),
            ("clear", 2),
            ("get_many", [2, 4]),
            ("clear_all",),
            ("get_many", [5, 1.0, 0, 2, 9]),
        ],
    ),
]


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(program=programs)
@example(program=EXAMPLES[0])
@example(program=EXAMPLES[1])
def test_the_fast_path_and_the_general_path_agree(program: Program) -> None:
    fast = program.run(general=False)
    general = program.run(general=True)
    assert len(fast) == len(general)
    for f, g in zip(fast, general, strict=True):
        assert f == g, f"the fast path {f!r} but the general path {g!r}"

