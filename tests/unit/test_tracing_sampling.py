"""server.tracing.sampling: root requests sampled ahead of the SDK at the configured ratio, with the SDK agreeing
on every id it is handed; requests with a traceparent still follow the caller's flag."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBasedTraceIdRatio, TraceIdRatioBased

from server.errors import InvalidInput
from server.tracing import CURRENT, Tracer
from server.tracing.sampling import RootSampler, standard_sampler

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
    tracer.flush()
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
    drawn = ids.draw()
    assert drawn is not None
    ids.hand_over(drawn)  # on the span writer's thread, before it starts the request's span
    assert ids.generate_trace_id() == drawn and ids.generate_trace_id() != drawn  # handed out once


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, (1.0, True)),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, (1.0, False)),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, (0.0, True)),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}, (0.25, False)),
        ({"OTEL_TRACES_SAMPLER": " ParentBased_TraceIdRatio ", "OTEL_TRACES_SAMPLER_ARG": "0.01"}, (0.01, True)),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, (1.0, True)),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, None),
    ],
    ids=["unset", "always-on", "parent-based-off", "ratio", "parent-based-ratio", "unreadable-arg", "other"],
)
def test_standard_sampler_reads_the_sdk_variables(environ: dict[str, str], expected: tuple[float, bool] | None) -> None:
    assert standard_sampler(environ) == expected


def test_a_ratio_outside_zero_to_one_is_refused() -> None:
    with pytest.raises(ValueError, match=r"OTEL_TRACES_SAMPLER_ARG=1\.5"):
        standard_sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"})


def test_from_environment_samples_the_standard_samplers_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.01")
    tracer = Tracer.from_environment(False)
    try:
        assert tracer.enabled and isinstance(tracer._root_sampler, RootSampler)
        assert tracer.control.policy.bound == TraceIdRatioBased.get_bound_for_rate(0.01)
        assert tracer.control.settings()["trace_rate"] == "100"
    finally:
        tracer.shutdown()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "jaeger_remote")  # not one of the six: the SDK decides alone
    tracer = Tracer.from_environment(False)
    try:
        assert tracer.enabled and tracer._root_sampler is None
        with pytest.raises(InvalidInput, match="trace_rate: OTEL_TRACES_SAMPLER names a sampler"):
            tracer.control.update(None, {"trace_rate": "10"})
        tracer.control.update(None, {"trace_level": ["OFF"]})  # the level still applies
        assert tracer.start("http", "m", "1", {}) is tracer._untraced
    finally:
        tracer.shutdown()


def test_a_callers_trace_id_decides_under_traceidratio() -> None:
    """Not parent-based: a request with a traceparent is sampled by the ratio rule on the caller's trace id,
    whatever the caller's flag, as the SDK's TraceIdRatioBased would."""
    ids = RootSampler(0.5)
    provider = TracerProvider(sampler=ALWAYS_ON, id_generator=ids)
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider, parent_based=False)
    low, high = "0" * 31 + "1", "f" * 32  # low 64 bits far under and far over half the id space
    assert serve(tracer, 3, {"traceparent": f"00-{low}-{PARENT_ID}-00"}) == 3
    assert serve(tracer, 3, {"traceparent": f"00-{high}-{PARENT_ID}-01"}) == 0
    assert {format(s.context.trace_id, "032x") for s in exporter.get_finished_spans() if s.context} == {low}


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
