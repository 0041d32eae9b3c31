"""The load-time optimizer per model and candidate: latency, throughput, size, accuracy, what was selected,
and load time cold vs cached.

Usage: python -m bench.optimize [--models mlp,resnet18,transformer,digits] [--out bench/out]
Runs optimizers.Pipeline exactly as the server does at load time (precision auto, target cpu), once with an
empty cache and once more as after a restart. The digits model is trained on scikit-learn's digits and
optimized with 256 real training images as samples; its real top-1 accuracy on 540 held-out images is
measured for the original and for the variant served.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from bench import models
from bench.digits import top1_accuracy, trained_digits
from optimizers import OptimizeOptions, Pipeline, probe_device

ROOT = Path(__file__).resolve().parent.parent


def prepare(name: str, folder: Path) -> tuple[Path, Any]:
    """Write the model (and, for digits, real samples); returns its path and the digits data if any."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    if name != "digits":
        onnx.save(models.BUILDERS[name](), str(path))
        return path, None
    digits = trained_digits()
    onnx.save(digits.model, str(path))
    np.savez(folder / "samples.npz", x=digits.x_train[:256])
    return path, digits


def run_model(name: str, out: Path) -> dict[str, Any]:
    work = out / "optimize" / name
    shutil.rmtree(work, ignore_errors=True)
    path, digits = prepare(name, work / "model")
    device = probe_device()
    options = OptimizeOptions(precision="auto", target="cpu", max_batch_size=32)
    started = time.monotonic()
    cold = Pipeline(cache_dir=work / "cache", cache_max_bytes=4 << 30, device=device).run(path, options, name=name)
    cold_s = time.monotonic() - started
    started = time.monotonic()
    warm = Pipeline(cache_dir=work / "cache", cache_max_bytes=4 << 30, device=device).run(path, options, name=name)
    warm_s = time.monotonic() - started
    result: dict[str, Any] = {
        "report": cold.report,
        "cold_s": cold_s,
        "cached_s": warm_s,
        "cache_hit": warm.report["cache_hit"],
    }
    if digits is not None:
        result["top1"] = {"original": top1_accuracy(path, digits.x_test, digits.y_test)}
        result["top1"][cold.report["selected"]] = top1_accuracy(cold.model_path, digits.x_test, digits.y_test)
    print(f"{name}: selected {cold.report['selected']}, cold {cold_s:.1f} s, cached {warm_s:.2f} s", flush=True)
    return result


def _cell(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(results: dict[str, Any], preferred: int = 8) -> str:
    lines = [
        "| model | candidate | status | size MB before → after | latency ms at b=8 before → after | "
        "samples/s after | accuracy vs original | reason |",
        "|---|---|---|---|---|---:|---|---|",
    ]
    for name, result in results.items():
        for step in result["report"]["steps"]:
            size = step.get("size_bytes") or {}
            lat = step.get("latency_ms") or {}
            after = lat.get("after")
            acc = ", ".join(f"{k} {v:.4g}" for k, v in (step.get("accuracy") or {}).items())
            sizes = f"{size['before'] / 1e6:.2f} → {size['after'] / 1e6:.2f}" if size.get("after") else "—"
            lats = f"{_cell(lat.get('before'))} → {_cell(after)}" if after else "—"
            rate = f"{preferred / after * 1000:,.0f}" if after else "—"
            reason = str(step.get("reason", "")).replace("|", "/")[:110]
            lines.append(
                f"| {name} | {step['name']} | {step['status']} | {sizes} | {lats} | {rate} | {acc or '—'} | {reason} |"
            )
    lines += ["", "| model | selected | load cold s | load cached s | cache hit |", "|---|---|---:|---:|---|"]
    for name, result in results.items():
        report = result["report"]
        cells = f"{result['cold_s']:.2f} | {result['cached_s']:.3f} | {result['cache_hit']}"
        lines.append(f"| {name} | {report['selected']} | {cells} |")
    for name, result in results.items():
        if "top1" in result:
            pairs = ", ".join(f"{k} {v:.4f}" for k, v in result["top1"].items())
            lines.append(f"\n{name}: real top-1 on 540 held-out digits: {pairs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.optimize", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,resnet18,transformer,digits")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    args = parser.parse_args(argv)
    results = {name: run_model(name, args.out) for name in args.models.split(",") if name}
    markdown = render(results)
    (args.out / "optimize.md").write_text(markdown + "\n")
    (args.out / "optimize.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
