"""OpenTelemetry request tracing (server/tracing/) through the real batcher, into the SDK's in-memory
exporter: the phases in order, their attributes, the caller's traceparent as parent, and batch links."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("opentelemetry.sdk")


from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from server.models.batching import Batcher, Tensors
from server.models.stats import ModelStats
from server.tracing import COMPUTE_EVENTS, CURRENT, REQUEST_EVENTS, Tracer, wanted

pytestmark = pytest.mark.unit

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def make_tracer() -> tuple[Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracer(provider), exporter


async def traced_call(tracer: Tracer, batcher: Batcher, value: float, headers: dict[str, str]) -> Tensors:
    """What an edge does: open the span, queue under it, close it after the reply."""
    with tracer.request("http", "m", "", headers):
        return await batcher.submit({"x": np.full((1, 2), value, np.float32)}, 1, ("x",))


def run_batch(tracer: Tracer, count: int, headers: dict[str, str]) -> None:
    gate = threading.Event()

    def runner(inputs: Tensors) -> Tensors:
        gate.wait(5)
        return {"y": inputs["x"] * 2}

    batcher = Batcher("m", [runner], max_batch_size=8, max_queue_size=0, stats=ModelStats())
    batcher.start()

    async def main() -> None:
        calls = [asyncio.ensure_future(traced_call(tracer, batcher, float(i), headers)) for i in range(count)]
        await asyncio.sleep(0.05)  # all queued (the first may be running alone, blocked on the gate)
        gate.set()
        results = await asyncio.gather(*calls)
        assert [float(r["y"][0, 0]) for r in results] == [2.0 * i for i in range(count)]

    try:
        asyncio.run(main())
    finally:
        batcher.close(1)
    tracer.flush()  # the spans are made off the request path; make them now


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_request_span_has_the_phases_in_order_and_the_callers_parent() -> None:
    tracer, exporter = make_tracer()
    run_batch(tracer, 1, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
    spans = exporter.get_finished_spans()
    (request,) = by_name(spans, "infer m")
    assert request.context is not None and request.parent is not None
    assert format(request.context.trace_id, "032x") == TRACE_ID
    assert format(request.parent.span_id, "016x") == PARENT_ID
    attributes = dict(request.attributes or {})
    assert attributes["model.name"] == "m" and attributes["rpc.system"] == "http"
    assert attributes["batch.size"] == 1 and str(attributes["instance"]).startswith("m-worker-")
    # Triton's layout: the request span's events, and a ``compute`` child holding the compute phases.
    assert [e.name for e in request.events] == list(REQUEST_EVENTS)
    (compute,) = by_name(spans, "compute")
    assert compute.parent is not None and compute.parent.span_id == request.context.span_id
    assert [e.name for e in compute.events] == list(COMPUTE_EVENTS)
    assert compute.start_time == compute.events[0].timestamp and compute.end_time == compute.events[-1].timestamp
    times = [request.events[0].timestamp, request.events[1].timestamp]
    times += [e.timestamp for e in compute.events] + [request.events[2].timestamp]
    assert times == sorted(times)  # received, queued, compute start .. end, response sent
    assert request.start_time == times[0] and request.end_time == times[-1]


def test_a_batch_links_every_request_it_served() -> None:
    tracer, exporter = make_tracer()
    run_batch(tracer, 4, {})
    spans = exporter.get_finished_spans()
    requests = by_name(spans, "infer m")
    assert len(requests) == 4
    batches = by_name(spans, "batch")
    linked = {link.context.span_id for b in batches for link in b.links}
    assert linked == {r.context.span_id for r in requests if r.context is not None}
    assert sum(int((b.attributes or {})["batch.requests"]) for b in batches) == 4
    assert any(int((b.attributes or {})["batch.size"]) > 1 for b in batches)  # the queued ones ran together
    for request in requests:  # each request says how large its batch was
        assert int((request.attributes or {})["batch.size"]) >= 1


def test_unsampled_requests_record_nothing() -> None:
    tracer, exporter = make_tracer()
    run_batch(tracer, 2, {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})  # the caller did not sample
    assert exporter.get_finished_spans() == ()


def test_off_by_default_and_without_importing_opentelemetry() -> None:
    assert not wanted(False, {}) and not wanted(False, {"OTEL_TRACES_EXPORTER": "none"})
    assert wanted(True, {}) and wanted(False, {"OTEL_TRACES_EXPORTER": "otlp"})
    code = (
        "import sys, os; os.environ.pop('OTEL_TRACES_EXPORTER', None)\n"
        "from server.tracing import Tracer; import server.app\n"
        "t = Tracer.from_environment(False); assert not t.enabled\n"
        "assert not [m for m in sys.modules if m.startswith(('opentelemetry.sdk', 'opentelemetry.exporter'))]\n"
    )  # (FastAPI itself imports opentelemetry's API package when it is installed; the SDK stays out)
    subprocess.run([sys.executable, "-c", code], check=True)


def test_request_context_sets_current_and_records_the_error() -> None:
    tracer, exporter = make_tracer()
    with pytest.raises(ValueError), tracer.request("grpc", "m", "1", {}) as trace:
        assert CURRENT.get() is trace
        raise ValueError("bad input")
    assert CURRENT.get() is None
    assert exporter.get_finished_spans() == ()  # nothing is made on the request's own thread ...
    tracer.flush()  # ... but by the span writer
    (span,) = exporter.get_finished_spans()
    assert span.name == "infer m" and span.status.status_code is StatusCode.ERROR
    assert span.status.description == "ValueError: bad input"
    assert [e.name for e in span.events] == ["REQUEST_START", "REQUEST_END"]
