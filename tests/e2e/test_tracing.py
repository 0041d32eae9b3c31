"""The real server traces inference over OTLP/HTTP (OTEL_* environment variables) to a tiny receiver run here:
the request span joins the caller's trace (``traceparent``) and carries the phases, the batch size and the
instance; the batch span links it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.proto")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.models import fixtures

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Receiver(ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.spans: list[Any] = []
        self.services: list[str] = []


class Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.path == "/v1/traces":
            message = ExportTraceServiceRequest.FromString(body)
            for resource_spans in message.resource_spans:
                attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                self.server.services.append(attributes.get("service.name", ""))
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend(scope_spans.spans)
        self.send_response(200 if self.path == "/v1/traces" else 404)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def test_spans_reach_an_otlp_receiver_under_the_callers_trace(
    tmp_path: Path, start_server: Any, receiver: Receiver
) -> None:
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp())
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",  # turns tracing on without --tracing
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
        "OTEL_SERVICE_NAME": "optiserve-e2e",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    server = start_server(tmp_path, env=env)
    body = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}]}
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    reply = httpx.post(f"{server.http_url}/v2/models/mlp/infer", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(s.name == "batch" for s in receiver.spans):
        time.sleep(0.05)
    names = {s.name for s in receiver.spans}
    assert {"infer mlp", "queue", "compute input", "compute infer", "compute output", "batch"} <= names, names
    assert "optiserve-e2e" in receiver.services
    (request,) = [s for s in receiver.spans if s.name == "infer mlp"]
    assert request.trace_id.hex() == TRACE_ID and request.parent_span_id.hex() == PARENT_ID
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["model.name"].string_value == "mlp"
    assert attributes["batch.size"].int_value == 2
    assert attributes["instance"].string_value.startswith("mlp:1-worker-")
    events = [e.name for e in request.events]
    assert events[0] == "REQUEST_START" and events[-1] == "REQUEST_END" and "COMPUTE_START" in events
    for span in receiver.spans:
        assert span.trace_id.hex() == TRACE_ID  # every span joined the caller's trace
    (batch,) = [s for s in receiver.spans if s.name == "batch"]
    assert [link.span_id for link in batch.links] == [request.span_id]
