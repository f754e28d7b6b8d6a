"""OpenTelemetry for batchsync: a span per batch call linked to its callers, and metrics.

``pip install 'batchsync[otel]'`` (``opentelemetry-api`` only; the app brings its SDK)::

    from batchsync import otel
    otel.instrument()          # the global tracer and meter providers, or pass your own

Once instrumented, every Batcher of the process reports:

- **a span per batch call**, ``batchsync.batch <loader name>``, with the attributes
  ``batchsync.loader``, ``batchsync.keys``, ``batchsync.callers``, ``batchsync.partition``
  (when partitioned) and ``batchsync.outcome`` (``ok`` or ``error``, the exception recorded
  on the span). A batch serves many requests, so it is not a child of any one of them: it
  is *linked* to the span of every caller whose key rode in it (a span link is
  OpenTelemetry's model for fan-in). It is the current span while the batch function runs,
  so database spans made there (psycopg instrumentation) are its children.
- **the caller's wait on the caller's own span**: an event ``batchsync.wait`` per batch
  that served it, with ``batchsync.loader``, ``batchsync.queued_s`` (load to dispatch),
  ``batchsync.wait_s`` (load to the batch's end) and ``batchsync.batch_keys``.
- **metrics**, each with the attribute ``batchsync.loader``: histograms
  ``batchsync.batch.size`` (keys per call) and ``batchsync.key.wait`` (seconds from a load
  call to the dispatch of the batch that carries its keys, once per call and batch);
  counters ``batchsync.loads`` (keys asked for), ``batchsync.batches`` (batch calls) and
  ``batchsync.batch.failures`` (calls that raised); gauges ``batchsync.queued`` and
  ``batchsync.in_flight`` read from `batchsync.stats_by_name()`.

Nothing is measured before `instrument()` or after `uninstrument()`: the core then pays
one global read per load call and per batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from typing import Any

try:
    from opentelemetry import metrics, trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "batchsync.otel needs opentelemetry-api: pip install 'batchsync[otel]'"
    ) from exc

from batchsync import __version__, _hooks
from batchsync._stats import stats_by_name

__all__ = ["instrument", "uninstrument"]

_LOADER = "batchsync.loader"


class _Token:
    """What a loading call leaves with its keys: its span and when it loaded."""

    __slots__ = ("at", "span")

    def __init__(self, span: trace.Span, at: float) -> None:
        self.span = span
        self.at = at


class _OtelHook:
    """The batchsync hook (see batchsync._hooks) that reports to OpenTelemetry."""

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None,
        meter_provider: metrics.MeterProvider | None,
    ) -> None:
        self._tracer = trace.get_tracer("batchsync", __version__, tracer_provider)
        meter = metrics.get_meter("batchsync", __version__, meter_provider)
        self._size = meter.create_histogram(
            "batchsync.batch.size", unit="{key}", description="Keys per batch call"
        )
        self._wait = meter.create_histogram(
            "batchsync.key.wait",
            unit="s",
            description="Seconds from a load call to the dispatch of the batch with its keys",
        )
        self._loads = meter.create_counter(
            "batchsync.loads", unit="{key}", description="Keys asked for"
        )
        self._batches = meter.create_counter(
            "batchsync.batches", unit="{call}", description="Batch calls"
        )
        self._failures = meter.create_counter(
            "batchsync.batch.failures", unit="{call}", description="Batch calls that raised"
        )
        meter.create_observable_gauge(
            "batchsync.queued", [self._observe("queued")], unit="{key}", description="Keys queued"
        )
        meter.create_observable_gauge(
            "batchsync.in_flight",
            [self._observe("in_flight")],
            unit="{key}",
            description="Keys in batch calls running now",
        )

    @staticmethod
    def _observe(field: str) -> Callable[[metrics.CallbackOptions], Iterable[metrics.Observation]]:
        def observe(options: metrics.CallbackOptions) -> Iterable[metrics.Observation]:
            return [
                metrics.Observation(getattr(s, field), {_LOADER: name})
                for name, s in stats_by_name().items()
            ]

        return observe

    def on_load(self, name: str, n: int) -> object:
        self._loads.add(n, {_LOADER: name})
        return _Token(trace.get_current_span(), time.perf_counter())

    def run_batch(
        self,
        name: str,
        keys: list[Any],
        partition: Hashable,
        tokens: list[object],
        batch_fn: Callable[[list[Any]], Any],
    ) -> Any:
        dispatched = time.perf_counter()
        callers = [t for t in tokens if isinstance(t, _Token)]
        labels = {_LOADER: name}
        self._batches.add(1, labels)
        self._size.record(len(keys), labels)
        for t in callers:
            self._wait.record(dispatched - t.at, labels)
        links = []
        for t in callers:
            context = t.span.get_span_context()
            if context.is_valid:
                links.append(trace.Link(context))
        attributes: dict[str, Any] = {
            _LOADER: name,
            "batchsync.keys": len(keys),
            "batchsync.callers": len(callers),
        }
        if partition is not None:
            attributes["batchsync.partition"] = str(partition)
        try:
            with self._tracer.start_as_current_span(
                f"batchsync.batch {name}", links=links, attributes=attributes
            ) as span:
                try:
                    result = batch_fn(keys)
                except BaseException:
                    self._failures.add(1, labels)
                    span.set_attribute("batchsync.outcome", "error")
                    raise
                span.set_attribute("batchsync.outcome", "ok")
                return result
        finally:
            done = time.perf_counter()
            for t in callers:
                if t.span.is_recording():  # a caller that left has ended its span
                    t.span.add_event(
                        "batchsync.wait",
                        {
                            _LOADER: name,
                            "batchsync.queued_s": dispatched - t.at,
                            "batchsync.wait_s": done - t.at,
                            "batchsync.batch_keys": len(keys),
                        },
                    )


def instrument(
    *,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
) -> None:
    """Report every Batcher of the process to OpenTelemetry (see the module docstring).

    Without providers, the global ones are used (``trace.set_tracer_provider``). Calling it
    again replaces the previous instrumentation.
    """
    _hooks.install(_OtelHook(tracer_provider, meter_provider))


def uninstrument() -> None:
    """Stop reporting: the core calls no hook any more."""
    _hooks.install(None)
