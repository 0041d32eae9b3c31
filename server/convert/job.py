"""What the converter process is asked to do and what it hands back. A :class:`Job` travels as JSON into the
sandboxed worker; the worker leaves ``model.onnx``, ``reference.npz`` (the validation inputs and the framework's
own outputs for them, keyed by position) and ``result.json`` in the job's folder."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from optimizers.reference import load_npz
from optimizers.runtime import Feed

ONNX_FILE = "model.onnx"
REFERENCE_FILE = "reference.npz"
RESULT_FILE = "result.json"
JOB_FILE = "job.json"
SAMPLES_FILE = "samples.npz"
#: Bump when a converter changes what it writes: cached conversions then miss.
CONVERT_VERSION = "1"


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` of named arrays (typed once here: numpy's stub reads ``**arrays`` as its keywords)."""
    savez: Any = np.savez
    savez(path, **arrays)


class ConvertError(Exception):
    """A conversion that cannot be done; ``kind`` says why: ``missing_extra``, ``refused`` (unsafe or
    unsupported content), ``invalid`` (a broken or unusable model) or ``failed`` (the converter failed)."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


def require(module: str, extra: str, framework: str) -> ModuleType:
    """Import a converter library, or say which optional extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ConvertError(
            f"converting {framework} models needs the {module!r} package: install optiserve[{extra}] ({exc})",
            "missing_extra",
        ) from None


@dataclass
class Job:
    """One conversion: the framework, the uploaded source (file or folder), the folder to write into,
    optional validation samples (.npz keyed by input name), and the batch-size hint from the config
    (None: not given; 0: no batch dimension; >0: dim 0 must be dynamic)."""

    framework: str
    source: str
    work_dir: str
    samples: str | None = None
    max_batch_size_hint: int | None = None
    trusted: bool = False

    @property
    def onnx_path(self) -> Path:
        """Where the converter writes the ONNX model."""
        return Path(self.work_dir) / ONNX_FILE

    def to_json(self) -> str:
        """The job as the worker reads it."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Job:
        """The inverse of :meth:`to_json`."""
        return cls(**json.loads(text))

    def absolute(self) -> Job:
        """This job with every path made absolute against the current folder: the worker runs in its job
        folder, where a relative path would point somewhere else (``a/b`` would become ``a/b/a/b``)."""
        samples = os.path.abspath(self.samples) if self.samples else None
        return dataclasses.replace(
            self, source=os.path.abspath(self.source), work_dir=os.path.abspath(self.work_dir), samples=samples
        )

    def relative_paths(self) -> list[str]:
        """The paths of this job that are not absolute (none, for a job made by :meth:`absolute`)."""
        paths = [self.source, self.work_dir, *([self.samples] if self.samples else [])]
        return [path for path in paths if not os.path.isabs(path)]

    def load_samples(self) -> dict[str, np.ndarray] | None:
        """The user's validation inputs, if any (plain arrays only; never unpickled)."""
        return load_npz(Path(self.samples)) if self.samples else None


@dataclass
class Produced:
    """What a converter made: the validation inputs it used, the framework's outputs on them (keyed by the
    ONNX output names), where the inputs came from, and notes for the report."""

    batches: list[Feed]
    outputs: list[Feed]
    source: str
    versions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def save(self, work_dir: Path) -> None:
        """Write ``reference.npz`` and ``result.json`` next to the model."""
        arrays: dict[str, np.ndarray] = {}
        in_names = list(self.batches[0]) if self.batches else []
        out_names = list(self.outputs[0]) if self.outputs else []
        for index, (feed, result) in enumerate(zip(self.batches, self.outputs, strict=True)):
            arrays.update({f"i{index}_{k}": np.asarray(feed[n]) for k, n in enumerate(in_names)})
            arrays.update({f"o{index}_{k}": np.asarray(result[n]) for k, n in enumerate(out_names)})
        save_npz(work_dir / REFERENCE_FILE, arrays)
        meta = {
            "ok": True,
            "inputs": in_names,
            "outputs": out_names,
            "batches": len(self.batches),
            "source": self.source,
            "versions": self.versions,
            "notes": self.notes,
        }
        (work_dir / RESULT_FILE).write_text(json.dumps(meta))

    @classmethod
    def load(cls, work_dir: Path, meta: dict[str, Any]) -> Produced:
        """Read what :meth:`save` wrote (plain arrays; pickles are refused)."""
        arrays = load_npz(work_dir / REFERENCE_FILE)
        ins, outs = list(meta["inputs"]), list(meta["outputs"])
        count = int(meta["batches"])
        batches = [{n: arrays[f"i{b}_{k}"] for k, n in enumerate(ins)} for b in range(count)]
        outputs = [{n: arrays[f"o{b}_{k}"] for k, n in enumerate(outs)} for b in range(count)]
        return cls(batches, outputs, str(meta["source"]), dict(meta["versions"]), list(meta["notes"]))
