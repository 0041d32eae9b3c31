"""The real server traces inference over OTLP/HTTP (OTEL_* environment variables) to a tiny receiver run here:
the request span joins the caller's trace (``traceparent`` in HTTP headers or gRPC metadata, unary or streaming)
and carries the phases, the batch size and the instance; the batch span links it."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

pytest.importorskip("opentelemetry.proto")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from server.tracing import COMPUTE_EVENTS, REQUEST_EVENTS
from tests.conftest import ServerProcess
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


def tracing_env(receiver: Receiver) -> dict[str, str]:
    """The standard OTEL_* variables pointing the server at ``receiver``, exporting quickly."""
    return {
        "OTEL_TRACES_EXPORTER": "otlp",  # turns tracing on without --tracing
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
        "OTEL_SERVICE_NAME": "optiserve-e2e",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }


@pytest.fixture
def traced_server(tmp_path: Path, start_server: Any, receiver: Receiver) -> ServerProcess:
    fixtures.write_model(tmp_path, "mlp", fixtures.float_mlp())
    server: ServerProcess = start_server(tmp_path, env=tracing_env(receiver))
    return server


def wait_for(receiver: Receiver, done: Callable[[list[Any]], bool]) -> list[Any]:
    """The spans received once ``done`` says they are all there (or after 20 s, for the asserts to explain)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not done(list(receiver.spans)):
        time.sleep(0.05)
    return list(receiver.spans)


def in_trace(spans: list[Any], trace_id: str) -> list[Any]:
    return [s for s in spans if s.trace_id.hex() == trace_id]


def assert_request_span(spans: list[Any], request: Any, protocol: str, samples: int) -> None:
    """``request`` carries its attributes and Triton's events, and its ``compute`` child the compute phases."""
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["model.name"].string_value == "mlp"
    assert attributes["rpc.system"].string_value == protocol
    assert attributes["batch.size"].int_value >= samples
    assert attributes["instance"].string_value.startswith("mlp:1-worker-")
    assert [e.name for e in request.events] == list(REQUEST_EVENTS)
    children = [s for s in spans if s.parent_span_id == request.span_id and s.name != "batch"]
    assert [c.name for c in children] == ["compute"]
    (compute,) = children
    assert [e.name for e in compute.events] == list(COMPUTE_EVENTS)
    times = [e.time_unix_nano for e in (request.events[0], request.events[1], *compute.events, request.events[2])]
    assert times == sorted(times)  # received, queued, compute start .. end, response sent


