"""What Triton's response cache buys on a repeated-input workload: throughput with the cache on and off.

Usage: python -m bench.cache [--models mlp transformer] [--distinct 16] [--rounds 5] [--protocol http|grpc]
                             [--concurrency 8] [--interval-ms 3000]

Two servers of the same build serve the same models, each with ``response_cache { enable: true }`` in its
config: one with ``--response-cache-bytes`` 64 MiB, one with 0 (the cache off server-wide, so every request
runs). perf_analyzer cycles through ``--distinct`` fixed inputs (``--input-data``), so after the first pass
every request repeats an earlier one. The servers take turns round after round so a shared machine's drift
hits both alike. Prints the median throughput and p50 latency of each, the ratio, and the hit ratio the
server's statistics report.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import models, perf
from bench.serving import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
CACHE_BYTES = 64 << 20
CONFIG = "max_batch_size: 8\nresponse_cache { enable: true }\n"


@dataclass
class Figures:
    """One (model, cache setting): a value per round."""

    infer_per_s: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)


def write_input_data(path: Path, config: dict[str, Any], distinct: int) -> None:
    """perf_analyzer's --input-data JSON: ``distinct`` fixed random samples (fixed seed) for every input."""
    rng = np.random.default_rng(0)
    samples = []
    for _ in range(distinct):
        sample = {}
        for spec in config["input"]:
            dims = [int(d) for d in spec["dims"]]
            sample[spec["name"]] = {
                "content": rng.standard_normal(dims).astype(np.float32).ravel().tolist(),
                "shape": dims,
            }
        samples.append(sample)
    path.write_text(json.dumps({"data": samples}))


def cache_counts(server: ServerProcess, model: str) -> tuple[int, int]:
    """(hits, misses) so far, from the server's statistics."""
    stats = server.model_stats(model)["model_stats"]
    hits = sum(int(v["inference_stats"]["cache_hit"]["count"]) for v in stats)
    return hits, sum(int(v["inference_stats"]["cache_miss"]["count"]) for v in stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mlp", "transformer"], choices=sorted(models.BUILDERS))
    parser.add_argument("--distinct", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="http")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--interval-ms", type=int, default=3000)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # stop the servers on the way out
    out = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    repo = out / "repo"
    models.write_repo(repo, args.models)
    for name in args.models:
        (repo / name / "config.pbtxt").write_text(CONFIG)
    settings = {"on": str(CACHE_BYTES), "off": "0"}
    figures = {(m, s): Figures() for m in args.models for s in settings}
    extra = ("--default-precision", "none")
    servers = {
        s: ServerProcess(sys.executable, repo, out / f"{s}.log", ROOT, (*extra, "--response-cache-bytes", size))
        for s, size in settings.items()
    }
    with servers["on"], servers["off"]:
        for server in servers.values():
            server.wait_ready(args.models)
        for name in args.models:
            write_input_data(out / f"{name}.json", servers["on"].model_config(name), args.distinct)
        for round_ in range(args.rounds):
            for name in args.models:
                for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    run_one(servers[setting], name, setting, args, out, figures[(name, setting)], round_)
        hit_ratio = {name: cache_counts(servers["on"], name) for name in args.models}
    report(args, figures, hit_ratio)
    return 0


def run_one(
    server: ServerProcess, name: str, setting: str, args: argparse.Namespace, out: Path, f: Figures, round_: int
) -> None:
    url = server.http_url if args.protocol == "http" else server.grpc_url
    folder = out / f"{name}-{setting}"
    folder.mkdir(exist_ok=True)
    extra = ["--input-data", str(out / f"{name}.json")]
    run = perf.run_perf(name, args.protocol, url, args.concurrency, args.interval_ms, folder, extra)
    if run.infer_per_s:
        f.infer_per_s.append(run.infer_per_s)
        f.p50_ms.append(run.latency_ms.get("p50", float("nan")))
    print(f"round {round_ + 1} {name} cache {setting}: {run.infer_per_s} infer/s {run.error or ''}", flush=True)


def report(
    args: argparse.Namespace, figures: dict[tuple[str, str], Figures], counts: dict[str, tuple[int, int]]
) -> None:
    print(
        f"{args.protocol} c={args.concurrency}, {args.distinct} distinct inputs repeated, {args.rounds} rounds, "
        "perf_analyzer, medians:"
    )
    for name in args.models:
        on, off = figures[(name, "on")], figures[(name, "off")]
        if not on.infer_per_s or not off.infer_per_s:
            print(f"  {name}: a setting had no successful run")
            continue
        rate_on, rate_off = statistics.median(on.infer_per_s), statistics.median(off.infer_per_s)
        hits, misses = counts[name]
        print(
            f"  {name}: cache on {rate_on:,.0f} infer/s (p50 {statistics.median(on.p50_ms):.2f} ms), "
            f"off {rate_off:,.0f} infer/s (p50 {statistics.median(off.p50_ms):.2f} ms), on/off = "
            f"{rate_on / rate_off:.2f}x; hits {hits:,} misses {misses:,}"
        )


if __name__ == "__main__":
    sys.exit(main())
