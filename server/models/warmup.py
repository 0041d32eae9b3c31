"""Warmup before a version is ready: Triton's ``model_warmup`` entries, or one default batch.

Triton's semantics: each ``model_warmup`` entry is one request of ``batch_size`` copies of one sample (``dims``
exclude the batch dim) run ``count`` times (0 is 1) on every instance, before the version serves. A sample is
zeros (``zero_data``), random values (``random_data``: [0, 1) for floats, 0 or 1 for integers and booleans,
empty strings for BYTES, which Triton also leaves unrandomized) or the raw bytes of a file in the model's
``warmup/`` folder (``input_data_file``: one sample in row-major order; BYTES elements as a 4-byte little-endian
length and the bytes). A failing entry fails the load, naming the entry. Without ``model_warmup``, one batch of
zeros in the configured shapes runs on every instance so the first request does not pay the session's
initialization. Dynamic dims are 1 first; when that does not run (a detector wants multiples of 32, an audio model
a sequence longer than its padding) the sizes the optimizer's reference search tries follow, on one instance, for
at most :data:`DEFAULT_SEARCH_S`; the first that runs warms every instance. When none runs, or no shape can be
made, the load goes on with a warning.

Entries were checked against the config when it was parsed and completed
(:func:`server.repository.config.check_warmup`). Runs go straight to the instances on the calling thread, so
:func:`warm_up` belongs before the batcher starts (CUDA graphs are captured, and replayed, on the worker threads).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.grpc import model_config_pb2 as mc

from optimizers.reference import DYNAMIC_DIM, SEARCH_SIZES
from server.backends.base import Backend, Tensors
from server.errors import LoadFailed, ServerError
from server.protocol import datatypes
from server.repository.config import ModelConfig, check_warmup
from server.repository.layout import Repository

log = logging.getLogger("optiserve.warmup")
WARMUP_FOLDER = "warmup"
"""The folder next to config.pbtxt holding ``input_data_file`` files, as in Triton."""
DEFAULT_SIZES = (1, DYNAMIC_DIM, *SEARCH_SIZES)
"""Sizes tried, in order, for the dynamic dims of the default warmup."""
DEFAULT_SEARCH_S = 10.0
"""Time the default warmup may spend on sizes that do not run before it gives up (with a warning)."""


@dataclass
class WarmupSample:
    """One request to run: its inputs (batch included) and how many times."""

    name: str
    batch_size: int
    count: int
    inputs: Tensors


def warm_up(
    backends: Sequence[Backend], config: ModelConfig, model_dir: Path, repository: Repository, *, label: str = ""
) -> dict[str, Any]:
    """Run the config's warmup on every instance in ``backends`` (loaded, batcher not started yet) and say
    what ran, for the optimization report: ``{"source": "model_warmup" | "default", "duration_s", "entries":
    [{"name", "batch_size", "count", "instances", "duration_s"}]}``, plus ``"skipped"`` (the reason) when the
    default warmup could not run. ``model_dir`` is the model's folder (config.pbtxt and ``warmup/``);
    LoadFailed names the failing ``model_warmup`` entry."""
    label = label or f"model {config.name!r}"
    started = time.monotonic()
    if config.model_warmup:
        samples = warmup_samples(config, model_dir, repository, label)
        entries = [
            _run(backends, sample, f"{label}: model_warmup[{i}] ({sample.name!r})") for i, sample in enumerate(samples)
        ]
        return {"source": "model_warmup", "duration_s": time.monotonic() - started, "entries": entries}
    report: dict[str, Any] = {"source": "default", "entries": []}
    try:
        report["entries"].append(_run_default(backends, config, f"{label}: default warmup"))
    except (ServerError, ValueError, KeyError) as exc:
        reason = getattr(exc, "message", None) or str(exc)
        log.warning("%s: default warmup skipped, the first request pays session initialization: %s", label, reason)
        report["skipped"] = reason
    report["duration_s"] = time.monotonic() - started
    return report


def warmup_samples(config: ModelConfig, model_dir: Path, repository: Repository, label: str = "") -> list[WarmupSample]:
    """The config's ``model_warmup`` entries as arrays (checked again against the completed config)."""
    check_warmup(config, completed=True)
    batched = int(config.max_batch_size) > 0
    samples = []
    for index, warmup in enumerate(config.model_warmup):
        where = f"{label}: model_warmup[{index}] ({warmup.name!r})" if label else f"model_warmup[{index}]"
        batch = max(int(warmup.batch_size), 1)
        inputs: Tensors = {}
        for key, value in warmup.inputs.items():
            dtype = datatypes.BY_CONFIG_NAME[mc.DataType.Name(value.data_type)]
            dims = tuple(int(d) for d in value.dims)
            source = value.WhichOneof("input_data_type")
            if source == "input_data_file":
                one = _from_file(model_dir, repository, value.input_data_file, dtype, dims, f"{where}.inputs[{key!r}]")
            elif source == "random_data":
                one = _random(dtype, dims, np.random.default_rng())
            else:
                one = _zeros(dtype, dims)
            inputs[key] = np.repeat(one[np.newaxis], batch, axis=0) if batched else one
        samples.append(WarmupSample(warmup.name, batch, max(int(warmup.count), 1), inputs))
    return samples