def test_spans_reach_an_otlp_receiver_under_the_callers_trace(traced_server: ServerProcess, receiver: Receiver) -> None:
    body = {"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [0.5] * 16}]}
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
    reply = httpx.post(f"{traced_server.http_url}/v2/models/mlp/infer", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    spans = wait_for(receiver, lambda spans: any(s.name == "batch" for s in spans))
    names = {s.name for s in spans}
    assert {"infer mlp", "compute", "batch"} <= names, names
    assert "optiserve-e2e" in receiver.services
    (request,) = [s for s in spans if s.name == "infer mlp"]
    assert request.trace_id.hex() == TRACE_ID and request.parent_span_id.hex() == PARENT_ID
    assert_request_span(spans, request, "http", 2)
    assert {a.key: a.value for a in request.attributes}["batch.size"].int_value == 2
    for span in spans:
        assert span.trace_id.hex() == TRACE_ID  # every span joined the caller's trace
    (batch,) = [s for s in spans if s.name == "batch"]
    assert [link.span_id for link in batch.links] == [request.span_id]


GRPC_TRACE = "0af7651916cd43dd8448eb211c80319c"
GRPC_PARENT = "b7ad6b7169203331"
STREAM_TRACE = "5b8efff798038103d269b633813fc60c"
STREAM_PARENT = "eee19b7ec3c1b174"


def test_grpc_metadata_traceparent_unary_and_streaming(traced_server: ServerProcess, receiver: Receiver) -> None:
    """tritonclient.grpc sends ``traceparent`` as call metadata: ModelInfer's span is its child, and so is the
    span of every request of a ModelStreamInfer stream (each request its own span, phases and batch link)."""
    client = grpcclient.InferenceServerClient(traced_server.grpc_address)
    x = np.full((1, 8), 0.25, np.float32)
    tensor = grpcclient.InferInput("x", [1, 8], "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer("mlp", [tensor], headers={"traceparent": f"00-{GRPC_TRACE}-{GRPC_PARENT}-01"})
    assert result.as_numpy("y") is not None

    replies: queue.Queue[Any] = queue.Queue()
    client.start_stream(
        lambda result, error: replies.put(error or result),
        headers={"traceparent": f"00-{STREAM_TRACE}-{STREAM_PARENT}-01"},
    )
    for i in range(3):
        client.async_stream_infer("mlp", [tensor], request_id=f"s{i}")
    answers = [replies.get(timeout=30) for _ in range(3)]
    client.stop_stream()
    client.close()
    assert sorted(a.get_response().id for a in answers) == ["s0", "s1", "s2"]  # no errors among them

    def complete(spans: list[Any]) -> bool:
        unary = [s for s in in_trace(spans, GRPC_TRACE) if s.name == "infer mlp"]
        streamed = [s for s in in_trace(spans, STREAM_TRACE) if s.name == "infer mlp"]
        linked = {link.span_id for s in spans if s.name == "batch" for link in s.links}
        return len(unary) == 1 and len(streamed) == 3 and {s.span_id for s in unary + streamed} <= linked

    spans = wait_for(receiver, complete)
    (unary,) = [s for s in in_trace(spans, GRPC_TRACE) if s.name == "infer mlp"]
    assert unary.parent_span_id.hex() == GRPC_PARENT
    assert_request_span(spans, unary, "grpc", 1)
    streamed = [s for s in in_trace(spans, STREAM_TRACE) if s.name == "infer mlp"]
    assert len(streamed) == 3 and len({s.span_id for s in streamed}) == 3
    for request in streamed:
        assert request.parent_span_id.hex() == STREAM_PARENT
        assert_request_span(spans, request, "grpc", 1)
    linked = {link.span_id for s in spans if s.name == "batch" for link in s.links}
    assert {s.span_id for s in [unary, *streamed]} <= linked


OFF_TRACE = "6e0c63257de34c926f9efcd03919bb85"
BACK_TRACE = "1f1e2d3c4b5a69788796a5b4c3d2e1f0"


def traced_infer(url: str, trace_id: str) -> None:
    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [0.5] * 8}]}
    headers = {"traceparent": f"00-{trace_id}-{PARENT_ID}-01"}
    reply = httpx.post(f"{url}/v2/models/mlp/infer", json=body, headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text


def test_trace_settings_change_tracing_while_serving(traced_server: ServerProcess, receiver: Receiver) -> None:
    """Triton's trace extension through tritonclient, HTTP and gRPC: a model's trace_level OFF stops its spans
    (even for a caller that sampled), clearing it brings them back, and trace_count counts down to none."""
    import tritonclient.http as httpclient

    http = httpclient.InferenceServerClient(traced_server.http_address)
    grpc = grpcclient.InferenceServerClient(traced_server.grpc_address)
    started = http.get_trace_settings()
    assert started["trace_level"] == ["TIMESTAMPS"] and started["trace_rate"] == "1"
    assert started["trace_count"] == "-1" and started["trace_mode"] == "opentelemetry"

    off = http.update_trace_settings(model_name="mlp", settings={"trace_level": ["OFF"]})
    assert off["trace_level"] == ["OFF"] and off["trace_rate"] == "1"
    assert http.get_trace_settings()["trace_level"] == ["TIMESTAMPS"]  # the global setting is untouched
    for _ in range(3):
        traced_infer(traced_server.http_url, OFF_TRACE)

    cleared = grpc.update_trace_settings(model_name="mlp", settings={"trace_level": None}, as_json=True)
    assert cleared["settings"]["trace_level"]["value"] == ["TIMESTAMPS"]
    traced_infer(traced_server.http_url, BACK_TRACE)
    spans = wait_for(receiver, lambda spans: any(s.name == "infer mlp" for s in in_trace(spans, BACK_TRACE)))
    assert [s.name for s in in_trace(spans, BACK_TRACE) if s.name == "infer mlp"] == ["infer mlp"]
    assert in_trace(spans, OFF_TRACE) == []  # exported in order: those requests would have come first

    counted = grpc.update_trace_settings(settings={"trace_count": "1"}, as_json=True)
    assert counted["settings"]["trace_count"]["value"] == ["1"]
    before = len([s for s in receiver.spans if s.name == "infer mlp"])
    for _ in range(3):
        traced_infer(traced_server.http_url, TRACE_ID)
    assert http.get_trace_settings(model_name="mlp")["trace_count"] == "0"
    spans = wait_for(receiver, lambda spans: len([s for s in spans if s.name == "infer mlp"]) > before)
    time.sleep(0.3)  # a few export intervals: nothing more is coming
    assert len([s for s in receiver.spans if s.name == "infer mlp"]) == before + 1
    http.close()
    grpc.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "named"),
    [
        ("/v2/trace/setting", {"trace_level": ["TENSORS"]}, 400, "trace_level"),
        ("/v2/trace/setting", {"trace_rate": "often"}, 400, "trace_rate"),
        ("/v2/trace/setting", {"trace_rate": None}, 400, "trace_rate"),
        ("/v2/trace/setting", {"trace_file": "/tmp/t.json"}, 400, "trace_file"),
        ("/v2/trace/setting", {"sample": "1"}, 400, "sample"),
        ("/v2/models/nope/trace/setting", {"trace_rate": "2"}, 404, "nope"),
    ],
    ids=["tensors-level", "rate-not-a-number", "clear-global", "file-mode", "unknown-key", "unknown-model"],
)
def test_bad_trace_settings_are_refused_and_change_nothing(
    traced_server: ServerProcess, path: str, body: dict[str, Any], status: int, named: str
) -> None:
    reply = httpx.post(f"{traced_server.http_url}{path}", json=body, timeout=10)
    assert reply.status_code == status and named in reply.json()["error"], reply.text
    assert httpx.get(f"{traced_server.http_url}/v2/trace/setting", timeout=10).json()["trace_rate"] == "1"


def test_trace_settings_over_grpc_name_the_bad_field(traced_server: ServerProcess) -> None:
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(traced_server.grpc_address)
    with pytest.raises(InferenceServerException, match="trace_count") as caught:
        client.update_trace_settings(settings={"trace_count": "-5"})
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    with pytest.raises(InferenceServerException, match="'nope'") as caught:
        client.get_trace_settings(model_name="nope")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
    assert client.update_trace_settings(settings={"trace_rate": "100"}).settings["trace_rate"].value == ["100"]
    client.close()


def test_trace_settings_when_tracing_is_off(server: ServerProcess) -> None:
    """The default server has no tracer: the settings say OFF, and turning tracing on at run time says how."""
    shown = httpx.get(f"{server.http_url}/v2/trace/setting", timeout=10).json()
    assert shown["trace_level"] == ["OFF"]
    reply = httpx.post(f"{server.http_url}/v2/trace/setting", json={"trace_level": ["TIMESTAMPS"]}, timeout=10)
    assert reply.status_code == 400 and "--tracing" in reply.json()["error"]
