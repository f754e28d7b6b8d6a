"""batchsync.otel with the OpenTelemetry SDK's in-memory exporter and metric reader."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import StatusCode

import batchsync
from batchsync import Batcher, _hooks, otel


class Telemetry:
    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        self.tracer = self.tracer_provider.get_tracer("test")

    def points(self, name: str) -> dict[str, Any]:
        """The data points of metric `name`, by loader name."""
        data = self.reader.get_metrics_data()
        out: dict[str, Any] = {}
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == name:
                        for point in metric.data.data_points:
                            out[str(point.attributes["batchsync.loader"])] = point
        return out


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    t = Telemetry()
    otel.instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    try:
        yield t
    finally:
        otel.uninstrument()
        t.meter_provider.shutdown()


def test_a_batch_from_three_request_threads_links_to_their_three_spans(
    telemetry: Telemetry,
) -> None:
    calls: list[list[int]] = []

    def fetch(keys: list[int]) -> dict[int, int]:
        calls.append(sorted(keys))
        return {k: k * 10 for k in keys}

    # A long window and eager=False: the three requests' keys are sure to share one call.
    loaded = threading.Barrier(3, action=lambda: things.flush())
    request_spans: dict[int, Any] = {}
    results: dict[int, Any] = {}
    with Batcher(fetch, window=30.0, eager=False, name="things") as things:

        def request(i: int) -> None:
            with telemetry.tracer.start_as_current_span(f"request {i}") as span:
                request_spans[i] = span.get_span_context()
                future = things.load(i)
                loaded.wait(10)
                results[i] = future.result(10)

        threads = [threading.Thread(target=request, args=(i,)) for i in (1, 2, 3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
    assert calls == [[1, 2, 3]]
    assert results == {1: 10, 2: 20, 3: 30}
    finished = telemetry.spans.get_finished_spans()
    (batch,) = [s for s in finished if s.name == "batchsync.batch things"]
    assert {link.context.span_id for link in batch.links} == {
        c.span_id for c in request_spans.values()
    }
    assert batch.attributes is not None
    assert dict(batch.attributes) == {
        "batchsync.loader": "things",
        "batchsync.keys": 3,
        "batchsync.callers": 3,
        "batchsync.outcome": "ok",
    }
    assert batch.parent is None  # it serves three requests: a root, linked to each
    for span in finished:
        if span.name.startswith("request"):
            (event,) = [e for e in span.events if e.name == "batchsync.wait"]
            assert event.attributes is not None
            assert event.attributes["batchsync.loader"] == "things"
            assert event.attributes["batchsync.batch_keys"] == 3
            queued, waited = (event.attributes[f"batchsync.{n}_s"] for n in ("queued", "wait"))
            assert isinstance(queued, float) and isinstance(waited, float)
            assert 0 <= queued <= waited


def test_metrics_per_loader_and_a_failed_batch(telemetry: Telemetry) -> None:
    def fetch(keys: list[int]) -> list[int]:
        if 0 in keys:
            raise ValueError("no zero")
        return list(keys)

    with Batcher(fetch, name="numbers") as numbers, Batcher(fetch, name="others") as others:
        with telemetry.tracer.start_as_current_span("request"):
            assert numbers.get_many([1, 2, 3, 3]) == [1, 2, 3, 3]
            assert numbers.get(4) == 4
            with pytest.raises(ValueError, match="no zero"):
                numbers.get(0)
            assert others.get_many([5, 6]) == [5, 6]
        loads = telemetry.points("batchsync.loads")
        assert {n: p.value for n, p in loads.items()} == {"numbers": 6, "others": 2}
        batches = telemetry.points("batchsync.batches")
        assert {n: p.value for n, p in batches.items()} == {"numbers": 3, "others": 1}
        failures = telemetry.points("batchsync.batch.failures")
        assert {n: p.value for n, p in failures.items()} == {"numbers": 1}
        sizes = telemetry.points("batchsync.batch.size")
        assert (sizes["numbers"].count, sizes["numbers"].sum) == (3, 5)
        waits = telemetry.points("batchsync.key.wait")
        assert waits["numbers"].count == 3 and waits["numbers"].min >= 0
        queued = telemetry.points("batchsync.queued")
        assert queued["numbers"].value == 0
    (failed,) = [
        s
        for s in telemetry.spans.get_finished_spans()
        if s.name == "batchsync.batch numbers" and s.status.status_code == StatusCode.ERROR
    ]
    assert failed.attributes is not None and failed.attributes["batchsync.outcome"] == "error"
    assert [e.name for e in failed.events] == ["exception"]


def test_nothing_is_reported_after_uninstrument() -> None:
    t = Telemetry()
    otel.instrument(tracer_provider=t.tracer_provider, meter_provider=t.meter_provider)
    otel.uninstrument()
    assert _hooks.installed is None
    with Batcher(lambda keys: list(keys), name="quiet") as quiet:
        assert quiet.get_many([1, 2]) == [1, 2]
    assert t.spans.get_finished_spans() == ()
    assert t.points("batchsync.loads") == {}
    t.meter_provider.shutdown()


def test_stats_by_name_sums_batchers_that_share_a_name() -> None:
    with (
        Batcher(lambda keys: list(keys), name="shared-a") as a1,
        Batcher(lambda keys: list(keys), name="shared-a") as a2,
        Batcher(lambda keys: list(keys), name="shared-b") as b,
    ):
        a1.get_many([1, 2, 3])
        a2.get_many([1])
        b.get(7)
        stats = batchsync.stats_by_name()
    assert (stats["shared-a"].loads, stats["shared-a"].batches) == (4, 2)
    assert stats["shared-a"].largest_batch == 3
    assert (stats["shared-b"].loads, stats["shared-b"].keys) == (1, 1)
