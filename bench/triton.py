"""optiserve and a real Triton 2.51 side by side: same model files, same perf_analyzer settings, one table.

Usage: python -m bench.triton [--quick] [--repeats N] [--window-s S] [--models mlp,resnet18,image_mean]
Writes <out>/triton.md and <out>/triton.json (default bench/out/); perf_analyzer logs go to <out>/triton-perf/.

Both servers stay up for the whole run and are measured in turns, point by point, in an order that flips on
every repeat, so a noisy minute on this shared machine hits both; each cell is the median of the repeats.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import onnx

from bench import image_mean, models, perf, report
from bench.serving import ServerProcess
from bench.triton_server import TritonServer, ensure_installed, peer_dir

ROOT = Path(__file__).resolve().parent.parent
BUILDERS = {
    "mlp": models.build_mlp,
    "resnet18": models.build_resnet18_like,
    image_mean.NAME: image_mean.build_image_mean,
}
PROTOCOLS = ("grpc", "http")
CONCURRENCIES = (1, 16)
SHM_MODELS = (image_mean.NAME,)
# At c=16 a CNN request waits ~250 ms in the queue: shorter windows can close before any request completes.
MIN_WINDOW_S = {"resnet18": 3.0}
# optiserve serves the file as uploaded (the optimizer off) so both servers run the same graph.
OPTISERVE_ARGS = ("--default-precision", "none", "--allow-client-shm")
SERVERS = ("optiserve", "triton")


class Served(Protocol):
    http_url: str
    grpc_url: str


@dataclass(frozen=True)
class Point:
    """One perf_analyzer setting, run against each server."""

    model: str
    protocol: str
    concurrency: int
    shm: bool = False

    @property
    def label(self) -> str:
        return f"{self.model}_{self.protocol}{'_shm' if self.shm else ''}_c{self.concurrency}"


def points(names: list[str]) -> list[Point]:
    """Every model over both protocols at c=1 and c=16; the SHM_MODELS again with system shared memory."""
    found = [Point(m, p, c) for m in names for p in PROTOCOLS for c in CONCURRENCIES]
    found += [Point(m, p, c, shm=True) for m in names if m in SHM_MODELS for p in PROTOCOLS for c in CONCURRENCIES]
    return found


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.triton", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat of 1 s windows")
    parser.add_argument("--repeats", type=int, default=None, help="runs per point and server (default 3)")
    parser.add_argument("--window-s", type=float, default=None, help="perf_analyzer window (default 3 s)")
    parser.add_argument("--models", default=",".join(BUILDERS), help=f"comma-separated: {', '.join(BUILDERS)}")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--triton-venv", type=Path, default=ROOT / ".venv-triton", help="made by setup.sh if missing")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter that runs optiserve")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - BUILDERS.keys())
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(BUILDERS)}")
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.window_s = args.window_s or (1.0 if args.quick else 3.0)
    return args


def write_models(root: Path, names: list[str]) -> Path:
    """root/<name>/1/model.onnx: optiserve's repository layout, which Triton's serve.sh also reads."""
    shutil.rmtree(root, ignore_errors=True)
    for name in names:
        path = root / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True)
        onnx.save(BUILDERS[name](), str(path))
    return root


def measure(server: Served, point: Point, interval_ms: int, out: Path) -> dict[str, Any]:
    """One perf_analyzer run of ``point`` against ``server``; failures are recorded, not raised."""
    url = server.grpc_url if point.protocol == "grpc" else server.http_url
    extra = ["--shared-memory", "system"] if point.shm else []
    out.mkdir(parents=True, exist_ok=True)
    run = perf.run_perf(point.model, point.protocol, url, point.concurrency, interval_ms, out, extra, point.label)
    return run.as_dict()


def schedule(plan: list[Point], repeats: int) -> Iterator[tuple[int, Point, tuple[str, str]]]:
    """(repeat, point, server order): servers alternate within each point, and who goes first flips with
    every point and every repeat, so neither server is always measured right after the other's load."""
    for repeat in range(repeats):
        for index, point in enumerate(plan):
            first = (repeat + index) % 2
            yield repeat, point, (SERVERS[first], SERVERS[1 - first])


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median infer/s and p50 ms over the successful runs, with how many there were and the errors."""
    good = [r for r in runs if r["error"] is None and r["infer_per_s"] is not None]
    p50s = [r["latency_ms"]["p50"] for r in good if "p50" in r["latency_ms"]]
    return {
        "infer_per_s": statistics.median(r["infer_per_s"] for r in good) if good else None,
        "p50_ms": statistics.median(p50s) if p50s else None,
        "runs": len(good),
        "samples": [r["infer_per_s"] for r in good],
        "errors": [r["error"] for r in runs if r["error"] is not None],
    }


def _cell(summary: dict[str, Any]) -> str:
    if summary["infer_per_s"] is None:
        return "failed"
    p50 = summary["p50_ms"]
    return f"{summary['infer_per_s']:,.0f} ({p50:.2f} ms)" if p50 is not None else f"{summary['infer_per_s']:,.0f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "—"


def render(results: dict[str, Any]) -> str:
    """One markdown table: infer/s (p50) per server and point, and optiserve ÷ Triton on infer/s and p50."""
    machine, settings = results["machine"], results["settings"]
    lines = [
        f"optiserve vs Triton {results['triton_version']} — {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['date']}; perf_analyzer batch-1 requests, {settings['window_s']:g} s windows, "
        f"median of {settings['repeats']} alternating run(s); infer/s (p50).",
        "",
        "| model | protocol | c | optiserve | Triton | optiserve ÷ Triton infer/s (≥ 1: ahead) "
        "| optiserve ÷ Triton p50 (≤ 1: ahead) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["points"]:
        ours, theirs = row["optiserve"], row["triton"]
        protocol = f"{row['protocol']} + system shm" if row["shm"] else row["protocol"]
        lines.append(
            f"| {row['model']} | {protocol} | {row['concurrency']} | {_cell(ours)} | {_cell(theirs)} | "
            f"{_ratio(ours['infer_per_s'], theirs['infer_per_s'])} | {_ratio(ours['p50_ms'], theirs['p50_ms'])} |"
        )
    lines += ["", *_shm_gains(results["points"])]
    failures = [f"{row['model']} {row['protocol']} c={row['concurrency']} {server}: {err}"
                for row in results["points"] for server in SERVERS for err in row[server]["errors"]]  # fmt: skip
    lines += [f"- failed: {report._cell(text)}" for text in failures]
    return "\n".join(lines)


def _shm_gains(rows: list[dict[str, Any]]) -> list[str]:
    """System shared memory's gain over the same point over the socket, per server."""
    plain = {(r["model"], r["protocol"], r["concurrency"]): r for r in rows if not r["shm"]}
    gains = []
    for row in rows:
        base = plain.get((row["model"], row["protocol"], row["concurrency"])) if row["shm"] else None
        if base is None:
            continue
        parts = [f"{s} {_ratio(row[s]['infer_per_s'], base[s]['infer_per_s'])}x" for s in SERVERS]
        gains.append(
            f"- {row['model']} {row['protocol']} c={row['concurrency']}: system shm ÷ socket: {', '.join(parts)}"
        )
    return gains


