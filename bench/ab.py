"""A/B of server variants (source trees and/or server flags) with perf_analyzer, alternating, medians.

Usage:
  python -m bench.ab --variant before=/tmp/tree-a --variant after=/tmp/tree-b[::--flag value ...] \
      [--points mlp:grpc:16,mlp:grpc:1] [--repeats 5] [--window-s 2] [--models-dir DIR]

A variant is NAME=TREE, optionally followed by ``::`` and extra server flags; TREE is a folder holding a
``server/`` package (a ``git archive`` of some revision, say), run as ``python -m server serve`` from there.
NAME=cmd:COMMAND runs any other gRPC server instead (``{port}`` in COMMAND is its port; gRPC points only,
no CPU figure), e.g. the prototype in bench/frontend_proto.py.
All variants stay up; every point is measured against each in turn, the order rotating with every repeat.
Besides throughput and p50, each run reports the server's CPU time per inference (its own CPU seconds over
the inferences its statistics counted), which a busy shared machine disturbs much less than throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import models, perf
from bench.image_mean import NAME as IMAGE_MEAN
from bench.image_mean import build_image_mean
from bench.serving import ServerProcess, free_port, stats_delta

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Variant:
    name: str
    tree: Path
    args: tuple[str, ...]
    command: str | None = None


def parse_variant(text: str) -> Variant:
    name, _, rest = text.partition("=")
    if rest.startswith("cmd:"):
        return Variant(name, ROOT, (), rest.removeprefix("cmd:"))
    tree, _, flags = rest.partition("::")
    if not name or not tree:
        raise argparse.ArgumentTypeError(f"expected NAME=TREE[::flags] or NAME=cmd:COMMAND, got {text!r}")
    return Variant(name, Path(tree).resolve(), tuple(flags.split()))


class CommandServer:
    """Any gRPC server started by a shell command in its own session, stopped with SIGTERM to the group."""

    def __init__(self, command: str, log_path: Path) -> None:
        self.grpc_port = free_port()
        self.grpc_url = f"127.0.0.1:{self.grpc_port}"
        self.http_url = ""
        self.command = command.format(port=self.grpc_port)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> CommandServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command, shell=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
            )
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def wait_ready(self, models: list[str], timeout: float = 60.0) -> float:
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.grpc_port), 1):
                time.sleep(2.0)  # every front-end process up, not just the first
                return time.monotonic() - start
            time.sleep(0.25)
        raise TimeoutError(f"{self.command}: port {self.grpc_port} not open after {timeout:.0f} s")


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the process and its threads (children are not expected)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int) -> float:
    """CPU seconds of every live process in the process group ``pgid`` (a process may end while read)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getpgid(int(entry.name)) == pgid:
                total += server_cpu_s(int(entry.name))
    return total


def write_models(root: Path, names: set[str]) -> None:
    builders = {"mlp": models.build_mlp, "resnet18": models.build_resnet18_like, IMAGE_MEAN: build_image_mean}
    import onnx

    for name in names:
        path = root / name / "1" / "model.onnx"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            onnx.save(builders[name](), str(path))


def run_point(
    server: ServerProcess | CommandServer, point: tuple[str, str, int], interval_ms: int, out: Path
) -> dict[str, Any]:
    model, protocol, concurrency = point
    url = server.grpc_url if protocol.startswith("grpc") else server.http_url
    assert server.proc is not None
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(server, CommandServer):  # no statistics: inferences = throughput x the run's wall time
        cpu0, start = group_cpu_s(server.proc.pid), time.monotonic()
        run = perf.run_perf(model, protocol, url, concurrency, interval_ms, out).as_dict()
        cpu1, elapsed = group_cpu_s(server.proc.pid), time.monotonic() - start
        count = (run["infer_per_s"] or 0) * elapsed
        return run | {"cpu_ms_per_infer": (cpu1 - cpu0) * 1e3 / count if count else None}
    before, cpu0 = server.model_stats(model), server_cpu_s(server.proc.pid)
    run = perf.run_perf(model, protocol, url, concurrency, interval_ms, out).as_dict()
    cpu1, after = server_cpu_s(server.proc.pid), server.model_stats(model)
    count = stats_delta(before, after)["inference_count"]
    run["cpu_ms_per_infer"] = (cpu1 - cpu0) * 1e3 / count if count else None
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True)
    parser.add_argument("--points", default="mlp:grpc:16,mlp:grpc:1", help="model:protocol:concurrency,...")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--window-s", type=float, default=2.0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "ab")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so the servers are stopped on the way out
    points = [(m, p, int(c)) for m, p, c in (x.split(":") for x in args.points.split(","))]
    repo = args.out.resolve() / "models"
    write_models(repo, {m for m, _, _ in points})
    servers = {v.name: _server(v, args, repo) for v in args.variant}
    runs: dict[tuple[Any, str], list[dict[str, Any]]] = {}
    names = list(servers)
    with contextlib.ExitStack() as stack:
        for server in servers.values():
            stack.enter_context(server)
        for server in servers.values():
            server.wait_ready(sorted({m for m, _, _ in points}))
        for repeat in range(args.repeats):
            for index, point in enumerate(points):
                shift = (repeat + index) % len(names)
                for name in names[shift:] + names[:shift]:
                    run = run_point(servers[name], point, int(args.window_s * 1000), args.out / "perf" / name)
                    runs.setdefault((point, name), []).append(run)
                    print(f"[r{repeat}] {':'.join(map(str, point))} {name}: {_brief(run)}", flush=True)
    print("\n| point | variant | infer/s (median) | p50 ms | server CPU ms/infer | runs (infer/s) |")
    print("|---|---|---:|---:|---:|---|")
    for point in points:
        for name in names:
            print(_row(point, name, runs[(point, name)]))
    return 0


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _server(variant: Variant, args: argparse.Namespace, repo: Path) -> ServerProcess | CommandServer:
    log = args.out / f"{variant.name}.log"
    if variant.command is not None:
        return CommandServer(variant.command, log)
    flags = ("--default-precision", "none", *variant.args)
    return ServerProcess(args.server_python, repo, log, cwd=variant.tree, extra_args=flags)


def _brief(run: dict[str, Any]) -> str:
    if run["error"]:
        return f"FAILED {run['error']}"
    cpu = run["cpu_ms_per_infer"]
    return f"{run['infer_per_s']:,.0f} infer/s, p50 {run['latency_ms'].get('p50', 0):.3f} ms, cpu {cpu or 0:.3f} ms"


def _row(point: tuple[str, str, int], name: str, runs: list[dict[str, Any]]) -> str:
    good = [r for r in runs if not r["error"]]
    if not good:
        return f"| {':'.join(map(str, point))} | {name} | failed | | | |"
    rate = statistics.median(r["infer_per_s"] for r in good)
    p50 = statistics.median(r["latency_ms"]["p50"] for r in good)
    cpu = statistics.median(r["cpu_ms_per_infer"] or 0 for r in good)
    samples = ", ".join(f"{r['infer_per_s']:,.0f}" for r in good)
    return f"| {':'.join(map(str, point))} | {name} | {rate:,.0f} | {p50:.3f} | {cpu:.3f} | {samples} |"


if __name__ == "__main__":
    sys.exit(main())
