"""Time to ready vs. time to optimized, and what a background optimization costs the traffic being served.

Usage: python -m bench.ready [--models mlp,resnet18,transformer,digits] [--pairs 3] [--window-ms 3000]
                             [--nice 10,0] [--out bench/out]

1. Each model is uploaded (multipart, as with curl) to a fresh server with an empty cache, once with
   ``--optimize-mode before_ready`` (the old behaviour: LOADING until optimized) and once in the default
   background mode. Upload -> READY is the first 200 from /v2/models/{m}/ready; upload -> optimized is the
   first /v2/models/{m}/optimization whose phase is ``optimized`` or ``original``. One model at a time.
2. Serving under a background optimization: perf_analyzer on the MLP over HTTP at c=16 for a fixed window,
   alternating a window with nothing optimizing and a window while a freshly uploaded ResNet-18 (new bytes
   each time, so the cache misses) is being optimized in the background. Done once per ``--nice`` value
   (``--optimize-nice``; 0 = the optimizer at normal priority). The ratio is busy / idle infer/s.
Writes <out>/ready.md and <out>/ready.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import models, perf
from bench.serving import ServerProcess, get_json, http_get

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.05
FINAL = ("optimized", "original")
TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ready", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet18,transformer,digits")
    parser.add_argument("--pairs", type=int, default=3, help="idle/busy window pairs per --nice value")
    parser.add_argument("--window-ms", type=int, default=3000, help="perf_analyzer measurement window")
    parser.add_argument("--nice", default="10,0", help="--optimize-nice values for the serving comparison")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--server-python", default=sys.executable)
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.nice = [int(n) for n in args.nice.split(",") if n.strip()]
    return args


def model_bytes(name: str, tag: str = "") -> bytes:
    """The bench model's ONNX bytes; ``tag`` goes into doc_string so the same graph is a cache miss."""
    if name == "digits":
        from bench.digits import trained_digits

        model = trained_digits().model
    else:
        model = models.BUILDERS[name]()
    model.doc_string = f"bench.ready {tag}"
    return bytes(model.SerializeToString())


