"""``optiserve optimize MODEL.onnx -o OUT/``: the same pipeline the server runs at load time, offline. Writes
OUT/model.onnx (the selected variant), OUT/report.json and OUT/session_options.json, and prints the report
as a table. :func:`add_arguments` and :func:`run` let the ``optiserve`` command mount it as a sub-command."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from optimizers.errors import OptimizeError
from optimizers.options import OptimizeOptions
from optimizers.pipeline import Pipeline
from optimizers.report import format_table

DEFAULT_CACHE = Path.home() / ".cache" / "optiserve" / "optimizer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``optimize`` flags, on any parser (the CLI's own, or a sub-command's)."""
    parser.add_argument("model", type=Path, help="the ONNX model to optimize")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for model.onnx and report.json")
    parser.add_argument("--target", choices=["cpu", "cuda", "tensorrt"], default="cpu", help="where it will run")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "fp16", "bf16", "int8", "none"],
        default="auto",
        help="auto: every applicable candidate competes; fp32/fp16/bf16/int8: only that family; none: copy as is",
    )
    parser.add_argument("--samples", type=Path, help=".npz of validation inputs (keys = input names)")
    parser.add_argument("--prune-sparsity", type=float, help="prune this fraction of MatMul/Gemm/Conv weights")
    parser.add_argument("--prune-pattern", choices=["unstructured", "2:4"], help="pruning pattern")
    parser.add_argument(
        "--accuracy",
        action="append",
        default=[],
        metavar="METRIC=BUDGET",
        help="override an accuracy budget (rel_l2, max_abs, cosine, top1); repeatable",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="0 if the model has no batch dimension")
    parser.add_argument("--preferred-batch-size", type=int, action="append", default=[], help="repeatable")
    parser.add_argument("--time-budget", type=float, default=1.5, help="seconds to time each candidate")
    parser.add_argument(
        "--tune-instances",
        action="store_true",
        help="also time N instances x T threads under concurrent load (CPU); session_options.json gets instances",
    )
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="artifact cache folder")
    parser.add_argument("--cache-max-bytes", type=int, default=None, help="cache size cap (default: none)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")


def options_from_args(args: argparse.Namespace) -> OptimizeOptions:
    """Validated options from the flags (errors name the flag's field)."""
    data: dict[str, Any] = {
        "precision": args.precision,
        "target": args.target,
        "samples_path": args.samples,
        "max_batch_size": args.max_batch_size,
        "preferred_batch_sizes": args.preferred_batch_size,
        "time_budget_s": args.time_budget,
        "accuracy": dict(_budget(text) for text in args.accuracy),
        "tune_instances": args.tune_instances,
    }
    if args.prune_sparsity is not None or args.prune_pattern is not None:
        prune: dict[str, Any] = {"pattern": args.prune_pattern or "unstructured"}
        if args.prune_sparsity is not None:
            prune["sparsity"] = args.prune_sparsity
        data["prune"] = prune
    return OptimizeOptions.validated(data)


def _budget(text: str) -> tuple[str, float]:
    metric, _, value = text.partition("=")
    try:
        return metric.strip(), float(value)
    except ValueError:
        raise OptimizeError(f"--accuracy {text!r}: expected METRIC=NUMBER, e.g. cosine=0.98") from None


def run(args: argparse.Namespace) -> int:
    """Run the pipeline for parsed arguments; 0 on success, 1 on an error (printed to stderr)."""
    try:
        options = options_from_args(args)
        if not args.model.is_file():
            raise OptimizeError(f"{args.model}: no such model file")
        pipeline = Pipeline(cache_dir=args.cache_dir, cache_max_bytes=args.cache_max_bytes)
        progress = None if args.quiet else (lambda message: print(message, file=sys.stderr))
        result = pipeline.run(args.model, options, progress, name=args.model.stem)
    except OptimizeError as exc:
        print(f"optiserve optimize: {exc}", file=sys.stderr)
        return 1
    args.output.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result.model_path, args.output / "model.onnx")
    report = result.report
    (args.output / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "session_options.json").write_text(json.dumps(result.session.as_options(), indent=2) + "\n")
    print(format_table(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``optiserve optimize`` as a standalone program (``argv`` without the sub-command name)."""
    parser = argparse.ArgumentParser(
        prog="optiserve optimize", description="Optimize an ONNX model for this machine, offline."
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
