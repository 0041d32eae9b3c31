"""server.tracing.sampling: root requests sampled ahead of the SDK at the configured ratio, with the SDK agreeing
on every id it is handed; requests with a traceparent still follow the caller's flag."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, TraceIdRatioBased

from server.tracing import CURRENT, Tracer
from server.tracing.sampling import RootSampler, root_ratio

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def make(ratio: float) -> tuple[Tracer, InMemorySpanExporter, RootSampler]:
    ids = RootSampler(ratio)
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(ratio), id_generator=ids)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracer(provider), exporter, ids


def serve(tracer: Tracer, count: int, headers: dict[str, str]) -> int:
    """``count`` requests through the edge's context; returns how many the batcher would have seen traced."""
    seen = 0
    for _ in range(count):
        with tracer.request("grpc", "m", "1", headers):
            seen += CURRENT.get() is not None
    return seen


def test_root_requests_are_sampled_at_the_ratio_and_the_sdk_agrees() -> None:
    random.seed(21)  # the draw uses the module's generator, as the SDK's ids do
    tracer, exporter, ids = make(0.05)
    seen = serve(tracer, 4000, {})
    spans = exporter.get_finished_spans()
    assert 100 <= len(spans) <= 320  # binomial(4000, 0.05): mean 200, sd 14
    assert seen == len(spans)  # every drawn "yes" became a recorded span, every "no" cost no span at all
    for span in spans:
        assert span.context is not None and span.parent is None
        assert span.context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < ids.bound
    assert len({s.context.trace_id for s in spans if s.context is not None}) == len(spans)


def test_ratio_zero_and_one() -> None:
    tracer, exporter, _ = make(0.0)
    assert serve(tracer, 200, {}) == 0 and exporter.get_finished_spans() == ()
    tracer, exporter, _ = make(1.0)
    assert serve(tracer, 50, {}) == 50 and len(exporter.get_finished_spans()) == 50


def test_a_callers_traceparent_decides_whatever_the_ratio() -> None:
    tracer, exporter, _ = make(0.0)
    assert serve(tracer, 20, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}) == 20
    spans = exporter.get_finished_spans()
    assert len(spans) == 20 and all(format(s.context.trace_id, "032x") == TRACE_ID for s in spans if s.context)
    tracer, exporter, _ = make(1.0)
    assert serve(tracer, 20, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}) == 0
    assert exporter.get_finished_spans() == ()


def test_other_spans_still_get_random_trace_ids() -> None:
    ids = RootSampler(1.0)
    first, second = ids.generate_trace_id(), ids.generate_trace_id()
    assert first != second and first != 0
    random.seed(3)
    assert ids.draw()
    drawn = ids._drawn.trace_id
    assert ids.generate_trace_id() == drawn and ids.generate_trace_id() != drawn  # handed out once


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, None),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, 0.25),
        ({"OTEL_TRACES_SAMPLER": " ParentBased_TraceIdRatio ", "OTEL_TRACES_SAMPLER_ARG": "0.01"}, 0.01),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, 1.0),
    ],
    ids=["unset", "always-on", "ratio", "parent-based-ratio", "unreadable-arg"],
)
def test_root_ratio_reads_the_sdk_variables(environ: dict[str, str], expected: float | None) -> None:
    assert root_ratio(environ) == expected


def test_from_environment_installs_the_root_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    tracer = Tracer.from_environment(False)
    try:
        assert tracer.enabled and isinstance(tracer._root_sampler, RootSampler)
        assert tracer._root_sampler.bound == TraceIdRatioBased.get_bound_for_rate(0.01)
    finally:
        tracer.shutdown()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_on")
    tracer = Tracer.from_environment(False)
    try:
        assert tracer.enabled and tracer._root_sampler is None
    finally:
        tracer.shutdown()


def test_unsampled_requests_share_one_inert_trace() -> None:
    """What the HTTP edge does (start, then the batcher's ran and record_batch, then finish) on requests the
    ratio passes over, or whose caller did not sample: one shared object, nothing written, no span."""
    tracer, exporter, _ = make(0.0)
    first = tracer.start("http", "m", "1", {})
    unsampled_parent = tracer.start("http", "m", "1", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert first is unsampled_parent and not first.sampled
    first.ran(1, (2, 3, 4, 5), 4)
    tracer.record_batch([first, unsampled_parent], (2, 3, 4, 5), 4)
    first.finish()
    assert first.times is None and first.batch_size == 0 and exporter.get_finished_spans() == ()
