"""Replicas on one repository: how long an upload takes to be served by every replica, and how much CPU a fleet
spends optimizing one model with and without a shared optimizer cache.

Usage: python -m bench.fleet [--replicas 3] [--runs 3] [--poll-secs 1,5] [--model mlp] [--out bench/out]

1. Propagation: ``--replicas`` servers in ``--model-control-mode poll`` on one repository folder, each on its
   own ports (what pods on one volume are). Each run uploads a new version through the first replica (multipart,
   without waiting) and takes the time until every replica answers 200 on /v2/models/{m}/versions/{v}/ready. The
   optimizer is off here, so the figure is the poll interval plus the load. Once per ``--poll-secs`` value.
2. Optimizer CPU: the same fleet in the default background mode with ``--default-precision auto``, once with a
   cache folder per replica and once with one shared ``--cache-dir``. Each run uploads new bytes of ``--model``
   (a fresh cache key) through the first replica and waits until every replica's report has left the
   ``optimizing`` phase; the CPU seconds (user + system, /proc/<pid>/stat, all threads) the replica processes
   used from the upload until then are summed, and the optimizer runs are counted from
   ``optiserve_optimizer_cache_total{result="miss"}``. The fleet's idle CPU rate (polling, heartbeats), taken
   over ``--idle-s`` before the first run, times the run's wall time is subtracted to give the CPU above idle.
   No traffic is sent and ``--optimize-traffic-wait-s 0`` starts each optimization at once.
Writes <out>/fleet.md and <out>/fleet.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench.ready import model_bytes, upload
from bench.serving import ServerProcess, http_get

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 600.0
POLL_S = 0.05
TICKS = os.sysconf("SC_CLK_TCK")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each measurement (medians reported)")
    parser.add_argument("--poll-secs", default="1,5", help="--repository-poll-secs values for the propagation part")
    parser.add_argument("--model", default="resnet18", help="bench model optimized in the CPU part (bench/models.py)")
    parser.add_argument("--idle-s", type=float, default=10.0, help="window for the fleet's idle CPU rate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args(argv)
    args.poll_secs = [float(p) for p in args.poll_secs.split(",") if p.strip()]
    return args


# ---- a fleet --------------------------------------------------------------------------------------
@contextlib.contextmanager
def fleet(
    args: argparse.Namespace, work: Path, label: str, poll_s: float, caches: list[Path], extra: tuple[str, ...] = ()
) -> Iterator[list[ServerProcess]]:
    """``--replicas`` servers on one fresh repository, started side by side and stopped on exit."""
    repo = work / f"repo-{label}"
    for folder in (repo, *caches):
        shutil.rmtree(folder, ignore_errors=True)
    repo.mkdir(parents=True)
    flags = ("--model-control-mode", "poll", "--repository-poll-secs", str(poll_s), *extra)
    servers = [
        ServerProcess(
            args.server_python,
            repo,
            work / f"server-{label}-{i}.log",
            ROOT,
            (*flags, "--cache-dir", str(caches[i % len(caches)]), "--replica-id", f"{label}-{i}"),
        )
        for i in range(args.replicas)
    ]
    with contextlib.ExitStack() as stack:
        for server in servers:
            stack.enter_context(server)
        for server in servers:
            server.wait_ready([])
        yield servers


def cpu_seconds(server: ServerProcess) -> float:
    """User + system CPU seconds of the server process so far (every thread)."""
    assert server.proc is not None
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime: fields 14 and 15 of the line


def wait_until(what: str, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached in {TIMEOUT_S:.0f} s")
        time.sleep(POLL_S)


def ok(server: ServerProcess, path: str) -> bool:
    return http_get(f"http://{server.http_url}{path}", timeout=5.0)[0] == 200


def report(server: ServerProcess, name: str) -> dict[str, Any]:
    status, body = http_get(f"http://{server.http_url}/v2/models/{name}/optimization", timeout=5.0)
    return dict(json.loads(body)) if status == 200 else {}


def misses(server: ServerProcess) -> int:
    _, body = http_get(f"http://{server.http_url}/metrics")
    for family in text_string_to_metric_families(body.decode()):
        if family.name == "optiserve_optimizer_cache":
            return int(sum(s.value for s in family.samples if s.labels.get("result") == "miss"))
    return 0


# ---- measurements ---------------------------------------------------------------------------------
def propagation(args: argparse.Namespace, work: Path, poll_s: float) -> list[float]:
    """Seconds from an upload through replica 0 to every replica serving the new version, per run."""
    seconds: list[float] = []
    label, off = f"poll{poll_s:g}", ("--default-precision", "none")
    with fleet(args, work, label, poll_s, [work / f"cache-{label}"], off) as servers:
        for run in range(1, args.runs + 1):
            started = time.monotonic()
            upload(servers[0], "prop", model_bytes("mlp", f"prop-{run}"))
            wait_until(f"version {run} everywhere", everywhere(servers, f"/v2/models/prop/versions/{run}/ready"))
            seconds.append(time.monotonic() - started)
            print(f"poll {poll_s:g} s, run {run}: served by all after {seconds[-1]:.2f} s", flush=True)
    return seconds


def everywhere(servers: list[ServerProcess], path: str) -> Callable[[], bool]:
    return lambda: all(ok(s, path) for s in servers)


def optimized_everywhere(servers: list[ServerProcess], name: str) -> Callable[[], bool]:
    return lambda: all(report(s, name).get("phase") in ("optimized", "original") for s in servers)


def optimizer_cost(args: argparse.Namespace, work: Path, shared: bool) -> list[dict[str, Any]]:
    """Per run: CPU seconds of the fleet from the upload until every replica is done optimizing, optimizer runs,
    wall seconds, and where each replica's result came from."""
    label = "shared" if shared else "separate"
    caches = [work / f"cache-{label}"] if shared else [work / f"cache-{label}-{i}" for i in range(args.replicas)]
    runs: list[dict[str, Any]] = []
    extra = ("--default-precision", "auto", "--optimize-nice", "0", "--optimize-traffic-wait-s", "0")
    with fleet(args, work, label, 1.0, caches, extra) as servers:
        idle_before = sum(cpu_seconds(s) for s in servers)
        time.sleep(args.idle_s)
        idle_rate = (sum(cpu_seconds(s) for s in servers) - idle_before) / args.idle_s
        print(f"{label} cache: idle fleet CPU {idle_rate:.3f} s/s", flush=True)
        for run in range(1, args.runs + 1):
            name = f"{args.model}-{run}"
            before_cpu = [cpu_seconds(s) for s in servers]
            before_misses = sum(misses(s) for s in servers)
            started = time.monotonic()
            upload(servers[0], name, model_bytes(args.model, f"fleet-{label}-{run}-{time.time_ns()}"))
            wait_until(f"{name} optimized everywhere", optimized_everywhere(servers, name))
            wall = time.monotonic() - started
            cpu = sum(cpu_seconds(s) - b for s, b in zip(servers, before_cpu, strict=True))
            row = {
                "cpu_s": round(cpu, 2),
                "cpu_above_idle_s": round(cpu - idle_rate * wall, 2),
                "idle_cpu_per_s": round(idle_rate, 3),
                "wall_s": round(wall, 2),
                "optimizer_runs": sum(misses(s) for s in servers) - before_misses,
                "cache": [report(s, name).get("cache", "") for s in servers],
                "selected": sorted({str(report(s, name).get("selected", "")) for s in servers}),
            }
            runs.append(row)
            print(f"{label} cache, run {run}: {row}", flush=True)
    return runs


