"""OpenTelemetry request tracing (README, "Metrics and logs"), off by default.

On when ``--tracing`` is given or ``OTEL_TRACES_EXPORTER`` names an exporter (``otlp``, the default with
``--tracing``, or ``console``); everything else is configured the OpenTelemetry way: OTEL_EXPORTER_OTLP_ENDPOINT
(OTLP over HTTP/protobuf), OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG, OTEL_SERVICE_NAME (default
``optiserve``), OTEL_BSP_*. The ``opentelemetry`` packages (the ``tracing`` extra) are imported only then: with
tracing off, the edges test one boolean and nothing else runs.

Each inference request gets one SERVER span (``infer <model>``), a child of the caller's W3C ``traceparent``
when it sent one, laid out as Triton's own OpenTelemetry traces are: the request span holds the events
REQUEST_START, QUEUE_START and REQUEST_END, and its child span ``compute`` runs from COMPUTE_START to
COMPUTE_END with the events COMPUTE_START, COMPUTE_INPUT_END, COMPUTE_OUTPUT_START and COMPUTE_END. So the queue
is the gap before ``compute``, and compute input, infer and output lie between its events. The phase times are
the ones the batcher already takes for the statistics. A ``batch`` span (a child of the first traced request it
served) links every traced request of the batch and carries the batch size and the instance that ran it.

Why events and not a span per phase: the SDK spends ~20 us of CPU to make a span and as much again to export
it, and a traced request used to cost six spans; at a 1% sample ratio those spans were most of tracing's cost
(BENCHMARKS.md §11, "What request tracing costs"). Three spans per traced request keep every phase's times.
The spans are not made on the request's threads: a sampled request keeps plain values, and the span writer
(server/tracing/writer.py) hands them, many at a time, to the export process (export_process.py), which makes the
spans with their original timestamps and exports them. A tracer built around an SDK provider without one (the
unit tests) makes the spans on the writer's thread instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from server.tracing.control import TRACE_ID_SPACE, TraceControl
from server.tracing.writer import SpanWriter

if TYPE_CHECKING:
    from server.tracing.export_process import ExportProcess

log = logging.getLogger("optiserve.tracing")

CURRENT: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("optiserve_trace", default=None)
"""The trace of the request the current task serves; set by the edge, read by the batcher when it queues."""

EXPORTERS = ("otlp", "console")


def wanted(flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: ``--tracing``, or OTEL_TRACES_EXPORTER set to anything but ``none``."""
    return flag or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() not in ("", "none")


BatchTimes = tuple[int, int, int, int]
"""A batch's (start, inputs ready, computed, outputs split) times, in monotonic nanoseconds."""


