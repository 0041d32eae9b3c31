"""On-demand loading under a memory budget: the first request's latency for a model that is not loaded, with and
without cached optimizer artifacts, and what each model holds in memory next to its file size.

Usage: python -m bench.memory [--models mlp,resnet18,transformer] [--repeats 3] [--out bench/out]

Per model and repeat, each on a fresh server started with ``--load-on-demand`` (so nothing is loaded at start):
- cold, background: an empty optimizer cache, the default ``--optimize-mode background``: the first request
  waits for the original model's load only; the optimizer runs afterwards (waited for, so the cache is filled);
- cold, before_ready: an empty cache, ``--optimize-mode before_ready``: the first request waits for the whole
  optimization, as a load without background optimization would;
- cached: a new server on the cache the background run filled: the first request loads the optimizer's variant
  straight from the cache (what a model evicted by the memory budget costs to bring back after a restart; within
  one process a reload also skips re-measuring).
Memory: the optimization report's ``memory`` (RSS and malloc growth of the sessions and their warmup) for the
original model and for the variant served after optimization, next to the model file's size.
Writes <out>/memory.md and <out>/memory.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import models
from bench.ready import FINAL, phase, wait_for
from bench.serving import ServerProcess, get_json

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024
NO_TRAFFIC_WAIT = ("--optimize-traffic-wait-s", "0")
FLOAT_TYPES = {onnx.TensorProto.FLOAT: ("FP32", np.float32), onnx.TensorProto.INT64: ("INT64", np.int64)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet18,transformer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


def request_body(model_path: Path) -> bytes:
    """A batch-1 JSON request of zeros for every input of the model (dynamic dims as 1)."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    inputs = []
    for tensor in graph.input:
        if tensor.name in initializers:
            continue
        kind = tensor.type.tensor_type
        datatype, dtype = FLOAT_TYPES[kind.elem_type]
        shape = [d.dim_value if d.dim_value > 0 else 1 for d in kind.shape.dim]
        data = np.zeros(shape, dtype=dtype).ravel().tolist()
        inputs.append({"name": tensor.name, "shape": shape, "datatype": datatype, "data": data})
    return json.dumps({"inputs": inputs}).encode()


def first_request_s(server: ServerProcess, name: str, body: bytes) -> float:
    """Seconds for the first inference request of a model that is not loaded (it loads it)."""
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{name}/infer",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=600) as reply:
        reply.read()
        if reply.status != 200:
            raise RuntimeError(f"{name}: first request answered {reply.status}")
    return time.monotonic() - started


def memory(server: ServerProcess, name: str) -> dict[str, Any]:
    report = get_json(f"http://{server.http_url}/v2/models/{name}/optimization")
    return {"selected": report.get("selected", "original"), **report.get("memory", {})}


def one_model(args: argparse.Namespace, work: Path, name: str, repeat: int) -> dict[str, Any]:
    repo = work / f"repo-{name}"
    if not repo.exists():
        models.write_repo(repo, [name])
    body = request_body(repo / name / "1" / "model.onnx")
    row: dict[str, Any] = {"file_bytes": (repo / name / "1" / "model.onnx").stat().st_size}
    for mode in ("before_ready", "background"):
        cache = work / f"cache-{name}-{mode}-{repeat}"
        shutil.rmtree(cache, ignore_errors=True)
        # No wait for request samples (the optimizer's traffic reference): this measures loads, not traffic.
        flags = ("--load-on-demand", "--cache-dir", str(cache), "--optimize-mode", mode, *NO_TRAFFIC_WAIT)
        with ServerProcess(args.server_python, repo, work / f"{name}-{mode}.log", ROOT, flags) as server:
            server.wait_ready([])
            row[f"cold_{mode}_s"] = first_request_s(server, name, body)
            if mode == "background":
                row["original"] = memory(server, name)
                wait_for(lambda s, n: phase(s, n) in FINAL, server, name)
                row["served"] = memory(server, name)
    flags = ("--load-on-demand", "--cache-dir", str(work / f"cache-{name}-background-{repeat}"))
    with ServerProcess(args.server_python, repo, work / f"{name}-cached.log", ROOT, flags) as server:
        server.wait_ready([])
        row["cached_s"] = first_request_s(server, name, body)
        row["cached"] = memory(server, name)
    print(f"{name} #{repeat}: {json.dumps(row)}", flush=True)
    return row


def render(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| model | file | memory, original | memory, as optimized (variant) | first request: cold, background "
        "| cold, before_ready | cached artifacts |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, rows in results.items():

        def median(key: str, rows: list[dict[str, Any]] = rows) -> float:
            return statistics.median(r[key] for r in rows)

        def mib(part: str, rows: list[dict[str, Any]] = rows) -> str:
            return f"{statistics.median(r[part]['resident_bytes'] for r in rows) / MIB:.1f} MiB"

        lines.append(
            f"| {name} | {rows[0]['file_bytes'] / MIB:.1f} MiB | {mib('original')} | {mib('served')} "
            f"({rows[-1]['served']['selected']}) | {median('cold_background_s'):.2f} s "
            f"| {median('cold_before_ready_s'):.2f} s | {median('cached_s'):.2f} s |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.out / "memory"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = {name: [one_model(args, work, name, i) for i in range(args.repeats)] for name in args.models}
    (args.out / "memory.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    (args.out / "memory.md").write_text(text)
    print(text + f"\n{time.monotonic() - started:.0f} s in all, medians of {args.repeats}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
