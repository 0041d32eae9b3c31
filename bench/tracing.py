"""What OpenTelemetry request tracing costs: MLP throughput with tracing off, on at a 1% sample ratio, on at 100%.

Usage: python -m bench.tracing [--rounds 5] [--protocol http|grpc] [--concurrency 16] [--interval-ms 3000]
                               [--profile] [--same-process] [--interleave SECONDS [--segments N] [--control] [--rate N]]

Three servers of the same build run side by side (same model, optimizer off): one with tracing off (the
default), two configured the OpenTelemetry way (OTEL_TRACES_EXPORTER=otlp, OTEL_TRACES_SAMPLER=
parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG 0.01 or 1.0) exporting over OTLP/HTTP to a receiver in this
process, which counts the spans and drops them. perf_analyzer (which sends no traceparent, so the ratio decides)
drives them in turn, the order rotating every round so a shared machine's drift hits all alike. Prints the
median throughput of each, its ratio to "off", and how many requests each traced server really sampled.

``--same-process`` measures the three settings inside one traced server instead (a fresh one per round), switched
between windows through Triton's trace settings (``POST /v2/trace/setting``: trace_level OFF, trace_rate 100, 1):
two processes of one build differ by ~6% here, which this takes out of the comparison. Its "off" is tracing
started with nothing sampled, which the separate-servers mode shows to cost the same as tracing never started.

``--interleave S`` goes further: one perf_analyzer load runs without a break while the settings alternate between
off and 1% every S seconds (off, 1%, 1%, off, ...: each pair of neighbours compared), and the server's CPU and
answered requests are read at every switch. Neighbouring segments share the host's weather, which moves the
other modes' separate runs by ±15% here; 100% is left out (its export backlog would spill into the next segment).
``--control`` keeps every segment off (an A/A run): what the method reads when there is nothing to find.

"Off" has no build without tracing to be compared with; what it adds per request is timed directly instead
(the edge's ``tracer.enabled`` test and the batcher's ``CURRENT.get()``) and set against a request's time.

On a shared machine the throughput of two runs minutes apart can differ by more than the effect measured, so
``--profile`` adds a measure that does not depend on the neighbours: py-spy (when installed) samples the 1%
server under load, and the share of its busy samples inside tracing code (server/tracing/ or the OpenTelemetry
packages) is the share of its CPU that tracing takes.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

from bench import models, perf
from bench.serving import ServerProcess
from server.tracing import CURRENT, Tracer

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"off": None, "1%": "0.01", "100%": "1.0"}
SETTINGS = {  # --same-process: each configuration as Triton's trace settings
    "off": {"trace_level": ["OFF"]},
    "1%": {"trace_level": ["TIMESTAMPS"], "trace_rate": "100"},
    "100%": {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"},
}


class SpanSink(ThreadingHTTPServer):
    """An OTLP/HTTP traces endpoint that counts request spans (``infer <model>``) and keeps nothing."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _SinkHandler)
        self.requests_by_service: dict[str, int] = {}
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _SinkHandler(BaseHTTPRequestHandler):
    server: SpanSink

    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        message = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in message.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
            )
            count = sum(s.name.startswith("infer ") for scope in resource_spans.scope_spans for s in scope.spans)
            with self.server.lock:
                self.server.requests_by_service[service] = self.server.requests_by_service.get(service, 0) + count
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def span_sink() -> Iterator[SpanSink]:
    sink = SpanSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    try:
        yield sink
    finally:
        sink.shutdown()
        sink.server_close()


def tracing_env(label: str, ratio: str | None, endpoint: str) -> dict[str, str]:
    """The OTEL_* variables of one server: none for "off", else OTLP to ``endpoint`` at sample ``ratio``."""
    if ratio is None:
        return {"OTEL_TRACES_EXPORTER": "none"}
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": ratio,
        "OTEL_SERVICE_NAME": f"bench-{label}",
    }


def off_path_ns(repeats: int = 7, number: int = 200_000) -> float:
    """Median ns per request of what tracing off adds: the edge's enabled test and the batcher's CURRENT.get()."""
    tracer = Tracer()

    def off_path() -> object:
        return CURRENT.get() if not tracer.enabled else None

    def nothing() -> object:
        return None

    traced = timeit.repeat(off_path, number=number, repeat=repeats)
    empty = timeit.repeat(nothing, number=number, repeat=repeats)
    cost = [a - b for a, b in zip(traced, empty, strict=True)]
    return max(0.0, statistics.median(cost)) / number * 1e9


