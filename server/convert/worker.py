"""The converter worker: ``python -m server.convert.worker JOB_DIR``. Reads ``job.json``, imports the
framework, arms the sandbox, converts, and writes ``model.onnx``, ``reference.npz`` and ``result.json``
(or ``result.json`` with the error). One process per conversion, so nothing it loads stays in the server."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from server.convert import sandbox
from server.convert.job import JOB_FILE, RESULT_FILE, ConvertError, Job, Produced


def producer(framework: str) -> Callable[[Job], Produced]:
    """The converter function of a framework (imported lazily; each imports its library lazily too)."""
    if framework == "torch":
        from server.convert import torch_export

        return torch_export.produce
    if framework == "tensorflow":
        from server.convert import savedmodel

        return savedmodel.produce
    if framework in ("xgboost", "lightgbm"):
        from server.convert import trees

        return trees.produce_xgboost if framework == "xgboost" else trees.produce_lightgbm
    raise ConvertError(f"unknown framework {framework!r}", "invalid")


PRELOAD = {
    "torch": ("torch", "torch.export", "torch.onnx", "onnxscript"),
    "tensorflow": ("tensorflow", "tf2onnx"),
    "xgboost": ("xgboost", "onnxmltools"),
    "lightgbm": ("lightgbm", "onnxmltools"),
}


def preload(framework: str) -> None:
    """Import the heavy libraries before the sandbox is armed (their imports may load native code)."""
    import importlib

    for module in PRELOAD.get(framework, ()):
        try:
            importlib.import_module(module)
        except ImportError:
            return  # the converter reports the missing extra with its message


def main(argv: list[str]) -> int:
    """Run one job; the exit code is 0 whenever result.json was written. The job folder and every path in
    the job must be absolute: the worker runs in its job folder, so it never resolves against its cwd."""
    if len(argv) != 1 or not Path(argv[0]).is_absolute():
        print(f"usage: python -m server.convert.worker ABSOLUTE_JOB_DIR (got {argv!r})", file=sys.stderr)
        return 2
    work_dir = Path(argv[0]).resolve()
    job = Job.from_json((work_dir / JOB_FILE).read_text())
    try:
        relative = job.relative_paths()
        if relative:
            raise ConvertError(f"the job's paths must be absolute, not {', '.join(map(repr, relative))}")
        produce = producer(job.framework)
        preload(job.framework)
        if not job.trusted:
            sandbox.install(work_dir)
        produce(job).save(work_dir)
    except ConvertError as exc:
        _fail(work_dir, exc.kind, exc.message)
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        _fail(work_dir, "failed", f"{type(exc).__name__}: {str(exc)[:1000]}")
    return 0


def _fail(work_dir: Path, kind: str, message: str) -> None:
    (work_dir / RESULT_FILE).write_text(json.dumps({"ok": False, "kind": kind, "error": message}))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
