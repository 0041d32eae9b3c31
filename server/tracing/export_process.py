"""Making, encoding and exporting spans in a helper process, so the server's event loop never waits for them.

With the export in the server's own process, tracing at 1% cost 3 to 5% of an HTTP request's CPU and throughput on
the MLP, while with the export held back it cost nothing measurable (BENCHMARKS.md §11): the batch processor's
thread encodes for ~15 ms at a stretch, and the event loop, which gives up the GIL at every socket call, waits
for it each time. Here the span writer (writer.py) sends each finished sampled request and batch as one line of
plain values (JSON) down a pipe, a few times a second; this process, started with the server's environment, makes
the spans with their original timestamps and exports them through the SDK's batch processor and exporter, as
the OTEL_* variables say. If it dies, the server logs it once and goes on without spans.

Run as ``python -m server.tracing.export_process`` by :class:`ExportProcess`; reads stdin until it closes.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import subprocess
import sys
import threading
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from server.tracing import BatchTrace, RequestTrace

log = logging.getLogger("optiserve.tracing")

RECENT_REQUESTS = 10_000
"""Requests this process remembers for the batch spans that link them (a batch comes right after them)."""


class ExportProcess:
    """The server's side: the helper process and the lines queued for it."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "server.tracing.export_process"], stdin=subprocess.PIPE, env=os.environ.copy()
        )
        self._lines: list[bytes] = []
        self._sequence = itertools.count()
        self._lock = threading.Lock()
        self._broken = False

    def request(self, trace: RequestTrace) -> None:
        """Queue a finished sampled request (span writer's thread); it gets the number its batch will name."""
        trace.sequence = next(self._sequence)
        record = {
            "kind": "request",
            "sequence": trace.sequence,
            "trace_id": format(trace.trace_id, "032x") if trace.trace_id is not None else None,
            "carrier": trace.carrier,
            "name": trace.name,
            "attributes": trace.attributes,
            "start_ns": trace.start_ns,
            "times": trace.times,
            "batch_size": trace.batch_size,
            "instance": trace.instance,
            "end_ns": trace.end_ns,
            "error": trace.error,
        }
        self._lines.append(orjson.dumps(record) + b"\n")

    def batch(self, batch: BatchTrace) -> None:
        """Queue a batch whose requests were all queued before it."""
        record = {
            "kind": "batch",
            "requests": [r.sequence for r in batch.requests if r.sequence is not None],
            "start_ns": batch.start_ns,
            "end_ns": batch.end_ns,
            "attributes": batch.attributes,
        }
        self._lines.append(orjson.dumps(record) + b"\n")

    def send(self) -> None:
        """Write what is queued down the pipe, in one write (the span writer calls this after each round)."""
        lines, self._lines = self._lines, []
        if not lines or self._broken:
            return
        assert self._proc.stdin is not None
        try:
            with self._lock:
                self._proc.stdin.write(b"".join(lines))
                self._proc.stdin.flush()
        except (OSError, ValueError) as exc:  # a broken pipe, or a closed one
            self._broken = True
            log.error("the span export process is gone (%s): spans are dropped from now on", exc)

    def close(self, timeout_s: float = 10.0) -> None:
        """Send the rest, close the pipe and let the process export what it holds and exit."""
        self.send()
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def main() -> int:
    """The helper process: read records from stdin, make and export their spans, export the rest at EOF."""
    from server.tracing import BatchTrace, Tracer

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    tracer = Tracer.from_environment(True, helper=False)
    recent: collections.OrderedDict[int, RequestTrace] = collections.OrderedDict()
    for line in sys.stdin.buffer:
        record: dict[str, Any] = orjson.loads(line)
        if record["kind"] == "request":
            trace = _request(tracer, record)
            trace.write(force=True)
            recent[record["sequence"]] = trace
            if len(recent) > RECENT_REQUESTS:
                recent.popitem(last=False)
        else:
            requests = [recent[s] for s in record["requests"] if s in recent]
            BatchTrace(tracer, requests, record["start_ns"], record["end_ns"], record["attributes"]).write(force=True)
    tracer.shutdown()
    return 0


def _request(tracer: Any, record: dict[str, Any]) -> RequestTrace:
    from server.tracing import RequestTrace

    carrier = record["carrier"]
    return RequestTrace(
        tracer,
        parent=tracer._propagator.extract(carrier) if carrier else None,
        trace_id=int(record["trace_id"], 16) if record["trace_id"] else None,
        name=record["name"],
        attributes=record["attributes"],
        start_ns=record["start_ns"],
        times=tuple(record["times"]) if record["times"] else None,
        batch_size=record["batch_size"],
        instance=record["instance"],
        end_ns=record["end_ns"],
        error=record["error"],
    )


if __name__ == "__main__":
    sys.exit(main())
