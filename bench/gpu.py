"""GPU benchmark for a session with an NVIDIA GPU: the in-process onnxruntime CUDA ceiling, then the server.

Usage: python -m bench.gpu [--quick] [--batches 1,64,256] [--concurrency 16,64] [--instances 2]
                         [--variants plain,graphs] [--skip-server]

1. Builds a ResNet-50-sized CNN (random weights) and times onnxruntime's CUDA provider in-process at each batch
   size four ways: ``session.run`` with host arrays (copies both ways every run), IO binding from pageable host
   arrays, IO binding from pinned host memory (the server's batched path: a plain DMA upload), and IO binding
   with the data resident on the GPU (the compute ceiling).
2. Starts the server on KIND_GPU configs (optimizer off, so the same file is served), one model per variant:
   "plain" (resnet50) and "graphs" (resnet50_graphs, with ``optimization { cuda { graphs: true } }``), and runs
   perf_analyzer over gRPC and HTTP at each concurrency against each; a Python gRPC client stands in when
   perf_analyzer cannot run. The table notes each variant's instances: pinned staging, CUDA graph batch sizes.

Results go to $OUT (default bench/out/gpu): results.json, results.md and server.log; the table is printed last.
Scratch files (model, repository, perf_analyzer CSVs and logs, caches) go to --work, not $OUT: the device tool
brings back at most 8 files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import models, perf, report
from bench.ort_ceiling import Point
from bench.serving import ServerProcess, get_json, http_get, stats_delta

ROOT = Path(__file__).resolve().parent.parent
MODEL = "resnet50"
VARIANTS = {"plain": MODEL, "graphs": f"{MODEL}_graphs"}
"""Server variant -> the model (and folder) name it is served under."""
PROTOCOLS = ("grpc", "http")
MODES = {
    "host": "ORT CUDA, host arrays (session.run)",
    "iobinding": "ORT CUDA, IO binding from host (the server's path)",
    "pinned": "ORT CUDA, IO binding from pinned host memory (the server's batched path)",
    "device": "ORT CUDA, IO binding, data on the GPU",
}
CUDA = "CUDAExecutionProvider"
WARMUP_CALLS = 3
REPEATS = 3
LOG_TAIL_BYTES = 4 * 2**20
UTILIZATION_SERIES = re.compile(r'optiserve_gpu_utilization_ratio\{gpu="(\d+)"\}')


def out_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$OUT when set (the device tool brings it back), else bench/out/gpu."""
    env = os.environ if environ is None else environ
    return Path(env.get("OUT") or ROOT / "bench" / "out" / "gpu")