# ---- output ---------------------------------------------------------------------------------------
def write(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        f"| poll interval | upload → served by all {results['replicas']} replicas (runs) | median |",
        "|---:|---|---:|",
    ]
    for poll, seconds in results["propagation"].items():
        runs = ", ".join(f"{s:.2f} s" for s in seconds)
        lines.append(f"| {poll} s | {runs} | {statistics.median(seconds):.2f} s |")
    lines += [
        "",
        "| optimizer cache | fleet CPU s above idle (runs) | median | optimizer runs | median wall s | per replica |",
        "|---|---|---:|---:|---:|---|",
    ]
    for label, runs in results["optimizer"].items():
        cpu = [r["cpu_above_idle_s"] for r in runs]
        optimizer_runs = ", ".join(str(r["optimizer_runs"]) for r in runs)
        wall = statistics.median(r["wall_s"] for r in runs)
        caches = "; ".join("/".join(r["cache"]) for r in runs)
        cpu_runs = ", ".join(f"{c:.1f}" for c in cpu)
        lines.append(
            f"| {label} | {cpu_runs} | {statistics.median(cpu):.1f} | {optimizer_runs} | {wall:.1f} | {caches} |"
        )
    (out / "fleet.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.out / "fleet"
    results: dict[str, Any] = {"replicas": args.replicas, "model": args.model, "propagation": {}, "optimizer": {}}
    for poll_s in args.poll_secs:
        results["propagation"][f"{poll_s:g}"] = propagation(args, work, poll_s)
    for shared in (False, True):
        results["optimizer"]["shared" if shared else "per replica"] = optimizer_cost(args, work, shared)
    write(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