def _run_default(backends: Sequence[Backend], config: ModelConfig, where: str) -> dict[str, Any]:
    """The first default sample that runs on the first instance (see the module's docstring), then run on the
    others; LoadFailed with the first size's reason when none runs."""
    first: LoadFailed | None = None
    deadline = time.monotonic() + DEFAULT_SEARCH_S
    for sample in default_samples(config):
        try:
            entry = _run(backends[:1], sample, where, probe=True)
        except LoadFailed as exc:
            first = first or exc
            if time.monotonic() > deadline:
                break
            continue
        if len(backends) > 1:
            entry = _run(backends[1:], sample, where)
            entry["instances"] = len(backends)
        if sample.name != "default":
            log.info("%s: ran with the dynamic dims as %s (1 did not run)", where, sample.name.split("=")[1])
        return entry
    assert first is not None  # default_samples yields at least one sample
    raise first


def default_samples(config: ModelConfig) -> list[WarmupSample]:
    """:func:`default_sample` for each size in :data:`DEFAULT_SIZES` (just the one when no dim is dynamic)."""
    dynamic = any(int(d) == -1 for tensor in config.input for d in tensor.dims)
    return [default_sample(config, size) for size in (DEFAULT_SIZES if dynamic else (1,))]


def default_sample(config: ModelConfig, size: int = 1) -> WarmupSample:
    """One batch of zeros in the configured shapes, dynamic dims as ``size``; ValueError when there is no
    shape. Named ``default``, or ``default, dynamic dims=<size>`` for a size other than 1."""
    if not config.input:
        raise ValueError("the config lists no inputs")
    inputs: Tensors = {}
    for tensor in config.input:
        if tensor.data_type == mc.TYPE_INVALID:
            raise ValueError(f"input {tensor.name!r} has no data_type")
        dtype = datatypes.BY_CONFIG_NAME[mc.DataType.Name(tensor.data_type)]
        dims = tuple(size if int(d) == -1 else int(d) for d in tensor.dims)
        if int(config.max_batch_size) > 0:
            dims = (1, *dims)
        inputs[tensor.name] = _zeros(dtype, dims)
    return WarmupSample("default" if size == 1 else f"default, dynamic dims={size}", 1, 1, inputs)


def _run(backends: Sequence[Backend], sample: WarmupSample, where: str, probe: bool = False) -> dict[str, Any]:
    """Run ``sample`` on every backend; ``probe``: a failure is expected and reported here, not by the runtime."""
    started = time.monotonic()
    for backend in backends:
        run = backend.probe if probe else backend.infer
        for _ in range(sample.count):
            try:
                run(sample.inputs)
            except Exception as exc:
                reason = getattr(exc, "message", None) or str(exc) or type(exc).__name__
                raise LoadFailed(f"{where} failed on instance {backend.name}: {reason}") from None
    duration = time.monotonic() - started
    log.info("%s: ran %d time(s) on %d instance(s) in %.3fs", where, sample.count, len(backends), duration)
    return {
        "name": sample.name,
        "batch_size": sample.batch_size,
        "count": sample.count,
        "instances": len(backends),
        "duration_s": duration,
    }


def _zeros(dtype: datatypes.DataType, dims: tuple[int, ...]) -> np.ndarray:
    if dtype.name == "BYTES":
        array = np.empty(dims, dtype=object)
        array.fill(b"")
        return array
    return np.zeros(dims, dtype=dtype.numpy)


def _random(dtype: datatypes.DataType, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype.name == "BYTES":
        return _zeros(dtype, dims)
    if dtype.numpy.kind == "f" or dtype.name == "BF16":
        return rng.random(dims, dtype=np.float32).astype(dtype.numpy)
    return rng.integers(0, 2, dims).astype(dtype.numpy)


def _from_file(
    model_dir: Path, repository: Repository, name: str, dtype: datatypes.DataType, dims: tuple[int, ...], where: str
) -> np.ndarray:
    """One sample from ``<model>/warmup/<name>``; the folder and file must stay inside the repository."""
    folder = model_dir / WARMUP_FOLDER
    if not folder.is_dir():
        raise LoadFailed(f"{where}.input_data_file: the model has no {WARMUP_FOLDER}/ folder for {name!r}")
    repository.check_tree(folder, f"{where}.input_data_file")
    path = folder / name  # a plain file name: checked with the config
    if not path.is_file():
        raise LoadFailed(f"{where}.input_data_file: {WARMUP_FOLDER}/{name} is not a file")
    elements = int(np.prod(dims, dtype=np.int64))
    if dtype.name == "BYTES":
        return _strings(path, elements, dims, f"{where}.input_data_file ({WARMUP_FOLDER}/{name})")
    needed = elements * dtype.itemsize
    with open(path, "rb") as file:
        data = file.read(needed)
    if len(data) < needed:
        raise LoadFailed(
            f"{where}.input_data_file: {WARMUP_FOLDER}/{name} has {len(data)} bytes, one sample of "
            f"{dtype.name} {list(dims)} needs {needed}"
        )
    return np.frombuffer(data, dtype=dtype.numpy).reshape(dims).copy()


def _strings(path: Path, elements: int, dims: tuple[int, ...], where: str) -> np.ndarray:
    """BYTES elements as Triton writes them: a 4-byte little-endian length, then the bytes."""
    values: list[bytes] = []
    with open(path, "rb") as file:
        for index in range(elements):
            head = file.read(4)
            size = int.from_bytes(head, "little") if len(head) == 4 else -1
            data = file.read(size) if size >= 0 else b""
            if size < 0 or len(data) < size:
                raise LoadFailed(f"{where}: ends inside element {index}; one sample needs {elements} BYTES elements")
            values.append(data)
    array = np.empty(elements, dtype=object)
    array[:] = values
    return array.reshape(dims)
