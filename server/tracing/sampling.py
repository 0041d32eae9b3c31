"""Sampling a root request before any span exists, so an unsampled request costs a random draw, not a span.

With OTEL_TRACES_SAMPLER ``traceidratio`` or ``parentbased_traceidratio`` the SDK samples a request that has no
``traceparent`` by its new trace id: sampled when ``trace_id & (2**64 - 1) < bound``. Asking the SDK costs a
few microseconds per request even when the answer is no (a span object, ids, context look-ups), which at a 1%
ratio is nearly all of tracing's cost. :class:`RootSampler` draws the trace id first and applies the same rule;
only when it says yes does the tracer start a span, and the provider's id generator (this object) hands the SDK
that very id, so the SDK's own sampler reaches the same decision and the span keeps the id that was drawn. The
sampled fraction, and which ids are sampled, are exactly the SDK's. Imported only when tracing is on.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")


def root_ratio(environ: Mapping[str, str] = os.environ) -> float | None:
    """The ratio the SDK will sample root requests at, read from OTEL_TRACES_SAMPLER[_ARG] as the SDK reads them
    (an unreadable argument means 1.0); None for every other sampler, which the SDK then decides alone."""
    if environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() not in RATIO_SAMPLERS:
        return None
    try:
        return float(environ.get("OTEL_TRACES_SAMPLER_ARG", ""))
    except ValueError:
        return 1.0


class RootSampler(RandomIdGenerator):
    """The provider's id generator, which also decides a root request's sampling ahead of the SDK (see above)."""

    def __init__(self, ratio: float) -> None:
        self.bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self._drawn = threading.local()

    def draw(self) -> bool:
        """Draw the next root trace id on this thread; True when the SDK will sample it (then start the span on
        this thread next: :meth:`generate_trace_id` hands the SDK this id)."""
        trace_id = random.getrandbits(128)
        while trace_id == trace.INVALID_TRACE_ID:
            trace_id = random.getrandbits(128)
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= self.bound:
            return False
        self._drawn.trace_id = trace_id
        return True

    def generate_trace_id(self) -> int:
        """The id :meth:`draw` kept for this thread's next root span, else a fresh random one."""
        trace_id: int | None = getattr(self._drawn, "trace_id", None)
        if trace_id is None:
            return super().generate_trace_id()
        self._drawn.trace_id = None
        return trace_id
