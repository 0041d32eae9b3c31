"""``optiserve convert MODEL [--framework F] [--sample S.npz] -o model.onnx``: the converter on the user's own
machine, for their own (trusted) files, including the pickle-based formats the server refuses. It prints the
same accuracy comparison the server makes, and writes the ONNX file only when the comparison passes."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from server.convert import formats, guard
from server.convert.archive import saved_model_root
from server.convert.job import ConvertError, Job, Produced
from server.convert.service import _check_onnx, source_size

FRAMEWORKS = ("auto", "torch", "tensorflow", "xgboost", "lightgbm", "sklearn", "torchscript", "keras")
_BY_SUFFIX = {
    ".pt2": "torch",
    ".json": "xgboost",
    ".ubj": "xgboost",
    ".txt": "lightgbm",
    ".pkl": "sklearn",
    ".pickle": "sklearn",
    ".joblib": "sklearn",
    ".pt": "torchscript",
    ".pth": "torchscript",
    ".keras": "keras",
    ".h5": "keras",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``convert`` flags, on any parser (the CLI's own, or a sub-command's)."""
    parser.add_argument("model", type=Path, help="model file, or a SavedModel folder")
    parser.add_argument("--framework", choices=FRAMEWORKS, default="auto", help="default: from the file name")
    parser.add_argument("--sample", type=Path, help=".npz of validation inputs (keys = input names)")
    parser.add_argument("--max-batch-size", type=int, default=None, help="0: no batch dim; >0: dim 0 is dynamic")
    parser.add_argument(
        "--accuracy", action="append", default=[], metavar="METRIC=BUDGET", help="override a budget (rel_l2=1e-4)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the ONNX model")


def guess_framework(path: Path) -> str:
    """The framework of a file by its name (a folder is a SavedModel)."""
    if path.is_dir():
        return "tensorflow"
    framework = _BY_SUFFIX.get(path.suffix.lower())
    if framework is None:
        raise ConvertError(f"{path.name}: cannot tell the framework from the name; pass --framework", "invalid")
    return framework


def producer(framework: str) -> Callable[[Job], Produced]:
    """The converter function of a framework, the server's ones included."""
    from server.convert import offline, worker

    offline_producers = {
        "sklearn": offline.produce_sklearn,
        "torchscript": offline.produce_torchscript,
        "keras": offline.produce_keras,
    }
    return offline_producers.get(framework) or worker.producer(framework)


def run(args: argparse.Namespace) -> int:
    """Convert, compare, print; 0 when the ONNX file was written, 1 otherwise (the reason on stderr)."""
    started = time.monotonic()
    try:
        overrides = dict(_budget(text) for text in args.accuracy)
        framework = guess_framework(args.model) if args.framework == "auto" else args.framework
        with tempfile.TemporaryDirectory(prefix="optiserve-convert-") as work:
            source = _source(args.model, Path(work))
            job = Job(
                framework, str(source), work, str(args.sample) if args.sample else None, args.max_batch_size, True
            )
            produced = producer(framework)(job)
            _check_onnx(job.onnx_path)
            verdict = guard.check(job.onnx_path, produced, overrides)
            sizes = (source_size(args.model), job.onnx_path.stat().st_size)
            step = guard.report_step(framework, verdict, produced, duration_s=time.monotonic() - started, sizes=sizes)
            print(_table(step))
            if verdict.failures:
                print(f"optiserve convert: refused: {step['reason']}", file=sys.stderr)
                return 1
            args.output.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(job.onnx_path, args.output)
    except ConvertError as exc:
        print(f"optiserve convert: {exc.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.output}")
    return 0


def _source(model: Path, work: Path) -> Path:
    if not model.exists():
        raise ConvertError(f"{model}: no such file or folder", "invalid")
    if model.name.endswith(".tar"):
        from server.convert.archive import extract_tar

        extract_tar(model, work / "source", model.name)
        return saved_model_root(work / "source")
    return model


def _budget(text: str) -> tuple[str, float]:
    metric, _, value = text.partition("=")
    try:
        return metric.strip(), float(value)
    except ValueError:
        raise ConvertError(f"--accuracy {text!r}: expected METRIC=NUMBER, e.g. rel_l2=1e-4", "invalid") from None


def _table(step: dict[str, object]) -> str:
    """The comparison as the server reports it: status, figures, budgets, reason."""
    accuracy = step["accuracy"] if isinstance(step["accuracy"], dict) else {}
    figures = " ".join(f"{k}={v:.4g}" for k, v in accuracy.items())
    lines = [
        f"{step['name']}: {step['status']}",
        f"  accuracy:   {figures}",
        f"  thresholds: {json.dumps(step['thresholds'])}",
        f"  {step['reason']}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``optiserve convert`` as a standalone program (``python -m server.convert.cli``)."""
    parser = argparse.ArgumentParser(
        prog="optiserve convert", description="Convert a framework model to ONNX on your machine, with a check."
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["add_arguments", "formats", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
