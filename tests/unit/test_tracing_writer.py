"""server.tracing.writer: spans are made off the request path, by the writer's own thread, in order, with a batch
waiting for the requests it links; nothing queued is lost at close."""

from __future__ import annotations

import threading
import time

import pytest

from server.tracing.writer import MAX_WAITS, SpanWriter

pytestmark = pytest.mark.unit


class Item:
    """A record that is ready once ``ready`` is set (or forced); remembers the thread that wrote it."""

    def __init__(self, ready: bool = True) -> None:
        self.ready = ready
        self.tries = 0
        self.written_by: str | None = None

    def write(self, force: bool) -> bool:
        self.tries += 1
        if not (self.ready or force):
            return False
        self.written_by = threading.current_thread().name
        return True


def test_the_writers_thread_writes_on_its_own() -> None:
    writer = SpanWriter(period_s=0.01)
    item = Item()
    writer.put(item)
    deadline = time.monotonic() + 5
    while item.written_by is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert item.written_by == "optiserve-span-writer"
    writer.close()


def test_a_record_that_waits_is_retried_then_forced_and_close_writes_the_rest() -> None:
    writer = SpanWriter(period_s=3600)  # only flushes write here
    waiting, later = Item(ready=False), Item()
    writer.put(waiting)
    writer.flush()
    assert waiting.written_by is None and waiting.tries == 2  # tried when taken, again after the rest
    writer.put(later)
    writer.flush()
    assert later.written_by is not None and waiting.written_by is None
    for _ in range(MAX_WAITS):
        writer.flush()
    assert waiting.written_by is not None  # waited its fill: written anyway
    stuck = Item(ready=False)
    writer.put(stuck)
    writer.close()
    assert stuck.written_by is not None  # close forces whatever is left


def test_unsampled_and_sampled_requests_leave_the_request_path_without_sdk_spans() -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from server.tracing import Tracer

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = Tracer(provider)
    trace = tracer.start("http", "m", "1", {})
    trace.ran(1, (2, 3, 4, 5), 1)
    tracer.record_batch([trace], (2, 3, 4, 5), 1)
    trace.finish()
    assert exporter.get_finished_spans() == ()  # queued, not made
    tracer.shutdown()  # writes what is queued before the exporter stops
    assert sorted(s.name for s in exporter.get_finished_spans()) == ["batch", "compute", "infer m"]


def test_a_dead_export_process_drops_spans_without_failing_the_server(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from server.tracing.export_process import ExportProcess

    export = ExportProcess()
    export._proc.kill()
    export._proc.wait()
    export._lines.append(b'{"kind": "batch", "requests": [], "start_ns": 1, "end_ns": 2, "attributes": {}}\n')
    export.send()  # the pipe is broken: logged, not raised
    export.send()
    export.close()
    assert len([r for r in caplog.records if "export process is gone" in r.message]) == 1
