"""What Prometheus metrics cost: MLP throughput at concurrency 16 with metrics on and off.

Usage: python -m bench.metrics_cost [--rounds 5] [--protocol http|grpc] [--interval-ms 3000]
Two servers run side by side (same model, optimizer off); perf_analyzer alternates between them, round
after round, so slow drift of a shared machine hits both alike. Prints and returns the median ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench import models, perf
from bench.serving import ServerProcess

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.metrics_cost", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args(argv)
    out = Path(tempfile.mkdtemp(prefix="metrics-cost-"))
    repo = out / "repo"
    models.write_repo(repo, ["mlp"])
    (out / "perf").mkdir()
    base = ("--default-precision", "none")
    on = ServerProcess(sys.executable, repo, out / "on.log", cwd=ROOT, extra_args=base)
    off = ServerProcess(sys.executable, repo, out / "off.log", cwd=ROOT, extra_args=(*base, "--no-metrics"))
    results: dict[str, list[float]] = {"on": [], "off": []}
    with on, off:
        on.wait_ready(["mlp"])
        off.wait_ready(["mlp"])
        for round_ in range(args.rounds):
            for label, server in (("on", on), ("off", off)) if round_ % 2 == 0 else (("off", off), ("on", on)):
                url = server.http_url if args.protocol == "http" else server.grpc_url
                run = perf.run_perf("mlp", args.protocol, url, args.concurrency, args.interval_ms, out / "perf", [])
                if run.infer_per_s:
                    results[label].append(run.infer_per_s)
                print(f"round {round_ + 1} metrics {label}: {run.infer_per_s} infer/s {run.error or ''}", flush=True)
    median_on, median_off = statistics.median(results["on"]), statistics.median(results["off"])
    print(
        f"MLP {args.protocol} c={args.concurrency}, {args.rounds} rounds: metrics on {median_on:,.0f} infer/s, "
        f"off {median_off:,.0f} infer/s, on/off = {median_on / median_off:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
