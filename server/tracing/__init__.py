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
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.tracing.control import TRACE_ID_SPACE, TraceControl

log = logging.getLogger("optiserve.tracing")

CURRENT: contextvars.ContextVar[RequestTrace | None] = contextvars.ContextVar("optiserve_trace", default=None)
"""The trace of the request the current task serves; set by the edge, read by the batcher when it queues."""

EXPORTERS = ("otlp", "console")


def wanted(flag: bool, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether tracing is on: ``--tracing``, or OTEL_TRACES_EXPORTER set to anything but ``none``."""
    return flag or environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() not in ("", "none")


class Tracer:
    """The server's tracer: built once by the composition root, handed to both edges."""

    def __init__(self, provider: Any = None, control: TraceControl | None = None, *, parent_based: bool = True) -> None:
        """``provider``: an OpenTelemetry SDK TracerProvider, or None for tracing off. When its id generator is a
        :class:`server.tracing.sampling.RootSampler`, this tracer samples every request before any span is made
        (``parent_based``: a caller's ``traceparent`` flag decides for its request), at the ratios ``control``
        (Triton's trace settings) holds; otherwise the provider's sampler decides and ``control`` only turns
        tracing off or counts."""
        self.enabled = provider is not None
        self._provider = provider
        self._tracer: Any = None
        self._propagator: Any = None
        self._root_sampler: Any = None
        self._parent_based = parent_based
        self._span_context_of: Any = None
        # Every unsampled request shares this one (it has no span and nothing is written to it): no allocation.
        self._untraced = RequestTrace(self, None, sampled=False)
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
    def from_environment(cls, flag: bool) -> Tracer:
        """Tracing as the flag and the standard OTEL_* environment variables say."""
        if not wanted(flag):
            return cls()
        exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
        if exporter_name not in EXPORTERS:
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter_name!r}: optiserve supports {', '.join(EXPORTERS)}")
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
            from opentelemetry.sdk.trace.sampling import ALWAYS_ON
        except ImportError as exc:
            raise RuntimeError("tracing needs the OpenTelemetry packages: pip install 'optiserve[tracing]'") from exc
        exporter: SpanExporter
        if exporter_name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, _HEADERS, _TIMEOUT
        else:
            exporter = ConsoleSpanExporter()
        from server.tracing.sampling import RootSampler, standard_sampler

        service = os.environ.get("OTEL_SERVICE_NAME") or "optiserve"
        resource = Resource.create({"service.name": service})
        standard = standard_sampler()
        if standard is None:  # another sampler (jaeger_remote, say): the SDK reads OTEL_TRACES_SAMPLER and decides
            provider = TracerProvider(resource=resource)
            parent_based = True
        else:  # this tracer samples (see sampling.py); the SDK records whatever it is handed
            ratio, parent_based = standard
            provider = TracerProvider(resource=resource, sampler=ALWAYS_ON, id_generator=RootSampler(ratio))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: exporter=%s service=%s", exporter_name, service)
        return cls(provider, parent_based=parent_based)

    def start(self, protocol: str, model: str, version: str, headers: Mapping[str, str]) -> RequestTrace:
        """Open a request's span at its arrival, under the caller's ``traceparent`` when there is one. A root
        request the ratio sampler passes over gets the shared inert trace without asking the SDK."""
        policy = self.control.policy_for(model)
        if not policy.on:
            return self._untraced
        if "traceparent" in headers:
            parent = self._propagator.extract(headers)
            if self._root_sampler is not None and not self._follows(parent, policy.bound):
                return self._untraced
        else:
            parent = None
            if self._root_sampler is not None and not self._root_sampler.draw(policy.bound):
                return self._untraced
        now = time.time_ns()
        span = self._tracer.start_span(
            f"infer {model}",
            context=parent,
            kind=self._server_kind,
            start_time=now,
            attributes={"rpc.system": protocol, "model.name": model, "model.version": version},
        )
        if not span.is_recording() or not policy.countdown.take():
            return self._untraced  # an unended span is never exported
        span.add_event("REQUEST_START", timestamp=now)
        return RequestTrace(self, span)

    def _follows(self, parent: Any, bound: int) -> bool:
        """Whether a request sent with a ``traceparent`` (extracted as ``parent``) is sampled."""
        caller = self._span_context_of(parent)
        if not caller.is_valid:  # an unreadable traceparent: a root request
            return bool(self._root_sampler.draw(bound))
        if self._parent_based:
            return bool(caller.trace_flags.sampled)
        return bool(caller.trace_id & (TRACE_ID_SPACE - 1) < bound)

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

    def record_batch(self, traces: Sequence[RequestTrace], times: tuple[int, int, int, int], samples: int) -> None:
        """Worker thread, after a batch ran: a ``batch`` span linking the traced requests it served."""
        # Not is_recording(): the loop may already have ended a request's span (the answers are out by now).
        sampled = [t.span for t in traces if t.sampled]
        if not sampled:
            return
        from opentelemetry import trace as otel

        start, _, _, finished = times
        attributes = {"batch.size": samples, "batch.requests": len(traces), "instance": threading.current_thread().name}
        span = self._tracer.start_span(
            "batch",
            context=otel.set_span_in_context(sampled[0]),
            links=[otel.Link(s.get_span_context()) for s in sampled],
            start_time=self.wall_ns(start),
            attributes=attributes,
        )
        span.end(end_time=self.wall_ns(finished))

    def shutdown(self) -> None:
        """Flush and stop the exporter (at exit)."""
        if self._provider is not None:
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
    """One request's span, and the phase times the batcher leaves for it."""

    tracer: Tracer
    span: Any
    times: tuple[int, int, int, int, int] | None = None
    """monotonic ns: queued, compute start, input end (= infer start), infer end, compute end."""
    batch_size: int = 0
    instance: str = ""
    sampled: bool = True
    """False for the tracer's one shared stand-in for unsampled requests: every method then returns at once."""

    def ran(self, queued_ns: int, times: tuple[int, int, int, int], batch_size: int) -> None:
        """Worker thread: the request ran in a batch of ``batch_size`` samples at these times."""
        if not self.sampled:
            return
        self.times = (queued_ns, *times)
        self.batch_size = batch_size
        self.instance = threading.current_thread().name

    def finish(self, error: BaseException | None = None) -> None:
        """The response is out (or the request failed): write the phases and close the span."""
        if not self.sampled:
            return
        span = self.span
        end = time.time_ns()
        if span.is_recording():
            if self.times is not None:
                queued, *compute = (self.tracer.wall_ns(t) for t in self.times)
                span.add_event("QUEUE_START", timestamp=queued)
                from opentelemetry import trace as otel

                child = self.tracer._tracer.start_span(
                    "compute", context=otel.set_span_in_context(span), start_time=compute[0]
                )
                for name, at in zip(COMPUTE_EVENTS, compute, strict=True):
                    child.add_event(name, timestamp=at)
                child.end(end_time=compute[-1])
                span.set_attributes({"batch.size": self.batch_size, "instance": self.instance})
            if error is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
            span.add_event("REQUEST_END", timestamp=end)
        span.end(end_time=end)