def traced_request_us(requests: int = 1000) -> tuple[float, float, int]:
    """In this process, away from the servers' noise: CPU us to record one sampled request (its spans, events
    and batch span, as the server makes them) and to encode them for OTLP, and the spans per request."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    kept = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracer = Tracer(provider)

    def one() -> None:
        trace = tracer.start("http", "mlp", "", {})
        now = time.monotonic_ns()
        times = (now + 1_000, now + 2_000, now + 3_000, now + 4_000)
        trace.ran(now, times, 1)
        tracer.record_batch([trace], times, 1)
        trace.finish(None)
        tracer.flush()  # the server's span writer makes these spans on its own thread, many at a time

    for _ in range(requests // 10):  # warm up
        one()
    records, encodes = [], []
    for _ in range(5):  # the least of five: what the code costs when nothing else takes the core
        kept.clear()
        started = time.process_time()
        for _ in range(requests):
            one()
        records.append(time.process_time() - started)
        spans = kept.get_finished_spans()
        started = time.process_time()
        for first in range(0, len(spans), 512):  # the batch processor's export batches
            encode_spans(spans[first : first + 512]).SerializeToString()
        encodes.append(time.process_time() - started)
    return min(records) / requests * 1e6, min(encodes) / requests * 1e6, len(spans) // requests


def server_cpu_s(server: ServerProcess) -> float:
    """CPU seconds (user + system) the server process and its live children (the span export process) have
    used so far, from /proc (Linux)."""
    assert server.proc is not None
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(server.proc.pid) or fields[1] == str(server.proc.pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def served_requests(server: ServerProcess) -> int:
    """Successful requests the server answered (its statistics)."""
    stats = server.model_stats("mlp")
    return sum(int(v["inference_stats"]["success"]["count"]) for v in stats["model_stats"])


@dataclass
class Figures:
    """One configuration's measurements, a value per round."""

    infer_per_s: dict[int, float] = field(default_factory=dict)
    """Round -> throughput, for the rounds that succeeded."""
    cpu_us_per_request: dict[int, float] = field(default_factory=dict)
    requests: int = 0


def measure(server: ServerProcess, args: argparse.Namespace, out: Path, figures: Figures, round_: int) -> str:
    """One perf_analyzer run against ``server``: its throughput and the server's CPU time per request."""
    url = server.http_url if args.protocol == "http" else server.grpc_url
    cpu, requests = server_cpu_s(server), served_requests(server)
    run = perf.run_perf("mlp", args.protocol, url, args.concurrency, args.interval_ms, out, [])
    cpu, requests = server_cpu_s(server) - cpu, served_requests(server) - requests
    figures.requests += requests
    if run.infer_per_s and requests:
        figures.infer_per_s[round_] = run.infer_per_s
        figures.cpu_us_per_request[round_] = cpu / requests * 1e6
    return f"{run.infer_per_s} infer/s, {cpu / max(requests, 1) * 1e6:.0f} us CPU/request {run.error or ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tracing", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval-ms", type=int, default=3000)
    parser.add_argument("--profile", action="store_true", help="also sample the 1%% server with py-spy")
    parser.add_argument("--same-process", action="store_true", help="switch one server's trace settings instead")
    parser.add_argument("--interleave", type=float, help="seconds per segment of one unbroken load (see above)")
    parser.add_argument("--segments", type=int, default=64, help="--interleave: segments, half of them at 1%%")
    parser.add_argument("--control", action="store_true", help="--interleave: A/A, the '1%%' segments stay off too")
    parser.add_argument("--rate", type=int, default=100, help="--interleave: trace 1 in RATE in the traced segments")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    out = Path(tempfile.mkdtemp(prefix="tracing-cost-"))
    repo = out / "repo"
    models.write_repo(repo, ["mlp"])
    figures = {label: Figures() for label in CONFIGS}
    labels = list(CONFIGS)
    for label in labels:
        (out / label).mkdir()
    if args.interleave:
        with span_sink() as sink, started(["1%"], repo, out, sink.endpoint) as servers:
            interleaved(servers["1%"], args)
        return 0
    with span_sink() as sink:
        for round_ in range(args.rounds):
            # Fresh servers every round: two processes of one build differ by up to ~6% here (an A/A run showed
            # it), so servers kept for the whole run would pass their own luck off as the configuration's.
            with started(["1%"] if args.same_process else labels, repo, out, sink.endpoint) as servers:
                for label in order(labels, round_, args.same_process):
                    server = servers["1%"] if args.same_process else servers[label]
                    if args.same_process:
                        switch(server, label)
                    line = measure(server, args, out / label, figures[label], round_)
                    print(f"round {round_ + 1} tracing {label}: {line}", flush=True)
            # Stopping a server flushes the spans its batch processor still held.
        spans = dict(sink.requests_by_service)
        share = None
        if args.profile:
            with started(["1%"], repo, out, sink.endpoint) as servers:
                share = tracing_share(servers["1%"], args, out)
    report(args, figures, spans)
    if args.profile:
        print(
            f"  py-spy: {share:.2%} of the 1% server's busy CPU samples are in tracing code"
            if share is not None
            else "  py-spy: not installed, no profile"
        )
    return 0


