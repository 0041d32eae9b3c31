"""Sampling a request before any span exists, so an unsampled request costs a random draw, not a span.

The six standard OTEL_TRACES_SAMPLER values (always_on/off, traceidratio and their parentbased_ forms) are run by
the tracer itself, so the trace settings (server/tracing/control.py) can change the ratio per model while the
server runs: a root request is sampled when its trace id satisfies ``trace_id & (2**64 - 1) < bound``, the SDK's
TraceIdRatioBased rule, and a request with a ``traceparent`` follows its caller's flag (parentbased_*) or the same
rule on the caller's trace id. :class:`RootSampler` draws a root request's trace id first and applies the rule;
only when it says yes does the tracer start a span (the SDK then samples everything it is handed), and the
provider's id generator (this object) hands the SDK that very id. Asking the SDK instead cost a few microseconds
per request even when the answer was no (a span object, ids, context look-ups), which at a 1% ratio was nearly
all of tracing's cost. Imported only when tracing is on.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

STANDARD_SAMPLERS = {  # OTEL_TRACES_SAMPLER -> (root ratio, or None to read OTEL_TRACES_SAMPLER_ARG; parent-based)
    "always_on": (1.0, False),
    "always_off": (0.0, False),
    "traceidratio": (None, False),
    "parentbased_always_on": (1.0, True),
    "parentbased_always_off": (0.0, True),
    "parentbased_traceidratio": (None, True),
}
DEFAULT_SAMPLER = "parentbased_always_on"  # the SDK's default


def standard_sampler(environ: Mapping[str, str] = os.environ) -> tuple[float, bool] | None:
    """(root ratio, parent-based) of OTEL_TRACES_SAMPLER[_ARG], read as the SDK reads them (an unreadable
    argument means 1.0); None for a sampler outside the standard six, which the SDK then runs alone."""
    name = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if name not in STANDARD_SAMPLERS:
        return None
    ratio, parent_based = STANDARD_SAMPLERS[name]
    if ratio is None:
        try:
            ratio = float(environ.get("OTEL_TRACES_SAMPLER_ARG", ""))
        except ValueError:
            ratio = 1.0
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={ratio}: a sample ratio lies between 0 and 1")
    return ratio, parent_based


class RootSampler(RandomIdGenerator):
    """The provider's id generator, which also decides a root request's sampling ahead of the SDK (see above)."""

    def __init__(self, ratio: float = 1.0) -> None:
        self.ratio = ratio
        self.bound = TraceIdRatioBased.get_bound_for_rate(ratio)
        self._drawn = threading.local()

    def draw(self, bound: int | None = None) -> int | None:
        """Draw a root trace id; the id when it falls under ``bound`` (default: the starting ratio's), else None.
        The span is made later, on the span writer's thread, after :meth:`hand_over` of this id there."""
        trace_id = random.getrandbits(128)
        while trace_id == trace.INVALID_TRACE_ID:
            trace_id = random.getrandbits(128)
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= (self.bound if bound is None else bound):
            return None
        return trace_id

    def hand_over(self, trace_id: int) -> None:
        """The next root span started on this thread gets ``trace_id`` (:meth:`generate_trace_id`)."""
        self._drawn.trace_id = trace_id

    def generate_trace_id(self) -> int:
        """The id :meth:`hand_over` gave this thread for its next root span, else a fresh random one."""
        trace_id: int | None = getattr(self._drawn, "trace_id", None)
        if trace_id is None:
            return super().generate_trace_id()
        self._drawn.trace_id = None
        return trace_id
