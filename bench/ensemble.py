"""What an ensemble costs, or saves: one request to a Triton ensemble vs the client calling its members back to
back (sending each step's output back as the next step's input), at concurrency 1 and 16.

Usage: python -m bench.ensemble [--rounds 5] [--seconds 3] [--protocol grpc|http] [--pipelines image,text]
The pipelines are those of the e2e tests (tests/models/pipelines.py): image = JPEG bytes -> DecodeImage/resize/
normalize -> a small CNN; text = a string -> BertTokenizer -> a small encoder. One server (optimizer off);
each round measures every (pipeline, concurrency) with both ways, alternating which goes first, so a shared
machine's drift hits both alike. The same tritonclient code sends both ways (one client per thread). Prints the
median requests/s and median p50 latency over the rounds, and the ensemble/back-to-back ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from bench.serving import ServerProcess
from tests.models import pipelines

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Pipeline:
    """An ensemble, its input, and its members in order as (model, input name, output name)."""

    ensemble: str
    input_name: str
    output_name: str
    value: np.ndarray
    steps: tuple[tuple[str, str, str], ...]


PIPELINES = {
    "image": Pipeline(
        "image_pipeline",
        "IMAGE",
        "CLASSES",
        np.frombuffer(pipelines.jpeg_bytes(0), np.uint8),
        (("image_preprocess", "jpeg", "pixels"), ("image_classifier", "pixels", "logits")),
    ),
    "text": Pipeline(
        "text_pipeline",
        "TEXT",
        "SENTIMENT",
        np.array([b"the movie was great fun, the plot was awful"], dtype=object),
        (("tokenizer", "text", "input_ids"), ("text_encoder", "input_ids", "logits")),
    ),
}
DATATYPES = {"uint8": "UINT8", "object": "BYTES", "float32": "FP32", "int64": "INT64"}


class Client:
    """One tritonclient (HTTP or gRPC) and the two ways to run a pipeline through it."""

    def __init__(self, protocol: str, url: str) -> None:
        self.module: Any = grpcclient if protocol == "grpc" else httpclient
        self.client = self.module.InferenceServerClient(url)

    def call(self, model: str, name: str, value: np.ndarray, output: str) -> np.ndarray:
        tensor = self.module.InferInput(name, list(value.shape), DATATYPES[value.dtype.name])
        tensor.set_data_from_numpy(value)
        result = self.client.infer(model, [tensor], outputs=[self.module.InferRequestedOutput(output)])
        return np.asarray(result.as_numpy(output))

    def ensemble(self, pipeline: Pipeline) -> np.ndarray:
        return self.call(pipeline.ensemble, pipeline.input_name, pipeline.value, pipeline.output_name)

    def back_to_back(self, pipeline: Pipeline) -> np.ndarray:
        value = pipeline.value
        for model, name, output in pipeline.steps:
            value = self.call(model, name, value, output)
        return value


@dataclass
class Measurement:
    requests_per_s: float
    p50_ms: float


def measure(run: Callable[[Client], object], clients: list[Client], seconds: float) -> Measurement:
    """Every client in its own thread runs ``run`` in a loop for ``seconds`` (after one untimed call each)."""
    latencies: list[list[float]] = [[] for _ in clients]
    start = threading.Barrier(len(clients) + 1)
    deadline = [0.0]

    def worker(index: int, client: Client) -> None:
        run(client)
        start.wait()
        while time.perf_counter() < deadline[0]:
            began = time.perf_counter()
            run(client)
            latencies[index].append(time.perf_counter() - began)

    threads = [threading.Thread(target=worker, args=(i, c)) for i, c in enumerate(clients)]
    for thread in threads:
        thread.start()
    deadline[0] = time.perf_counter() + seconds + 0.05
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    every = [value for values in latencies for value in values]
    return Measurement(len(every) / elapsed, statistics.median(every) * 1000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ensemble", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--protocol", choices=("http", "grpc"), default="grpc")
    parser.add_argument("--pipelines", default="image,text")
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args(argv)
    chosen = [PIPELINES[name] for name in args.pipelines.split(",")]
    levels = [int(c) for c in args.concurrency.split(",")]
    out = Path(tempfile.mkdtemp(prefix="ensemble-bench-"))
    repo = out / "repo"
    repo.mkdir()
    pipelines.write_image_pipeline(repo)
    pipelines.write_text_pipeline(repo)
    server = ServerProcess(
        sys.executable, repo, out / "server.log", cwd=ROOT, extra_args=("--default-precision", "none")
    )
    results: dict[tuple[str, int, str], list[Measurement]] = {}
    with server:
        server.wait_ready([p.ensemble for p in chosen])
        url = server.grpc_url if args.protocol == "grpc" else server.http_url
        clients = [Client(args.protocol, url) for _ in range(max(levels))]
        for pipeline in chosen:  # both ways give the same answer
            np.testing.assert_array_equal(clients[0].ensemble(pipeline), clients[0].back_to_back(pipeline))
        for round_ in range(args.rounds):
            for pipeline in chosen:
                for level in levels:
                    ways = [("ensemble", Client.ensemble), ("back-to-back", Client.back_to_back)]
                    for way, method in ways if round_ % 2 == 0 else ways[::-1]:
                        result = measure(lambda c, m=method, p=pipeline: m(c, p), clients[:level], args.seconds)
                        results.setdefault((pipeline.ensemble, level, way), []).append(result)
                        print(
                            f"round {round_ + 1} {pipeline.ensemble} c={level} {way}: "
                            f"{result.requests_per_s:,.0f} req/s, p50 {result.p50_ms:.2f} ms",
                            flush=True,
                        )
    print(f"\nmedians over {args.rounds} rounds of {args.seconds:g} s, {args.protocol}:")
    print("| pipeline | c | ensemble req/s | back-to-back req/s | ratio | ensemble p50 ms | back-to-back p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for pipeline in chosen:
        for level in levels:
            ens = results[(pipeline.ensemble, level, "ensemble")]
            b2b = results[(pipeline.ensemble, level, "back-to-back")]
            ens_rps = statistics.median(m.requests_per_s for m in ens)
            b2b_rps = statistics.median(m.requests_per_s for m in b2b)
            ens_p50 = statistics.median(m.p50_ms for m in ens)
            b2b_p50 = statistics.median(m.p50_ms for m in b2b)
            print(
                f"| {pipeline.ensemble} | {level} | {ens_rps:,.0f} | {b2b_rps:,.0f} | {ens_rps / b2b_rps:.2f}x | "
                f"{ens_p50:.2f} | {b2b_p50:.2f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
