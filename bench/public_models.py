"""The load-time optimizer on real public ONNX models that pip packages ship inside their wheels.

Usage: python -m bench.public_models --models-dir DIR [--out bench/out] [--max-mb 50]

DIR holds one folder per package, named ``<package>-<version>``, with the ``.onnx`` files from its wheel
(nothing is downloaded at run time; the files are found by the user). The models used in BENCHMARKS.md
section 7 were made like this::

    pip download --no-deps -d /tmp/pm magika==1.0.3 rapidocr-onnxruntime==1.4.4 silero-vad==6.2.3
    cd /tmp/pm
    unzip -o -j -d DIR/magika-1.0.3 magika-1.0.3-*.whl 'magika/models/standard_v3_3/model.onnx'
    unzip -o -j -d DIR/rapidocr_onnxruntime-1.4.4 rapidocr_onnxruntime-1.4.4-py3-none-any.whl '*.onnx'
    unzip -o -j -d DIR/silero_vad-6.2.3 silero_vad-6.2.3-py3-none-any.whl \\
        silero_vad/data/silero_vad.onnx silero_vad/data/silero_vad_16k_op15.onnx

Each model runs through optimizers.Pipeline as the server does at load time (precision auto, target cpu,
max batch size 32 where dim 0 of every input is symbolic, no samples: the reference inputs are whatever the
pipeline builds itself), with an empty cache per model. Writes OUT/public_models.md and .json, and prints
the table: per model the reference source and its attempts, every candidate with its status, the selected
variant, its speedup over the original (the report's latency before/after of the selected step), its
accuracy figures, and the report's summary.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from optimizers import OptimizeOptions, Pipeline, probe_device

ROOT = Path(__file__).resolve().parent.parent


def find_models(models_dir: Path, max_mb: float) -> list[tuple[str, Path, bool]]:
    """(package-version, path, too big) for every .onnx under DIR, sorted by path."""
    found = []
    for path in sorted(models_dir.rglob("*.onnx")):
        package = path.parent.name if path.parent != models_dir else "?"
        found.append((package, path, path.stat().st_size > max_mb * 1e6))
    return found


def run_model(package: str, path: Path, work: Path, time_budget: float) -> dict[str, Any]:
    """The pipeline's report for one file (or the error it raised) and its wall time."""
    cache = work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    options = OptimizeOptions(precision="auto", target="cpu", max_batch_size=32, time_budget_s=time_budget)
    started = time.monotonic()
    entry: dict[str, Any] = {"package": package, "file": path.name, "size_bytes": path.stat().st_size}
    try:
        result = Pipeline(cache_dir=cache, cache_max_bytes=4 << 30, device=probe_device()).run(
            path, options, name=path.stem
        )
        entry["report"] = result.report
    except Exception as exc:  # a real model may break anything: record it, go on with the next
        entry["error"] = f"{type(exc).__name__}: {exc}"
        entry["traceback"] = traceback.format_exc()
    entry["wall_s"] = time.monotonic() - started
    shutil.rmtree(cache, ignore_errors=True)
    return entry


def _reference(report: dict[str, Any]) -> str:
    ref = report.get("reference") or {}
    attempts = ref.get("attempts") or []
    failed = sum(1 for a in attempts if a.get("error"))
    text = f"{ref.get('source', '?')}, {ref.get('count', 0)} inputs"
    if attempts:
        text += f" ({len(attempts)} attempts, {failed} failed)"
    ran = next((a for a in attempts if a.get("shapes") and not a.get("error")), None)
    if ran:
        shapes = ", ".join(f"{name} {'x'.join(map(str, dims)) or 'scalar'}" for name, dims in ran["shapes"].items())
        values = ", ".join(f"{name}={value}" for name, value in (ran.get("values") or {}).items())
        text += f"; shapes {shapes}" + (f" ({values})" if values else "")
    return text


def _candidates(report: dict[str, Any]) -> str:
    return "<br>".join(f"{s['name']}: {s['status']}" for s in report.get("steps", []))