def background_load(server: ServerProcess, args: argparse.Namespace, seconds: float) -> subprocess.Popen[bytes]:
    """perf_analyzer loading the MLP for about ``seconds`` (one measurement window), to be terminated when done."""
    url = server.http_url if args.protocol == "http" else server.grpc_url
    return subprocess.Popen(
        [
            perf.perf_analyzer_path(), "-m", "mlp", "-i", args.protocol, "-u", url,
            "--concurrency-range", f"{args.concurrency}:{args.concurrency}",
            "--measurement-interval", str(int(seconds * 1000)), "--stability-percentage", "999", "--max-trials", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip


def interleaved(server: ServerProcess, args: argparse.Namespace) -> None:
    """--interleave: off and 1% in alternating segments under one unbroken perf_analyzer load; prints the medians of
    the neighbouring pairs' ratios (CPU per request and throughput, 1% over off)."""
    load = background_load(server, args, args.interleave * args.segments + 30)
    segments: list[tuple[str, float, float]] = []  # (label, CPU us per request, requests per second)
    try:
        switch(server, "off")
        time.sleep(5)  # the load settles
        for index in range(args.segments):
            label = "off" if index % 4 in (0, 3) else "1%"
            switch(server, "off" if args.control else label, args.rate)
            time.sleep(0.2)  # requests already queued finish under the old setting
            cpu, requests, started_at = server_cpu_s(server), served_requests(server), time.monotonic()
            time.sleep(args.interleave)
            cpu, requests = server_cpu_s(server) - cpu, served_requests(server) - requests
            elapsed = time.monotonic() - started_at
            if requests:
                segments.append((label, cpu / requests * 1e6, requests / elapsed))
                shown = f"{requests / elapsed:,.0f} infer/s, {cpu / requests * 1e6:.0f} us CPU/request"
                print(f"segment {index + 1} {label} (from {time.time() - elapsed:.2f}): {shown}", flush=True)
    finally:
        load.terminate()
        load.wait()
    pairs = [(a, b) for a, b in itertools.pairwise(segments) if {a[0], b[0]} == {"off", "1%"}]
    cpu = [(b[1] / a[1]) if a[0] == "off" else (a[1] / b[1]) for a, b in pairs]
    rate = [(b[2] / a[2]) if a[0] == "off" else (a[2] / b[2]) for a, b in pairs]
    off = [s[1] for s in segments if s[0] == "off"]
    print(
        f"MLP {args.protocol} c={args.concurrency}, {len(segments)} segments of {args.interleave:g} s under one load, "
        f"off and 1 in {args.rate} alternating (median off: {statistics.median(off):.0f} us CPU/request):\n"
        f"  traced / off over {len(pairs)} neighbouring pairs: CPU per request {statistics.median(cpu):.3f} "
        f"(quartiles {_quartiles(cpu)}), throughput {statistics.median(rate):.3f} (quartiles {_quartiles(rate)})"
    )


def _quartiles(values: list[float]) -> str:
    q1, _, q3 = statistics.quantiles(values, n=4)
    return f"{q1:.3f}..{q3:.3f}"


def order(labels: list[str], round_: int, same_process: bool) -> list[str]:
    """The configurations in this round's order: rotating, so drift hits all alike; with --same-process off and 1%
    alternate first and 100% always comes last, because its spans still in the export queue and its garbage would
    burden the window after it."""
    if same_process:
        return ["off", "1%", "100%"] if round_ % 2 == 0 else ["1%", "off", "100%"]
    return labels[round_ % len(labels) :] + labels[: round_ % len(labels)]


def switch(server: ServerProcess, label: str, rate: int = 100) -> None:
    """--same-process: put ``label``'s trace settings in force on the traced server ("1%" at 1 in ``rate``)."""
    settings = SETTINGS[label] | ({"trace_rate": str(rate)} if label == "1%" else {})
    reply = httpx.post(f"http://{server.http_url}/v2/trace/setting", json=settings, timeout=10)
    reply.raise_for_status()


@contextlib.contextmanager
def started(labels: list[str], repo: Path, out: Path, endpoint: str) -> Iterator[dict[str, ServerProcess]]:
    """One fresh server per configuration, ready to serve the MLP; all stopped on the way out."""
    with contextlib.ExitStack() as stack:
        servers: dict[str, ServerProcess] = {}
        for label in labels:
            server = ServerProcess(
                sys.executable, repo, out / f"{label}.log", cwd=ROOT, extra_args=("--default-precision", "none")
            )
            with mock.patch.dict("os.environ", tracing_env(label, CONFIGS[label], endpoint)):
                servers[label] = stack.enter_context(server)  # the child copies the environment as it starts
        for server in servers.values():
            server.wait_ready(["mlp"])
        yield servers


def tracing_share(server: ServerProcess, args: argparse.Namespace, out: Path) -> float | None:
    """Share of the server's busy CPU samples (py-spy, 15 s under perf_analyzer's load) inside tracing code."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists() or server.proc is None:
        return None
    load = background_load(server, args, 30)
    raw = out / "profile.raw"
    try:
        time.sleep(3)
        record = [spy, "record", "--format", "raw", "--rate", "250", "--duration", "15", "--nonblocking"]
        subprocess.run([*record, "--output", str(raw), "--pid", str(server.proc.pid)], check=True, capture_output=True)
    finally:
        load.terminate()
        load.wait()
    total = traced = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        traced += int(count) if "tracing/" in stack or "opentelemetry" in stack else 0
    return traced / total if total else None


def report(args: argparse.Namespace, figures: dict[str, Figures], spans: dict[str, int]) -> None:
    """Per configuration: the median of its rounds, and the median of its ratios to "off" in the same round (the
    paired figure, which the machine's drift between rounds does not move); what the sampled spans alone explain
    (the 100% server's extra CPU per request times the ratio); the off path's own cost."""
    how = "one server per round, its trace settings switched" if args.same_process else "fresh servers per round"
    print(f"MLP {args.protocol} c={args.concurrency}, {args.rounds} rounds, {how}, perf_analyzer:")
    off = figures["off"]
    base_cpu = statistics.median(off.cpu_us_per_request.values()) if off.cpu_us_per_request else 0.0
    for label, f in figures.items():
        if not f.infer_per_s:
            print(f"  tracing {label:>4}: no successful run")
            continue
        rate, cpu = statistics.median(f.infer_per_s.values()), statistics.median(f.cpu_us_per_request.values())
        spread = f"{min(f.infer_per_s.values()):,.0f}..{max(f.infer_per_s.values()):,.0f}"
        paired = ""
        if label != "off":
            rates = [f.infer_per_s[r] / off.infer_per_s[r] for r in f.infer_per_s if r in off.infer_per_s]
            cpus = [f.cpu_us_per_request[r] / off.cpu_us_per_request[r] for r in f.infer_per_s if r in off.infer_per_s]
            if rates:
                paired = (
                    f"; paired with off: throughput {statistics.median(rates):.3f} "
                    f"(rounds {min(rates):.2f}..{max(rates):.2f}), CPU {statistics.median(cpus):.3f}"
                )
            if not args.same_process:
                paired += f", sampled {spans.get(f'bench-{label}', 0)}/{f.requests} requests"
        print(f"  tracing {label:>4}: {rate:,.0f} infer/s (rounds {spread}), server CPU {cpu:.0f} us/request{paired}")
    if args.same_process:
        expected = figures["1%"].requests * 0.01 + figures["100%"].requests
        print(f"  spans received: {sum(spans.values())} request spans, ~{expected:,.0f} expected from the settings")
    full = figures.get("100%")
    if full is not None and full.cpu_us_per_request and base_cpu:
        extra = statistics.median(full.cpu_us_per_request.values()) - base_cpu
        print(
            f"  a traced request costs {extra:.0f} us more CPU, so at 1% the spans alone explain "
            f"{extra * 0.01 / base_cpu:.2%} of a request's CPU"
        )
    record_us, encode_us, spans_each = traced_request_us()
    print(
        f"  in isolation a sampled request takes {record_us:.0f} us of CPU to record ({spans_each} spans) and "
        f"{encode_us:.0f} us to encode for OTLP"
    )
    cost = off_path_ns()
    if base_cpu:
        print(f"  tracing off adds {cost:.0f} ns per request = {cost / (base_cpu * 1e3):.4%} of its server CPU time")


if __name__ == "__main__":
    sys.exit(main())
