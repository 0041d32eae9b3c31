"""``convert_version``: the server's entry point. Detects the framework, checks the files, finds the
conversion in the artifact cache (keyed by the uploaded bytes, converter and library versions, samples and
batch hint) or runs it in a worker process, holds it to the accuracy guard, and stores it atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizers.cache import Cache, cache_key
from optimizers.errors import OptimizeError
from optimizers.modelinfo import sha256_file
from server.convert import formats, guard
from server.convert.archive import extract_tar, saved_model_root
from server.convert.job import CONVERT_VERSION, ONNX_FILE, SAMPLES_FILE, ConvertError, Job, Produced, save_npz
from server.convert.process import DEFAULT_TIMEOUT_S, run_job
from server.convert.registry import Converter, detect
from server.errors import LoadFailed, ServerError

log = logging.getLogger("optiserve.convert")


@dataclass(frozen=True)
class ConversionResult:
    """The converted model (a file in the cache, to serve as is) and its report step."""

    onnx_path: Path
    report_step: dict[str, Any]


class ConversionRejected(LoadFailed):
    """The converted model's outputs drift from the original's; ``report_step`` has the figures."""

    def __init__(self, message: str, report_step: dict[str, Any]) -> None:
        super().__init__(message)
        self.report_step = report_step


def convert_version(
    version_dir: Path,
    *,
    max_batch_size_hint: int | None,
    cache_dir: Path,
    samples: Mapping[str, np.ndarray] | None,
    thresholds: Mapping[str, float] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ConversionResult:
    """Convert the framework model in ``version_dir`` (blocking: call it from a worker thread). Raises
    :class:`LoadFailed` when nothing is convertible, a converter extra is missing, the files are refused or
    broken, or the guard rejects the conversion (:class:`ConversionRejected`, with the figures)."""
    converter = detect(version_dir)
    label = f"version {version_dir.name}"
    if converter is None:
        raise LoadFailed(
            f"{label}: no model.onnx and no framework model to convert ({', '.join(formats.SOURCE_FILES)})"
        )
    source = converter.source(version_dir)
    assert source is not None
    try:
        converter.precheck(source, f"{label}: {source.name}")
    except ServerError as exc:
        raise LoadFailed(exc.message) from None
    if converter.missing_modules():
        raise LoadFailed(f"{label}: {converter.missing_message()}")
    cache = Cache(Path(os.path.abspath(cache_dir)))  # its scratch folders are handed to the worker process
    key = cache_key(
        kind="convert",
        version=CONVERT_VERSION,
        framework=converter.framework,
        files=source_digest(source),
        samples=samples_digest(samples),
        batch=max_batch_size_hint,
        thresholds=dict(thresholds or {}),
        libraries=converter.library_versions(),
    )
    hit = cache.get_artifact(key)
    if hit is not None and isinstance(hit[1].get("step"), dict):
        step = dict(hit[1]["step"])
        step["details"] = {**step.get("details", {}), "cache_hit": True}
        return ConversionResult(hit[0], step)
    return _convert(converter, source, cache, key, max_batch_size_hint, samples, thresholds, timeout_s, label)


def _convert(
    converter: Converter,
    source: Path,
    cache: Cache,
    key: str,
    hint: int | None,
    samples: Mapping[str, np.ndarray] | None,
    thresholds: Mapping[str, float] | None,
    timeout_s: float,
    label: str,
) -> ConversionResult:
    started = time.monotonic()
    work = cache.work_dir()
    try:
        job = _job(converter, source, work, hint, samples, label)
        produced = run_job(job, timeout_s)
        _check_onnx(job.onnx_path)
        verdict = guard.check(job.onnx_path, produced, thresholds)
        sizes = (source_size(source), job.onnx_path.stat().st_size)
        step = guard.report_step(
            converter.framework, verdict, produced, duration_s=time.monotonic() - started, sizes=sizes
        )
        if verdict.failures:
            raise ConversionRejected(
                f"{label}: the {converter.framework} conversion was refused: {step['reason']}", step
            )
        path = cache.put_artifact(key, job.onnx_path, {"step": step, "source": source.name})
        log.info("%s: converted %s in %.2fs", label, converter.framework, time.monotonic() - started)
        return ConversionResult(path, step)
    except ConvertError as exc:
        raise LoadFailed(f"{label}: {source.name}: {exc.message}") from None
    except OptimizeError as exc:
        raise LoadFailed(f"{label}: {exc}") from None
    except ServerError as exc:
        if isinstance(exc, LoadFailed):
            raise
        raise LoadFailed(f"{label}: {exc.message}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _job(
    converter: Converter,
    source: Path,
    work: Path,
    hint: int | None,
    samples: Mapping[str, np.ndarray] | None,
    label: str,
) -> Job:
    if source.name == formats.SAVED_MODEL_TAR:
        folder = work / "source"
        folder.mkdir()
        extract_tar(source, folder / formats.SAVED_MODEL_DIR, f"{label}: {source.name}")
        source = saved_model_root(folder / formats.SAVED_MODEL_DIR)
    samples_path = None
    if samples:
        samples_path = str(work / SAMPLES_FILE)
        save_npz(Path(samples_path), {name: np.asarray(value) for name, value in samples.items()})
    return Job(converter.framework, str(source), str(work), samples_path, hint)


def _check_onnx(path: Path) -> None:
    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ConvertError(f"the converted model fails the ONNX checker: {str(exc)[:500]}") from None


def source_files(source: Path) -> list[Path]:
    """The uploaded files a conversion reads (regular files only; links are never followed)."""
    if source.is_file():
        return [source]
    return sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink())


def source_digest(source: Path) -> dict[str, str]:
    """sha256 of every source file, by its path relative to the version folder."""
    return {str(p.relative_to(source.parent)): sha256_file(p) for p in source_files(source)}


def source_size(source: Path) -> int:
    """Bytes of the uploaded model (for the report's size before/after)."""
    return sum(p.stat().st_size for p in source_files(source))


def samples_digest(samples: Mapping[str, np.ndarray] | None) -> str | None:
    """A content hash of the validation samples (names, dtypes, shapes, bytes)."""
    if not samples:
        return None
    digest = hashlib.sha256()
    for name in sorted(samples):
        array = np.ascontiguousarray(samples[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes() if array.dtype.kind != "O" else repr(array.tolist()).encode())
    return digest.hexdigest()


__all__ = ["ONNX_FILE", "ConversionRejected", "ConversionResult", "Produced", "convert_version"]