def upload(server: ServerProcess, name: str, data: bytes) -> None:
    """POST /v2/repository/models/{name}/upload as multipart (curl -F model=@model.onnx), without waiting."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"; filename="model.onnx"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + data + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/repository/models/{name}/upload",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        if reply.status != 201:
            raise RuntimeError(f"upload {name}: {reply.status} {reply.read()[:300]!r}")


def phase(server: ServerProcess, name: str) -> str:
    status, body = http_get(f"http://{server.http_url}/v2/models/{name}/optimization", timeout=5.0)
    return str(json.loads(body).get("phase", "")) if status == 200 else ""


def is_ready(server: ServerProcess, name: str) -> bool:
    return http_get(f"http://{server.http_url}/v2/models/{name}/ready")[0] == 200


def optimizing(server: ServerProcess, name: str) -> bool:
    """READY and its background optimization under way (or already over: the window is then flagged)."""
    return is_ready(server, name) and phase(server, name) in ("optimizing", *FINAL)


def finished(server: ServerProcess, name: str) -> bool:
    return phase(server, name) in FINAL


def wait_for(check: Callable[[ServerProcess, str], bool], server: ServerProcess, name: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check(server, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: {check.__name__} not reached in {TIMEOUT_S:.0f} s:\n{server.log_tail()}")
        time.sleep(POLL_S)


def start(args: argparse.Namespace, work: Path, label: str, extra: tuple[str, ...]) -> ServerProcess:
    repo, cache = work / f"repo-{label}", work / f"cache-{label}"
    for folder in (repo, cache):
        shutil.rmtree(folder, ignore_errors=True)
    repo.mkdir(parents=True)
    flags = ("--cache-dir", str(cache), *extra)
    return ServerProcess(args.server_python, repo, work / f"server-{label}.log", ROOT, flags)


def time_to_ready(args: argparse.Namespace, work: Path) -> dict[str, dict[str, Any]]:
    """Per mode and model: seconds from upload to READY and to optimized, and what was selected."""
    blobs = {name: model_bytes(name) for name in args.models}
    results: dict[str, dict[str, Any]] = {}
    for mode in ("before_ready", "background"):
        results[mode] = {}
        with start(args, work, f"ttr-{mode}", ("--optimize-mode", mode)) as server:
            server.wait_ready([])
            for name, data in blobs.items():
                started = time.monotonic()
                upload(server, name, data)
                wait_for(is_ready, server, name)
                ready_s = time.monotonic() - started
                wait_for(finished, server, name)
                optimized_s = time.monotonic() - started
                report = get_json(f"http://{server.http_url}/v2/models/{name}/optimization")
                results[mode][name] = {"ready_s": ready_s, "optimized_s": optimized_s, "selected": report["selected"]}
                print(f"{mode} {name}: ready {ready_s:.2f} s, optimized {optimized_s:.2f} s", flush=True)
    return results


def window(server: ServerProcess, args: argparse.Namespace, out: Path) -> float | None:
    """One fixed perf_analyzer run on the MLP (HTTP, c=16): three windows, always 'stable'."""
    out.mkdir(parents=True, exist_ok=True)
    run = perf.run_perf("mlp", "http", server.http_url, 16, args.window_ms, out, extra=["-s", "1000"])
    if run.error:
        print(f"  perf_analyzer: {run.error}", flush=True)
    return run.infer_per_s


def serving_under_optimization(args: argparse.Namespace, work: Path, nice: int) -> dict[str, Any]:
    """Alternate idle and busy windows on one server; busy = a ResNet-18 upload optimizing in the background."""
    pairs: list[dict[str, Any]] = []
    with start(args, work, f"serve-nice{nice}", ("--optimize-nice", str(nice))) as server:
        server.wait_ready([])
        upload(server, "mlp", model_bytes("mlp"))
        wait_for(finished, server, "mlp")
        window(server, args, work / "perf" / "warmup")  # first traffic: connection pools, batcher sizes
        for i in range(args.pairs):
            idle = window(server, args, work / "perf" / f"nice{nice}-idle{i}")
            name = f"busy{i}"
            upload(server, name, model_bytes("resnet18", tag=f"{nice}-{i}-{time.time()}"))
            wait_for(optimizing, server, name)
            busy = window(server, args, work / "perf" / f"nice{nice}-busy{i}")
            still = phase(server, name) == "optimizing"  # else the window was partly idle: flagged
            wait_for(finished, server, name)
            ratio = busy / idle if busy and idle else None
            pairs.append({"idle": idle, "busy": busy, "ratio": ratio, "optimizing_throughout": still})
            print(f"nice {nice} pair {i}: idle {idle}, busy {busy}, ratio {ratio}, whole window {still}", flush=True)
    ratios = [p["ratio"] for p in pairs if p["ratio"] is not None]
    return {"pairs": pairs, "median_ratio": statistics.median(ratios) if ratios else None}


def render(ttr: dict[str, dict[str, Any]], serving: dict[int, dict[str, Any]]) -> str:
    lines = [
        "| model | before_ready: upload → READY | background: upload → READY | background: upload → optimized "
        "| selected |",
        "|---|---:|---:|---:|---|",
    ]
    for name, old in ttr.get("before_ready", {}).items():
        new = ttr.get("background", {}).get(name, {})
        lines.append(
            f"| {name} | {old['ready_s']:.2f} s | {new.get('ready_s', 0):.2f} s | {new.get('optimized_s', 0):.2f} s "
            f"| {new.get('selected', old['selected'])} |"
        )
    lines += ["", "| --optimize-nice | idle infer/s | busy infer/s | busy / idle | whole window optimizing |"]
    lines.append("|---:|---|---|---|---|")
    for nice, result in serving.items():
        pairs = result["pairs"]
        cells = [", ".join(f"{p[k]:,.0f}" if p[k] else "—" for p in pairs) for k in ("idle", "busy")]
        ratios = ", ".join(f"{p['ratio']:.2f}" if p["ratio"] else "—" for p in pairs)
        median = result["median_ratio"]
        whole = ", ".join("yes" if p["optimizing_throughout"] else "no" for p in pairs)
        lines.append(f"| {nice} | {cells[0]} | {cells[1]} | {ratios} (median {median or 0:.2f}) | {whole} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = args.out / "ready"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    ttr = time_to_ready(args, work)
    serving = {nice: serving_under_optimization(args, work, nice) for nice in args.nice}
    (args.out / "ready.json").write_text(json.dumps({"time_to_ready": ttr, "serving": serving}, indent=2))
    text = render(ttr, serving)
    (args.out / "ready.md").write_text(text)
    print(text + f"\n{time.monotonic() - started:.0f} s in all", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