def run_all(args: argparse.Namespace, servers: dict[str, Served]) -> list[dict[str, Any]]:
    """Every point against both servers, alternating, ``args.repeats`` times; returns one row per point."""
    plan = points(args.models)
    runs: dict[tuple[Point, str], list[dict[str, Any]]] = {}
    for repeat, point, order in schedule(plan, args.repeats):
        for name in order:
            window_ms = int(max(args.window_s, MIN_WINDOW_S.get(point.model, 0.0)) * 1000)
            run = measure(servers[name], point, window_ms, args.out / "triton-perf" / name / f"r{repeat}")
            runs.setdefault((point, name), []).append(run)
            shown = "FAILED " + str(run["error"]) if run["error"] else f"{run['infer_per_s']:,.0f} infer/s"
            print(f"[r{repeat}] {point.label:<28} {name:<9} {shown}", flush=True)
    return [
        {"model": p.model, "protocol": p.protocol, "concurrency": p.concurrency, "shm": p.shm}
        | {name: median_of(runs[(p, name)]) | {"runs_raw": runs[(p, name)]} for name in SERVERS}
        for p in plan
    ]


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_signal)  # so both servers are stopped on the way out
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    peer = peer_dir(ROOT)
    ensure_installed(peer, args.triton_venv.resolve())
    repo = write_models(args.out / "triton-models", args.models)
    ours = ServerProcess(
        args.server_python, repo, args.out / "triton-optiserve.log", cwd=ROOT, extra_args=OPTISERVE_ARGS
    )
    theirs = TritonServer(peer, args.triton_venv.resolve(), repo, args.models, args.out / "triton-tritonserver.log")
    with ours, theirs:
        print(f"[optiserve] {' '.join(ours.cmd)}\n[triton] {' '.join(theirs.cmd)}", flush=True)
        print(f"[ready] optiserve {ours.wait_ready(args.models):.1f} s, Triton {theirs.wait_ready():.1f} s", flush=True)
        rows = run_all(args, {"optiserve": ours, "triton": theirs})
    results = {
        "machine": report.machine_info(),
        "triton_version": "2.51",
        "settings": {
            "repeats": args.repeats,
            "window_s": args.window_s,
            "models": args.models,
            "optiserve_args": list(OPTISERVE_ARGS),
            "triton_cmd": theirs.cmd,
        },
        "points": rows,
    }
    markdown = render(results)
    (args.out / "triton.md").write_text(markdown + "\n")
    (args.out / "triton.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(markdown)
    return 0 if all(row[s]["infer_per_s"] for row in rows for s in SERVERS) else 1


if __name__ == "__main__":
    sys.exit(main())