def _ints(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _variants(text: str) -> list[str]:
    values = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [value for value in values if value not in VARIANTS]
    if not values or unknown:
        raise argparse.ArgumentTypeError(f"expected some of {', '.join(VARIANTS)} separated by commas, got {text!r}")
    return values


def parse_args(argv: list[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s timing windows instead of 2 s")
    parser.add_argument("--batches", type=_ints, default=[1, 64, 256], help="in-process batch sizes")
    parser.add_argument("--concurrency", type=_ints, default=[16, 64], help="perf_analyzer concurrency levels")
    parser.add_argument("--instances", type=int, default=2, help="server instances per GPU (instance_group count)")
    parser.add_argument(
        "--variants", type=_variants, default=["plain", "graphs"], help="server variants: plain, graphs (CUDA graphs)"
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="the served model's max_batch_size")
    parser.add_argument("--queue-delay-us", type=int, default=200, help="dynamic_batching max_queue_delay")
    parser.add_argument("--base-width", type=int, default=64, help="64 = ResNet-50; smaller for a smoke run")
    parser.add_argument(
        "--kind", choices=("KIND_GPU", "KIND_AUTO", "KIND_CPU"), default="KIND_GPU", help="KIND_CPU: smoke run only"
    )
    parser.add_argument("--out", type=Path, default=out_dir(environ))
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "out" / "gpu-work")
    parser.add_argument("--skip-raw", action="store_true", help="skip the in-process ceiling")
    parser.add_argument("--skip-server", action="store_true", help="skip the server runs")
    return parser.parse_args(argv)


def model_config(
    max_batch_size: int, instances: int, queue_delay_us: int, kind: str = "KIND_GPU", *, graphs: bool = False
) -> str:
    """The served config: fixed image dims (so TensorRT gets a profile), dynamic batching, instances per GPU;
    ``graphs`` asks for CUDA graphs under the "graphs" variant's name (a config's name must match its folder)."""
    config = (
        f'name: "{VARIANTS["graphs" if graphs else "plain"]}"\n'
        f"max_batch_size: {max_batch_size}\n"
        'input [ { name: "input" data_type: TYPE_FP32 dims: [ 3, 224, 224 ] } ]\n'
        'output [ { name: "output" data_type: TYPE_FP32 dims: [ 1000 ] } ]\n'
        f"dynamic_batching {{ max_queue_delay_microseconds: {queue_delay_us} }}\n"
        f"instance_group [ {{ kind: {kind} count: {instances} }} ]\n"
    )
    return config + ("optimization { cuda { graphs: true } }\n" if graphs else "")


def model_file(work: Path) -> Path:
    """The built ONNX file, outside the repository: the ceiling times it whichever variants are served."""
    return work / "model.onnx"


def write_repo(work: Path, args: argparse.Namespace) -> Path:
    """work/repo/<variant's model>/{config.pbtxt,1/model.onnx} per variant, rebuilt each run (a few seconds):
    the model is built and saved once, then its bytes are copied into each folder."""
    repo = work / "repo"
    shutil.rmtree(repo, ignore_errors=True)
    onnx.save(models.build_resnet50_like(args.base_width), str(model_file(work)))
    data = model_file(work).read_bytes()
    for variant in args.variants:
        folder = repo / VARIANTS[variant]
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(data)
        config = model_config(
            args.max_batch_size, args.instances, args.queue_delay_us, args.kind, graphs=variant == "graphs"
        )
        (folder / "config.pbtxt").write_text(config)
    return repo


# ---- the in-process ceiling -----------------------------------------------------------------------------------
def cuda_session(model_path: Path) -> Any:
    """A CUDA session on GPU 0 with the options the server gives its GPU instances."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    options = {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "do_copy_in_default_stream": "True"}
    session = ort.InferenceSession(str(model_path), providers=[(CUDA, options), "CPUExecutionProvider"])
    if session.get_providers()[0] != CUDA:
        raise RuntimeError(f"the CUDA provider did not load: running on {session.get_providers()}")
    return session


def make_call(session: Any, mode: str, batch: int) -> Callable[[], None]:
    """One timed call of ``mode`` at ``batch`` (input 'input', output 'output', float32 images)."""
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    if mode == "host":

        def copied() -> None:
            session.run(None, {"input": x})

        return copied
    if mode == "iobinding":
        return _bound_call(session, x)
    if mode == "pinned":
        return _bound_call(session, pinned_copy(x))
    resident = session.io_binding()
    resident.bind_ortvalue_input("input", ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    resident.bind_output("output", "cuda", 0)
    return lambda: session.run_with_iobinding(resident)  # Run waits for the GPU before it returns


def _bound_call(session: Any, x: np.ndarray) -> Callable[[], None]:
    """Bind host array ``x`` as the input, run, and copy the output back: what the server does per batch."""

    def bound() -> None:
        binding = session.io_binding()
        binding.bind_cpu_input("input", x)
        binding.bind_output("output", "cuda", 0)
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()

    return bound


def pinned_copy(x: np.ndarray) -> np.ndarray:
    """``x`` copied once into page-locked memory, as the server stages its batches: the upload is then a plain
    DMA, without the driver's bounce through its own pinned buffer. Raises when memory cannot be pinned."""
    from server.backends.pinned import PinnedHost

    host = PinnedHost.shared()
    if host is None:
        raise RuntimeError("no CUDA runtime here can pin host memory (PinnedHost.shared() is None)")
    staged = host.empty(x.shape, x.dtype)
    if staged is None:
        raise RuntimeError(f"cudaHostAlloc refused {x.nbytes:,} bytes of pinned host memory")
    staged[...] = x
    return staged


def time_calls(call: Callable[[], None], batch: int, seconds: float) -> Point:
    """Median over REPEATS windows of back-to-back calls, after a warm-up (cuDNN picks kernels on first use)."""
    for _ in range(WARMUP_CALLS):
        call()
    windows = []
    for _ in range(REPEATS):
        latencies: list[float] = []
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline or len(latencies) < WARMUP_CALLS:
            start = time.perf_counter()
            call()
            latencies.append(time.perf_counter() - start)
        windows.append(summarise(batch, latencies))
    return Point(
        batch=batch,
        p50_ms=statistics.median(w.p50_ms for w in windows),
        p99_ms=statistics.median(w.p99_ms for w in windows),
        calls_per_s=statistics.median(w.calls_per_s for w in windows),
    )


def summarise(batch: int, latencies: list[float]) -> Point:
    """p50/p99 in ms and calls per second of one window."""
    ms = np.asarray(latencies) * 1e3
    return Point(batch, float(np.percentile(ms, 50)), float(np.percentile(ms, 99)), len(ms) / float(ms.sum() / 1e3))


def measure_ceiling(model_path: Path, batches: list[int], window_s: float) -> list[dict[str, Any]]:
    """Every (mode, batch) point; one that fails (out of memory, say) is recorded and the rest still run."""
    session = cuda_session(model_path)
    rows = []
    for mode in MODES:
        for batch in batches:
            row: dict[str, Any] = {"mode": mode, "batch": batch}
            try:
                row |= time_calls(make_call(session, mode, batch), batch, window_s).as_dict()
            except Exception as exc:  # keep measuring the other points
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(f"[ceiling] {mode:>9} b={batch:<4} {_point_text(row)}", flush=True)
            rows.append(row)
    return rows


def _point_text(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"FAILED {row['error']}"
    return f"{row['samples_per_s']:,.0f} img/s, p50 {row['p50_ms']:.2f} ms"


# ---- the server ------------------------------------------------------------------------------------------------
def perf_analyzer_works() -> str | None:
    """None when perf_analyzer runs here, else why not (it needs libb64 and libcudart.so.12)."""
    path = perf.perf_analyzer_path()
    if not os.access(path, os.X_OK):
        return f"no perf_analyzer at {path} (set PERF_ANALYZER)"
    try:
        done = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{path}: {exc}"
    text = done.stdout + done.stderr
    if "error while loading shared libraries" in text:
        return f"{path}: {text.strip().splitlines()[-1]}"
    return None


def gpu_metrics(text: str) -> dict[str, float]:
    """The ``optiserve_gpu_*`` samples of a /metrics answer, by series."""
    found = {}
    for line in text.splitlines():
        if line.startswith("optiserve_gpu_"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


class MetricsSampler:
    """Scrapes the server's /metrics every ``period_s`` while a load runs: NVML's utilization is an average
    over its last sampling period, so one scrape after the run would miss the busy part."""

    def __init__(self, url: str, period_s: float = 0.5) -> None:
        self.url, self.period_s = url, period_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> MetricsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                status, body = http_get(self.url, timeout=2.0)
            except OSError:
                continue
            if status == 200:
                self.samples.append(gpu_metrics(body.decode()))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per series: mean and max over the samples taken."""
        return summarise_samples(self.samples)


def summarise_samples(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and max of every series seen in ``samples``."""
    series = sorted({name for sample in samples for name in sample})
    summary = {}
    for name in series:
        values = [sample[name] for sample in samples if name in sample]
        summary[name] = {"mean": statistics.fmean(values), "max": max(values)}
    return summary


def python_grpc_load(url: str, model: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """A closed-loop tritonclient gRPC load at batch 1, for when perf_analyzer cannot run."""
    import tritonclient.grpc as grpcclient

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        client = grpcclient.InferenceServerClient(url)
        tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            try:
                client.infer(model, [tensor])
            except Exception as exc:
                with lock:
                    errors.append(str(exc)[:200])
                return
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result: dict[str, Any] = {"protocol": "grpc", "concurrency": concurrency, "client": "python tritonclient.grpc"}
    if not latencies:
        return {**result, "error": errors[0] if errors else "no request completed"}
    ms = np.asarray(latencies) * 1e3
    return {
        **result,
        "infer_per_s": len(ms) / seconds,
        "latency_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))},
        "error": errors[0] if errors else None,
    }


def model_state(index: list[dict[str, Any]], model: str) -> tuple[str, str]:
    """(state, reason) of ``model`` in a repository index answer; ("", "") while it is not listed."""
    for row in index:
        if row.get("name") == model:
            return str(row.get("state", "")), str(row.get("reason", ""))
    return "", ""


def wait_loaded(http_url: str, model: str, timeout_s: float, alive: Callable[[], None]) -> float:
    """Seconds until ``model`` is READY; raises at once when it failed to load (readiness alone would wait out
    the whole timeout, wasting the device's minutes) or when the server died."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        alive()
        try:
            request = urllib.request.Request(f"http://{http_url}/v2/repository/index", data=b"{}", method="POST")
            with urllib.request.urlopen(request, timeout=5) as response:
                state, reason = model_state(json.loads(response.read()), model)
        except (OSError, ValueError):
            state, reason = "", ""
        if state == "READY":
            return time.monotonic() - started
        if state == "UNAVAILABLE" and reason not in ("", "not loaded", "unloaded"):  # before/after a load
            raise RuntimeError(f"model {model} failed to load: {reason}")
        time.sleep(0.25)
    raise TimeoutError(f"model {model} not ready after {timeout_s:.0f} s")


def measure_server(args: argparse.Namespace, repo: Path, window_s: float, results: dict[str, Any]) -> None:
    """Start the server, record where each variant's instances run, drive each variant, and always stop it."""
    log_path = args.work / "server.log"
    extra = ("--default-precision", "none", "--cache-dir", str(args.work / "cache"))
    server = ServerProcess(sys.executable, repo, log_path, cwd=ROOT, extra_args=extra)
    print(f"[server] {' '.join(server.cmd)}", flush=True)
    missing = perf_analyzer_works()
    results["perf_analyzer"] = missing or "ok"
    try:
        with server:
            results["server_ready_s"] = wait_all_loaded(server, args.variants, 600)
            results["instances"] = {}
            for variant in args.variants:
                optimization = get_json(f"http://{server.http_url}/v2/models/{VARIANTS[variant]}/optimization")
                results["instances"][variant] = optimization.get("instances", [])
            print(f"[server] ready after {results['server_ready_s']:.1f} s: {results['instances']}", flush=True)
            (args.work / "perf").mkdir(exist_ok=True)
            for variant in args.variants:
                for concurrency in args.concurrency:
                    for protocol in PROTOCOLS:
                        if missing is not None and protocol != "grpc":
                            continue
                        run = server_point(server, args, variant, protocol, concurrency, window_s, missing is None)
                        results["server"].append(run)
                        print(f"[server] {_run_text(run)}", flush=True)
    finally:
        _copy_tail(log_path, args.out / "server.log")


def wait_all_loaded(server: ServerProcess, variants: list[str], timeout_s: float) -> float:
    """Seconds until every variant's model is READY (they load side by side, so this is the slowest one's time),
    all within one ``timeout_s``."""
    started = time.monotonic()
    for variant in variants:
        left = max(1.0, timeout_s - (time.monotonic() - started))
        wait_loaded(server.http_url, VARIANTS[variant], left, server._check_alive)
    return time.monotonic() - started


def server_point(
    server: ServerProcess,
    args: argparse.Namespace,
    variant: str,
    protocol: str,
    concurrency: int,
    window_s: float,
    perf_analyzer: bool,
) -> dict[str, Any]:
    """One load on ``variant``'s model, by perf_analyzer or else the Python gRPC client, with the GPU metrics
    sampled while it ran."""
    from bench.run import perf_point

    model = VARIANTS[variant]
    with MetricsSampler(f"http://{server.http_url}/metrics") as sampler:
        if perf_analyzer:
            run = perf_point(server, model, protocol, concurrency, int(window_s * 1000), args.work)
            run["client"] = "perf_analyzer"
        else:
            before = server.model_stats(model)
            run = python_grpc_load(server.grpc_url, model, concurrency, max(window_s * 3, 5.0))
            run["stats_delta"] = stats_delta(before, server.model_stats(model))
    run["gpu_metrics"] = sampler.summary()
    run["variant"] = variant
    return run


def _run_text(run: dict[str, Any]) -> str:
    head = f"{run.get('variant', 'plain'):>6} {run['protocol']:>4} c={run['concurrency']:<3}"
    if run.get("error"):
        return f"{head} FAILED {run['error']}"
    latency = run.get("latency_ms") or {}
    return f"{head} {run['infer_per_s']:,.0f} infer/s, p50 {latency.get('p50', float('nan')):.2f} ms"


def _copy_tail(source: Path, target: Path) -> None:
    """The last LOG_TAIL_BYTES of the server log (a file brought back is capped at 16 MiB)."""
    try:
        data = source.read_bytes()
    except OSError:
        return
    target.write_bytes(data[-LOG_TAIL_BYTES:])


# ---- the report ------------------------------------------------------------------------------------------------
def render(results: dict[str, Any]) -> str:
    """Markdown: the ceiling (img/s per batch size and mode), then the server runs."""
    lines = [f"GPU benchmark, {results['machine'].get('date', '')}: {results.get('gpu', '?')}", ""]
    ceiling = results.get("ceiling") or []
    batches = sorted({row["batch"] for row in ceiling})
    if batches:
        lines += ["| in-process (img/s) | " + " | ".join(f"bs={b}" for b in batches) + " |"]
        lines += ["|---|" + "---|" * len(batches)]
        for mode, title in MODES.items():
            cells = {row["batch"]: row for row in ceiling if row["mode"] == mode}
            lines.append(f"| {title} | " + " | ".join(_cell(cells.get(b)) for b in batches) + " |")
        lines.append("")
    runs = results.get("server") or []
    if runs:
        lines += ["| server (batch 1 requests) | client | infer/s | p50 ms | p99 ms | GPU busy | batches formed |"]
        lines += ["|---|---|---|---|---|---|---|"]
        lines += [_server_row(run) for run in runs]
        lines.append("")
    if isinstance(results.get("server_ready_s"), (int, float)):
        lines.append(f"server ready after {results['server_ready_s']:.1f} s (all variants)")
    for variant, instances in _instances_by_variant(results.get("instances")).items():
        if instances:
            lines.append(f"instances ({variant}): " + "; ".join(_instance_text(i) for i in instances))
    if results.get("server_error"):
        lines.append(f"server error: {results['server_error']}")
    return "\n".join(lines)


def _instances_by_variant(instances: Any) -> dict[str, list[dict[str, Any]]]:
    """Variant -> instances; an older result's plain list is the only variant it served, "plain"."""
    if isinstance(instances, list):
        return {"plain": instances}
    return dict(instances or {})


def _instance_text(instance: dict[str, Any]) -> str:
    """'#0 gpu:0 CUDAExecutionProvider>CPUExecutionProvider pinned graphs 1,2,4' (or 'no graphs: why')."""
    words = [f"#{instance['index']}", str(instance["device"]), ">".join(instance["providers"])]
    if instance.get("pinned_host_buffers"):
        words.append("pinned")
    if instance.get("cuda_graphs"):
        sizes = instance.get("cuda_graph_batch_sizes") or []
        words.append("graphs " + (",".join(str(size) for size in sizes) or "(fixed shapes)"))
    if instance.get("cuda_graphs_off"):
        words.append("no graphs: " + " ".join(str(instance["cuda_graphs_off"]).split()))
    return " ".join(words)


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "—"
    return "failed" if "error" in row else f"{row['samples_per_s']:,.0f}"


def _server_row(run: dict[str, Any]) -> str:
    name = f"{run.get('variant', 'plain')} {run['protocol']} c={run['concurrency']}"
    if run.get("error"):
        error = " ".join(str(run["error"]).split()).replace("|", "/")[:120]
        return f"| {name} | {run.get('client', '?')} | failed: {error} | | | | |"
    latency = run.get("latency_ms") or {}
    return (
        f"| {name} | {run.get('client', '?')} | {run['infer_per_s']:,.0f} | {_ms(latency.get('p50'))} "
        f"| {_ms(latency.get('p99'))} | {_busy(run.get('gpu_metrics') or {})} "
        f"| {report.format_batches(run.get('stats_delta'))} |"
    )


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _busy(summary: dict[str, dict[str, float]]) -> str:
    """Mean GPU utilization during the run, per GPU ("gpu0 83%")."""
    cells = []
    for name, stats in summary.items():
        found = UTILIZATION_SERIES.fullmatch(name)
        if found:
            cells.append(f"gpu{found.group(1)} {stats['mean']:.0%}")
    return ", ".join(cells) or "—"


def gpu_name() -> str:
    """The first GPU's name from NVML, or '?'."""
    try:
        from optimizers.device import probe_gpus

        gpus = probe_gpus()
    except Exception:
        return "?"
    return gpus[0].name if gpus else "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out, args.work = args.out.resolve(), args.work.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    window_s = 1.0 if args.quick else 2.0
    results: dict[str, Any] = {
        "machine": report.machine_info(),
        "gpu": gpu_name(),
        "settings": {key: str(value) for key, value in vars(args).items()},
        "ceiling": [],
        "server": [],
    }
    repo = write_repo(args.work, args)
    status = 0
    if not args.skip_raw:
        try:
            results["ceiling"] = measure_ceiling(model_file(args.work), args.batches, window_s)
        except Exception as exc:
            results["ceiling_error"] = f"{type(exc).__name__}: {exc}"
            print(f"[ceiling] FAILED: {results['ceiling_error']}", file=sys.stderr, flush=True)
            status = 1
    if not args.skip_server:
        try:
            measure_server(args, repo, window_s, results)
        except Exception as exc:
            results["server_error"] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"[server] FAILED: {results['server_error']}", file=sys.stderr, flush=True)
            status = 1
    markdown = render(results)
    (args.out / "results.md").write_text(markdown + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + markdown, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