class Tracer:
    """The server's tracer: built once by the composition root, handed to both edges."""

    def __init__(
        self,
        provider: Any = None,
        control: TraceControl | None = None,
        *,
        parent_based: bool = True,
        export: ExportProcess | None = None,
    ) -> None:
        """``provider``: an OpenTelemetry SDK TracerProvider, or None for tracing off. When its id generator is a
        :class:`server.tracing.sampling.RootSampler`, this tracer samples every request before any span is made
        (``parent_based``: a caller's ``traceparent`` flag decides for its request), at the ratios ``control``
        (Triton's trace settings) holds; otherwise the provider's sampler decides and ``control`` only turns
        tracing off or counts. ``export``: the helper process that makes and exports the spans (the server's
        case, export_process.py); without it they are made here, on the span writer's thread."""
        self.enabled = provider is not None
        self._provider = provider
        self._tracer: Any = None
        self._propagator: Any = None
        self._root_sampler: Any = None
        self._parent_based = parent_based
        self._span_context_of: Any = None
        # Every unsampled request shares this one (it has no span and nothing is written to it): no allocation.
        self._untraced = RequestTrace(self, sampled=False)
        self._export = export
        self.writer = SpanWriter(on_round=export.send if export is not None else None)
        self._server_kind: Any = None
        # Phase times come from time.monotonic_ns() (the statistics' clock); spans need wall-clock times.
        self._offset_ns = time.time_ns() - time.monotonic_ns()
        if provider is not None:
            from opentelemetry import trace as otel
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            from server.tracing.sampling import RootSampler

            self._tracer = provider.get_tracer("optiserve")
            self._propagator = TraceContextTextMapPropagator()
            self._server_kind = otel.SpanKind.SERVER
            self._span_context_of = lambda context: otel.get_current_span(context).get_span_context()
            ids = getattr(provider, "id_generator", None)
            self._root_sampler = ids if isinstance(ids, RootSampler) else None
        gated = self._root_sampler is not None
        self.control = control or TraceControl(
            enabled=self.enabled, ratio=self._root_sampler.ratio if gated else 1.0, rate_settable=gated
        )

    @classmethod
    def from_environment(cls, flag: bool, *, helper: bool = True) -> Tracer:
        """Tracing as the flag and the standard OTEL_* environment variables say; ``helper``: export from a
        helper process (export_process.py, which calls this with False)."""
        if not wanted(flag):
            return cls()
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
        if exporter_name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: optiserve supports {', '.join(EXPORTERS)}")
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        except ImportError as exc:
            raise RuntimeError("tracing needs the OpenTelemetry packages: pip install 'optiserve[tracing]'") from exc
        exporter_class: Any = ConsoleSpanExporter
        if exporter_name == "otlp":  # imported here too, so a missing exporter package stops the start
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter_class = OTLPSpanExporter  # OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT
        from server.tracing.sampling import RootSampler, standard_sampler

        service = os.environ.get("OTEL_SERVICE_NAME") or "optiserve"
        resource = Resource.create({"service.name": service})
        standard = standard_sampler()
        if standard is None:  # a name outside the six: the SDK reads it (warns, and samples parentbased_always_on)
            provider = TracerProvider(resource=resource)
            parent_based = True
        else:  # this tracer samples (see sampling.py); the SDK records whatever it is handed
            ratio, parent_based = standard
            provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=RootSampler(ratio))
        log.info("tracing on: exporter=%s service=%s", exporter_name, service)
        if not helper:  # the export process: it exports what it is sent
            provider.add_span_processor(BatchSpanProcessor(exporter_class()))
            return cls(provider, parent_based=parent_based)
        from server.tracing.export_process import ExportProcess

        # The server: its provider only draws ids; the export process makes, batches and exports the spans.
        return cls(provider, parent_based=parent_based, export=ExportProcess())

    def start(self, protocol: str, model: str, version: str, headers: Mapping[str, str]) -> RequestTrace:
        """Sample a request at its arrival and, when it is sampled, start recording it (its spans, under the
        caller's ``traceparent`` when there is one, are made by the span writer after it finishes). A request
        that is not sampled gets the shared inert trace without asking the SDK."""
        policy = self.control.policy_for(model)
        if not policy.on:
            return self._untraced
        trace_id: int | None = None
        carrier: dict[str, str] | None = None
        if "traceparent" in headers:
            carrier = {key: headers[key] for key in ("traceparent", "tracestate") if key in headers}
            parent = self._propagator.extract(carrier)
            if self._root_sampler is not None:
                sampled, trace_id = self._follows(parent, policy.bound)
                if not sampled:
                    return self._untraced
        else:
            parent = None
            if self._root_sampler is not None:
                trace_id = self._root_sampler.draw(policy.bound)
                if trace_id is None:
                    return self._untraced
        if not policy.countdown.take():
            return self._untraced
        attributes = {"rpc.system": protocol, "model.name": model, "model.version": version}
        name = f"infer {model}"
        return RequestTrace(self, parent=parent, carrier=carrier, trace_id=trace_id, name=name, attributes=attributes)

    def _follows(self, parent: Any, bound: int) -> tuple[bool, int | None]:
        """Whether a request sent with a ``traceparent`` (extracted as ``parent``) is sampled, and the root trace
        id drawn for it when the traceparent could not be read."""
        caller = self._span_context_of(parent)
        if not caller.is_valid:  # an unreadable traceparent: a root request
            trace_id = self._root_sampler.draw(bound)
            return trace_id is not None, trace_id
        if self._parent_based:
            return bool(caller.trace_flags.sampled), None
        return bool(caller.trace_id & (TRACE_ID_SPACE - 1) < bound), None

    def request(
        self, protocol: str, model: str, version: str, headers: Mapping[str, str]
    ) -> contextlib.AbstractContextManager[RequestTrace | None]:
        """An edge's whole request under one span: :meth:`start`, CURRENT set for the batcher while the body runs,
        then the span closed with the error that escaped, if any. For edges that do not already hold the span.
        An unsampled request gets a shared do-nothing context (``None``): it is most requests at a low ratio."""
        trace = self.start(protocol, model, version, headers)
        if not trace.sampled:
            return _UNTRACED
        return _traced(trace)

    def wall_ns(self, monotonic_ns: int) -> int:
        """A time.monotonic_ns() reading as wall-clock nanoseconds."""
        return monotonic_ns + self._offset_ns

    def record_batch(self, traces: Sequence[RequestTrace], times: BatchTimes, samples: int) -> None:
        """Worker thread, after a batch ran: a ``batch`` span linking the traced requests it served (written
        with them, by the span writer)."""
        sampled = [t for t in traces if t.sampled]
        if sampled:
            start, _, _, finished = times
            attributes = {
                "batch.size": samples,
                "batch.requests": len(traces),
                "instance": threading.current_thread().name,
            }
            self.writer.put(BatchTrace(self, sampled, self.wall_ns(start), self.wall_ns(finished), attributes))

    def flush(self) -> None:
        """Make the spans of every request finished so far now (tests; the server's writer does it on its own)."""
        self.writer.flush()

    def shutdown(self) -> None:
        """Write what is left, then flush and stop the exporter (at exit)."""
        if self._provider is not None:
            self.writer.close()
            if self._export is not None:
                self._export.close()
            self._provider.shutdown()