def _selected_step(report: dict[str, Any]) -> dict[str, Any] | None:
    return next((s for s in report.get("steps", []) if s["name"] == report.get("selected")), None)


def _selected(report: dict[str, Any]) -> str:
    options = report.get("session_options") or {}
    extra = ", ".join(f"{k}={v}" for k, v in options.items())
    return str(report.get("selected", "?")) + (f" + {extra}" if extra else "")


def _speedup(report: dict[str, Any]) -> str:
    """Original (the first measured ``before``) vs what serves: the compile step's ``after`` when it applied
    (it times session settings on the selected variant), else the selected step's ``after``."""
    steps = report.get("steps", [])
    original = next((s["latency_ms"]["before"] for s in steps if (s.get("latency_ms") or {}).get("before")), None)
    compile_step = next((s for s in steps if s["name"] == "compile" and s["status"] == "applied"), None)
    step = _selected_step(report)
    final = (compile_step or step or {}).get("latency_ms", {}).get("after") or original
    if not original or not final:
        return "—"
    return f"{original / final:.2f}x ({original:.3f} → {final:.3f} ms)"


def _accuracy(report: dict[str, Any]) -> str:
    step = _selected_step(report)
    if step is None:
        # Nothing selected: the figures of the candidates that were measured and rejected, for the reading.
        parts = [
            f"{s['name']}: " + ", ".join(f"{k} {v:.4g}" for k, v in s["accuracy"].items())
            for s in report.get("steps", [])
            if s.get("accuracy")
        ]
        return "<br>".join(parts) or "—"
    return ", ".join(f"{k} {v:.4g}" for k, v in (step.get("accuracy") or {}).items()) or "—"


def _cell(text: str, limit: int = 400) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | package | size MB | reference (source, inputs, attempts; shapes that ran) | candidates | selected | "
        "speedup: original → served, median ms at the preferred batch | "
        "accuracy vs original | summary | optimizer s |",
        "|---|---|---:|---|---|---|---|---|---|---:|",
    ]
    for entry in results:
        head = f"| {entry['file']} | {entry['package']} | {entry['size_bytes'] / 1e6:.2f} |"
        if "skipped" in entry:
            lines.append(f"{head} — | — | not run | — | — | {_cell(entry['skipped'])} | — |")
            continue
        if "error" in entry:
            lines.append(f"{head} — | — | error | — | — | {_cell(entry['error'])} | {entry['wall_s']:.1f} |")
            continue
        report = entry["report"]
        lines.append(
            f"{head} {_cell(_reference(report))} | {_candidates(report)} | {_selected(report)} | "
            f"{_speedup(report)} | {_cell(_accuracy(report))} | {_cell(report.get('summary', ''))} | "
            f"{entry['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.public_models", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", type=Path, required=True, help="folders <package>-<version>/*.onnx")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    parser.add_argument("--max-mb", type=float, default=50.0, help="skip files larger than this")
    parser.add_argument("--time-budget", type=float, default=1.5, help="seconds to time each candidate")
    args = parser.parse_args(argv)
    import onnxruntime

    onnxruntime.set_default_logger_severity(3)  # the reference search's failed runs each log an error
    models = find_models(args.models_dir, args.max_mb)
    if not models:
        print(f"no .onnx files under {args.models_dir}", file=sys.stderr)
        return 1
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="optiserve-public-") as tmp:
        for package, path, too_big in models:
            if too_big:
                size = path.stat().st_size
                skipped = f"larger than --max-mb {args.max_mb:g}"
                results.append({"package": package, "file": path.name, "size_bytes": size, "skipped": skipped})
                continue
            entry = run_model(package, path, Path(tmp), args.time_budget)
            report = entry.get("report") or {}
            print(
                f"{package}/{path.name}: {report.get('selected', 'error')} in {entry['wall_s']:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            results.append(entry)
    markdown = render(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "public_models.md").write_text(markdown + "\n")
    (args.out / "public_models.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n" + markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
