"""Benchmark optiserve against the raw onnxruntime ceiling on the same model files.

Usage: python -m bench.run [--quick] [--models mlp,resnet18] [--out bench/out] [--skip-server]
Writes <out>/results.md and <out>/results.json; perf_analyzer logs and CSVs go to <out>/perf/.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench import models, ort_ceiling, perf, report
from bench.serving import ServerProcess, shape_args, stats_delta

ROOT = Path(__file__).resolve().parent.parent
BATCHES = {"mlp": [1, 2, 4, 8, 16, 32, 64], "resnet18": [1, 2, 4, 8, 16, 32]}
PROTOCOLS = ("grpc", "grpc-stream", "http")
CONCURRENCIES = (1, 16)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s timing windows instead of 5 s")
    parser.add_argument("--models", default="mlp,resnet18", help="comma-separated: mlp, resnet18")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--skip-server", action="store_true", help="only measure raw onnxruntime")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter that runs the server")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(args.models) - models.BUILDERS.keys())
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {sorted(models.BUILDERS)}")
    return args


def build_repo(out: Path, names: list[str]) -> Path:
    """A fresh repository holding only the requested models, so the server loads nothing else."""
    repo = out / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    models.write_repo(repo, names)
    return repo


def measure_raw(repo: Path, names: list[str], window_s: float) -> dict[str, dict[str, Any]]:
    """Raw ORT numbers per model, taken before the server starts so nothing competes for the cores."""
    raw = {}
    for name in names:
        print(f"[raw ORT] {name}: batches {BATCHES[name]}, {window_s} s windows", flush=True)
        raw[name] = ort_ceiling.measure_model(repo / name / "1" / "model.onnx", BATCHES[name], window_s)
        lat, best = raw[name]["latency"], raw[name]["best"]
        print(
            f"  b=1 p50 {lat['p50_ms']:.3f} ms, p99 {lat['p99_ms']:.3f} ms, {lat['calls_per_s']:.1f} infer/s;"
            f" best b={best['batch']}: {best['samples_per_s']:.1f} samples/s",
            flush=True,
        )
        gc.collect()  # drop the session (and its weights) before the next model or the server
    return raw


def _snapshot(server: ServerProcess, model: str) -> tuple[dict[str, Any] | None, str | None]:
    try:
        return server.model_stats(model), None
    except (OSError, RuntimeError, ValueError) as err:
        return None, str(err)


def perf_point(
    server: ServerProcess, model: str, protocol: str, concurrency: int, interval_ms: int, out: Path
) -> dict[str, Any]:
    """One perf_analyzer run bracketed by statistics snapshots, to see which batch sizes the server ran."""
    url = server.grpc_url if protocol.startswith("grpc") else server.http_url
    try:
        extra = shape_args(server.model_config(model))
    except (OSError, RuntimeError, ValueError) as err:
        extra = []
        print(f"  (model config unavailable: {err})", flush=True)
    before, err_before = _snapshot(server, model)
    run = perf.run_perf(model, protocol, url, concurrency, interval_ms, out / "perf", extra).as_dict()
    after, err_after = _snapshot(server, model)
    run["stats_delta"] = stats_delta(before, after) if before and after else None
    run["stats_error"] = err_before or err_after
    return run


def _print_run(run: dict[str, Any]) -> None:
    head = f"  {run['protocol']:>4} c={run['concurrency']:<2}"
    if run["error"]:
        print(f"{head} FAILED {run['error']}", flush=True)
        return
    lat = run["latency_ms"]
    batches = report.format_batches(run["stats_delta"])
    print(
        f"{head} p50 {lat.get('p50', float('nan')):.3f} ms, p99 {lat.get('p99', float('nan')):.3f} ms, "
        f"{run['infer_per_s']:.1f} infer/s; batches: {batches}",
        flush=True,
    )


def variants(out: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Two servers: the model as uploaded (the serving-overhead comparison: the same file raw ORT runs), and
    the model after the load-time optimizer (what a user gets by default), with a fresh cache."""
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    return [
        ("as uploaded", ("--default-precision", "none")),
        ("optimized", ("--default-precision", "auto", "--cache-dir", str(cache))),
    ]


def measure_server(args: argparse.Namespace, repo: Path, interval_ms: int, results: dict[str, Any]) -> None:
    """For each variant start the server, run every perf_analyzer point, and always stop the server again."""
    (args.out / "perf").mkdir(parents=True, exist_ok=True)
    for variant, extra in variants(args.out):
        log = args.out / f"server-{variant.replace(' ', '-')}.log"
        server = ServerProcess(args.server_python, repo, log, cwd=ROOT, extra_args=extra)
        print(f"[server: {variant}] {' '.join(server.cmd)}", flush=True)
        with server:
            took = server.wait_ready(args.models)
            print(f"[server: {variant}] ready after {took:.1f} s", flush=True)
            results.setdefault("server_ready_s", {})[variant] = took
            for name in args.models:
                selected = _selected_variant(server, name)
                print(f"[perf_analyzer] {name} ({variant}: {selected})", flush=True)
                for concurrency in CONCURRENCIES:
                    for protocol in PROTOCOLS:
                        run = perf_point(server, name, protocol, concurrency, interval_ms, args.out)
                        run["variant"] = variant if variant == "as uploaded" else f"{variant}: {selected}"
                        results["models"][name]["server"].append(run)
                        _print_run(run)
        results.setdefault("server_exit_code", {})[variant] = server.proc.returncode if server.proc else None


def _selected_variant(server: ServerProcess, model: str) -> str:
    """What the optimizer chose for this model (its report's ``selected``)."""
    from bench.serving import get_json

    try:
        return str(get_json(f"http://{server.http_url}/v2/models/{model}/optimization").get("selected", "?"))
    except (OSError, RuntimeError, ValueError):
        return "?"


def write_outputs(out: Path, results: dict[str, Any]) -> str:
    markdown = report.render(results)
    (out / "results.md").write_text(markdown + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return markdown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    window_s = 2.0 if args.quick else 5.0
    results: dict[str, Any] = {
        "machine": report.machine_info(),
        "settings": {
            "mode": "quick" if args.quick else "normal",
            "window_s": window_s,
            "models": args.models,
        },
        "models": {name: {"server": []} for name in args.models},
    }
    repo = build_repo(args.out, args.models)
    for name, raw in measure_raw(repo, args.models, window_s).items():
        results["models"][name]["raw_ort"] = raw
    status = 0
    if not args.skip_server:
        try:
            measure_server(args, repo, int(window_s * 1000), results)
        except (OSError, RuntimeError, TimeoutError) as err:
            results["server_error"] = f"{type(err).__name__}: {err}"
            print(f"[server] FAILED: {results['server_error']}", file=sys.stderr, flush=True)
            status = 1
    print("\n" + write_outputs(args.out, results))
    print(f"wrote {args.out / 'results.md'} and {args.out / 'results.json'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