_UNTRACED: contextlib.nullcontext[None] = contextlib.nullcontext()


@contextlib.contextmanager
def _traced(trace: RequestTrace) -> Iterator[RequestTrace]:
    token = CURRENT.set(trace)
    error: BaseException | None = None
    try:
        yield trace
    except BaseException as exc:
        error = exc
        raise
    finally:
        CURRENT.reset(token)
        trace.finish(error)


REQUEST_EVENTS = ("REQUEST_START", "QUEUE_START", "REQUEST_END")
COMPUTE_EVENTS = ("COMPUTE_START", "COMPUTE_INPUT_END", "COMPUTE_OUTPUT_START", "COMPUTE_END")
"""The events of the request span and of its ``compute`` child, in their order (Triton's trace timestamps)."""


@dataclass(eq=False)
class RequestTrace:
    """One sampled request as plain values while it is served; its spans are made later (:meth:`write`)."""

    tracer: Tracer
    parent: Any = None
    """The caller's context (from ``traceparent``), or None for a root request."""
    carrier: dict[str, str] | None = None
    """The caller's ``traceparent`` and ``tracestate`` headers, for the export process to read again."""
    trace_id: int | None = None
    """The root trace id the sampler drew for it (None: the parent's, or the SDK's own)."""
    name: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)
    sampled: bool = True
    """False for the tracer's one shared stand-in for unsampled requests: every method then returns at once."""
    start_ns: int = field(default_factory=time.time_ns)
    times: tuple[int, int, int, int, int] | None = None
    """monotonic ns: queued, compute start, input end (= infer start), infer end, compute end."""
    batch_size: int = 0
    instance: str = ""
    end_ns: int = 0
    error: str | None = None
    span: Any = None
    """The request's SDK span once written (a batch span links it)."""
    written: bool = False
    sequence: int | None = None
    """Its number in the export process's stream (batches name their requests by it)."""

    def ran(self, queued_ns: int, times: BatchTimes, batch_size: int) -> None:
        """Worker thread: the request ran in a batch of ``batch_size`` samples at these times."""
        if not self.sampled:
            return
        self.times = (queued_ns, *times)
        self.batch_size = batch_size
        self.instance = threading.current_thread().name

    def finish(self, error: BaseException | None = None) -> None:
        """The response is out (or the request failed): hand the request to the span writer."""
        if not self.sampled:
            return
        self.end_ns = time.time_ns()
        if error is not None:
            self.error = f"{type(error).__name__}: {error}"
        self.tracer.writer.put(self)

    def write(self, force: bool) -> bool:
        """Span writer's thread: the request span with its events, and its ``compute`` child (or the request,
        queued for the export process)."""
        tracer = self.tracer
        if tracer._export is not None:
            tracer._export.request(self)
            self.written = True
            return True
        from opentelemetry import trace as otel

        if self.trace_id is not None:
            tracer._root_sampler.hand_over(self.trace_id)
        span = tracer._tracer.start_span(
            self.name,
            context=self.parent,
            kind=tracer._server_kind,
            start_time=self.start_ns,
            attributes=self.attributes,
        )
        self.written = True
        if not span.is_recording():  # a sampler of the SDK's own said no
            return True
        span.add_event("REQUEST_START", timestamp=self.start_ns)
        if self.times is not None:
            queued, *compute = (tracer.wall_ns(t) for t in self.times)
            span.add_event("QUEUE_START", timestamp=queued)
            child = tracer._tracer.start_span("compute", context=otel.set_span_in_context(span), start_time=compute[0])
            for name, at in zip(COMPUTE_EVENTS, compute, strict=True):
                child.add_event(name, timestamp=at)
            child.end(end_time=compute[-1])
            span.set_attributes({"batch.size": self.batch_size, "instance": self.instance})
        if self.error is not None:
            span.set_status(otel.Status(otel.StatusCode.ERROR, self.error))
        span.add_event("REQUEST_END", timestamp=self.end_ns)
        span.end(end_time=self.end_ns)
        self.span = span
        return True


@dataclass(eq=False)
class BatchTrace:
    """One batch that served sampled requests: its span is written once theirs are (it links them)."""

    tracer: Tracer
    requests: list[RequestTrace]
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    def write(self, force: bool) -> bool:
        """Span writer's thread: the ``batch`` span, a child of its first request, linking all of them."""
        if not force and not all(r.written for r in self.requests):
            return False
        if self.tracer._export is not None:
            self.tracer._export.batch(self)
            return True
        spans = [r.span for r in self.requests if r.span is not None]
        if not spans:
            return True
        from opentelemetry import trace as otel

        span = self.tracer._tracer.start_span(
            "batch",
            context=otel.set_span_in_context(spans[0]),
            links=[otel.Link(s.get_span_context()) for s in spans],
            start_time=self.start_ns,
            attributes=self.attributes,
        )
        span.end(end_time=self.end_ns)
        return True
