"""The validation set every candidate is compared on (and INT8 calibrates with): the user's samples when
there are any, else inputs generated from the input metadata. The original model's outputs on it are the
reference."""

from __future__ import annotations

import json
import logging
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from optimizers.errors import OptimizeError
from optimizers.modelinfo import ModelInfo, TensorInfo, sha256_file
from optimizers.runtime import Feed, SessionSpec, open_session

log = logging.getLogger("optiserve.optimizers")

SAMPLES_FILE = "samples.npz"
TRAFFIC_SUFFIX = ".traffic.npz"
"""A samples file whose name ends so holds a server's sample of real requests: its reference is ``traffic``."""
REFERENCE_BATCH = 8
MAX_SAMPLES = 256
DYNAMIC_DIM = 8
MAX_SAMPLES_BYTES = 512 * 2**20
SEARCH_SIZES = (32, 64, 128, 224, 256, 320, 512, 640)
"""Sizes tried for the dynamic dims when :data:`DYNAMIC_DIM` does not run: detectors want multiples of 32, audio
models a sequence longer than their padding."""
SCALAR_VALUES = (1, 8)
"""Values tried for int scalar inputs (a sample rate, a step count) after the model's own constants next to them."""
SEARCH_BUDGET_S = 30.0
MAX_ATTEMPTS = 24
MAX_PROBE_ELEMENTS = 2**25
"""Elements of one probe sample, all inputs together (128 MiB of float32): bigger guesses are not run."""
MAX_ERROR_CHARS = 300
Source = Literal["samples", "traffic", "random", "config", "search"]
RANDOM_NOTE = (
    "random inputs from the input metadata: a weak check (real data can hit ranges these never do); "
    f"put a {SAMPLES_FILE} (keys = input names) next to the model for a real one"
)


@dataclass
class ReferenceSet:
    """Inputs in batches, and (once :meth:`record` ran) the original model's outputs for them."""

    source: Source
    batches: list[Feed]
    count: int
    digest: str
    outputs: list[Feed] = field(default_factory=list)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """The input shapes tried before these ran (see :func:`build_reference`), the last one the one that ran."""

    @property
    def note(self) -> str:
        """What the reader of a report should know about this set."""
        if self.source == "traffic":
            return f"{self.count} samples of the version's real requests"
        return f"{self.count} user samples" if self.source == "samples" else RANDOM_NOTE

    def summary(self) -> dict[str, object]:
        """The report's ``reference`` entry."""
        entry: dict[str, object] = {"source": self.source, "count": self.count, "note": self.note}
        if self.attempts:
            entry["attempts"] = self.attempts
        return entry


Probe = Callable[[Feed], None]
"""Runs the original model on one feed; raises when it cannot (or returns NaN/Inf)."""


class NoRunnableInputs(Exception):
    """No generated input shapes ran: every attempt is in ``attempts``."""

    def __init__(self, message: str, attempts: list[dict[str, Any]]) -> None:
        super().__init__(message)
        self.attempts = attempts

    def summary(self) -> dict[str, object]:
        """The report's ``reference`` entry."""
        return {"source": "none", "count": 0, "note": str(self), "attempts": self.attempts}


class SessionProbe:
    """A :data:`Probe` on a CPU session of ``model_path``, opened at the first call (an open error is raised
    again on every call). :meth:`close` drops it. Its runs log nothing through onnxruntime's own logger: a guess
    that fails is expected, and its error is in the report's attempts (each is logged here at DEBUG)."""

    def __init__(self, model_path: Path) -> None:
        self.model_path = model_path
        self._session: Any = None
        self._error: Exception | None = None

    def __call__(self, feed: Feed) -> None:
        if self._error is not None:
            raise self._error
        if self._session is None:
            try:
                self._session = open_session(self.model_path, SessionSpec())
            except Exception as exc:
                self._error = exc
                raise
        import onnxruntime as ort

        quiet = ort.RunOptions()
        quiet.log_severity_level = 4  # fatal only: the failing kernel would print an error line per guess
        try:
            outputs = self._session.run(None, feed, quiet)
        except Exception as exc:
            log.debug("reference guess %s failed: %s", {n: list(a.shape) for n, a in feed.items()}, exc)
            raise
        for name, value in zip((o.name for o in self._session.get_outputs()), outputs, strict=True):
            array = np.asarray(value)
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise ValueError(f"output {name!r} has NaN/Inf on these inputs")

    def close(self) -> None:
        self._session = None


def find_samples(model_path: Path, explicit: Path | None) -> Path | None:
    """The samples file to use: the explicit one (must exist), else ``samples.npz`` beside the model."""
    if explicit is not None:
        if not explicit.is_file():
            raise OptimizeError(f"samples: {explicit} does not exist")
        return explicit
    beside = model_path.parent / SAMPLES_FILE
    return beside if beside.is_file() else None


def build_reference(
    info: ModelInfo,
    samples: Path | None,
    count: int,
    batch_dim: bool,
    *,
    probe: Probe | None = None,
    config_shapes: Mapping[str, Sequence[int]] | None = None,
    budget_s: float = SEARCH_BUDGET_S,
) -> ReferenceSet:
    """The validation inputs, in batches of at most :data:`REFERENCE_BATCH` along dim 0: the user's samples, else
    generated ones. With a ``probe``, generated shapes are checked on the model before use, in this order: the
    config's dims (``config_shapes``, -1 for dynamic; Triton's dims leave out the batch dim), the metadata with
    :data:`DYNAMIC_DIM` for every dynamic dim, then a search over :data:`SEARCH_SIZES` (and, for int scalar
    inputs, the model's own constants beside them and :data:`SCALAR_VALUES`), bounded by ``budget_s`` and
    :data:`MAX_ATTEMPTS`. Raises :class:`NoRunnableInputs` when none runs."""
    if samples is not None:
        return _from_samples(info, samples, batch_dim)
    if probe is None:
        return _random(info, count, batch_dim)
    return _search(info, count, batch_dim, probe, config_shapes or {}, budget_s)


def _from_samples(info: ModelInfo, path: Path, batch_dim: bool) -> ReferenceSet:
    arrays = load_npz(path)
    names = [t.name for t in info.inputs]
    missing, extra = sorted(set(names) - set(arrays)), sorted(set(arrays) - set(names))
    if missing or extra:
        raise OptimizeError(
            f"samples {path.name}: keys must be the input names {names}; missing {missing}, extra {extra}"
        )
    feeds = {t.name: _cast(t, arrays[t.name], path) for t in info.inputs}
    if not batch_dim:
        batches = _unbatched(info, feeds, path)
        count = len(batches)
    else:
        count = min(len(a) for a in feeds.values())
        if any(len(a) != count for a in feeds.values()) or count == 0:
            raise OptimizeError(f"samples {path.name}: every input needs the same, non-zero number of samples")
        count = min(count, MAX_SAMPLES)
        batches = [
            {n: a[start : start + REFERENCE_BATCH] for n, a in feeds.items()}
            for start in range(0, count, REFERENCE_BATCH)
        ]
    source: Source = "traffic" if path.name.endswith(TRAFFIC_SUFFIX) else "samples"
    return ReferenceSet(source, batches, count, f"samples:{sha256_file(path)}")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """A .npz of plain arrays, size-capped before loading; pickled objects are refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
        if unpacked > MAX_SAMPLES_BYTES:
            raise OptimizeError(f"samples {path.name}: {unpacked} bytes unpacked, limit {MAX_SAMPLES_BYTES}")
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise OptimizeError(f"samples {path.name}: not a readable .npz of arrays ({exc})") from None


def _cast(tensor: TensorInfo, array: np.ndarray, path: Path) -> np.ndarray:
    if tensor.dtype.kind == "O":
        return array.astype(object)
    if not np.can_cast(array.dtype, tensor.dtype, casting="same_kind"):
        raise OptimizeError(f"samples {path.name}: {tensor.name!r} is {array.dtype}, the model wants {tensor.dtype}")
    return array.astype(tensor.dtype, copy=False)


def _unbatched(info: ModelInfo, feeds: Feed, path: Path) -> list[Feed]:
    """Models without a batch dim: each key holds one sample (the input's rank) or a stack of them."""
    first = info.inputs[0]
    stacked = feeds[first.name].ndim == len(first.shape) + 1
    if not stacked:
        return [feeds]
    count = min(len(feeds[t.name]) for t in info.inputs)
    if count == 0:
        raise OptimizeError(f"samples {path.name}: no samples")
    return [{n: a[i] for n, a in feeds.items()} for i in range(min(count, MAX_SAMPLES))]


@dataclass(frozen=True)
class Guess:
    """Input shapes to generate: the dynamic dims filled (dim 0 of a batched model stays the batch's), and
    the values of int scalar inputs."""

    source: Source
    dims: dict[str, tuple[int, ...]]
    values: dict[str, int] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.source, "shapes": {n: list(d) for n, d in self.dims.items()}}
        if self.values:
            entry["values"] = dict(self.values)
        return entry


def _random(info: ModelInfo, count: int, batch_dim: bool, guess: Guess | None = None) -> ReferenceSet:
    """Seeded, so the same model always gets the same set (and cache keys stay stable)."""
    rng = np.random.default_rng(0)
    if batch_dim:
        sizes = [min(REFERENCE_BATCH, count - start) for start in range(0, count, REFERENCE_BATCH)]
    else:
        sizes = [0] * max(1, min(count, 4))  # fixed shapes: a few whole inputs
    batches = [{t.name: random_tensor(rng, t, size or None, guess) for t in info.inputs} for size in sizes]
    total = count if batch_dim else len(batches)
    shapes = ";".join(f"{t.name}:{t.dtype}:{t.shape}" for t in info.inputs)
    if guess is None or guess.source == "random":
        return ReferenceSet("random", batches, total, f"random:v1:{total}:{batch_dim}:{shapes}")
    chosen = json.dumps(guess.describe(), sort_keys=True)
    return ReferenceSet(guess.source, batches, total, f"random:v2:{total}:{batch_dim}:{shapes}:{chosen}")


def _search(
    info: ModelInfo,
    count: int,
    batch_dim: bool,
    probe: Probe,
    config_shapes: Mapping[str, Sequence[int]],
    budget_s: float,
) -> ReferenceSet:
    """The first guess whose one-sample feed the model runs (see :func:`build_reference`)."""
    deadline = time.monotonic() + budget_s
    attempts: list[dict[str, Any]] = []
    seen: set[str] = set()
    for guess in _guesses(info, batch_dim, config_shapes):
        key = json.dumps(guess.describe()["shapes"], sort_keys=True) + json.dumps(guess.values, sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        if len(attempts) >= MAX_ATTEMPTS or time.monotonic() > deadline:
            attempts.append({"source": "search", "error": f"stopped: {MAX_ATTEMPTS} attempts or {budget_s:g} s spent"})
            break
        entry = guess.describe()
        rng = np.random.default_rng(0)
        feed = {t.name: random_tensor(rng, t, 1 if batch_dim else None, guess) for t in info.inputs}
        elements = sum(int(a.size) for a in feed.values())
        if elements > MAX_PROBE_ELEMENTS:
            attempts.append({**entry, "error": f"not run: {elements} elements, limit {MAX_PROBE_ELEMENTS}"})
            continue
        try:
            probe(feed)
        except Exception as exc:  # onnxruntime's failures are plain exceptions with the kernel's message
            attempts.append({**entry, "error": f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]})
            continue
        attempts.append({**entry, "error": None})
        reference = _random(info, count, batch_dim, guess)
        reference.attempts = attempts
        return reference
    last = next((a["error"] for a in reversed(attempts) if a.get("shapes")), "nothing to try")
    raise NoRunnableInputs(
        f"no generated input ran on the model ({len(attempts)} attempts, last: {last}); "
        f"put a {SAMPLES_FILE} (keys = input names) next to the model",
        attempts,
    )


def _guesses(info: ModelInfo, batch_dim: bool, config_shapes: Mapping[str, Sequence[int]]) -> Iterator[Guess]:
    """Config dims, then the metadata with :data:`DYNAMIC_DIM`, then the search (see :func:`build_reference`)."""
    hints = scalar_hints(info)
    rounds = max((len(v) for v in hints.values()), default=1)

    def values(index: int) -> dict[str, int]:
        return {name: options[min(index, len(options) - 1)] for name, options in hints.items()}

    configured = {t.name: _config_dims(t, config_shapes.get(t.name)) for t in info.inputs}
    if any(dims is not None for dims in configured.values()):
        for size in (DYNAMIC_DIM, *SEARCH_SIZES):
            yield Guess("config", _fill(info, batch_dim, size, configured), values(0))
    yield Guess("random", {t.name: concrete_shape(t, 1 if batch_dim else None) for t in info.inputs})
    for index in range(rounds):
        for size in (DYNAMIC_DIM, *SEARCH_SIZES):
            shapes = _fill(info, batch_dim, size, {})
            yield Guess("search", shapes, values(index))
            lone = _fill(info, batch_dim, size, {}, secondary_anonymous=1)
            if lone != shapes:
                yield Guess("search", lone, values(index))


def _config_dims(tensor: TensorInfo, dims: Sequence[int] | None) -> tuple[int, ...] | None:
    """The config's dims as the model's full shape (-1: dynamic), or None where they do not fit its rank."""
    if dims is None:
        return None
    full = tuple(int(d) for d in dims)
    if len(full) == len(tensor.shape) - 1:
        full = (-1, *full)  # Triton's dims leave out the batch dim
    return full if len(full) == len(tensor.shape) else None


def _fill(
    info: ModelInfo,
    batch_dim: bool,
    size: int,
    configured: Mapping[str, tuple[int, ...] | None],
    secondary_anonymous: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """Every input's shape with its dynamic dims set: the batch (dim 0 of a batched model) to 1, the dims that
    look like a batch (a name with "batch", or the first dim of an input) to 1, the others to ``size``. Dims
    with the same name get the same value. With ``secondary_anonymous``, the unnamed dims of every input after
    the first one that has any take that value instead: exporters that drop dim names leave a recurrent
    state ``[2, ?, 128]`` whose ``?`` is the batch, not the sequence length of the data input."""
    primary = next((t.name for t in info.inputs if any(d is None for d in t.shape[1:])), None)
    batch_like = {
        str(t.shape[0]) for t in info.inputs if t.shape and isinstance(t.shape[0], str) and len(t.shape) > 1
    } | {str(d) for t in info.inputs for d in t.shape if isinstance(d, str) and "batch" in d.lower()}
    shapes = {}
    for tensor in info.inputs:
        given = configured.get(tensor.name)
        dims = []
        for index, dim in enumerate(tensor.shape):
            fixed = given[index] if given is not None and given[index] > 0 else None
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif index == 0 and batch_dim:
                dims.append(1)
            elif fixed is not None:
                dims.append(fixed)
            elif dim in batch_like or (dim is None and index == 0 and len(tensor.shape) > 1):
                dims.append(1)
            elif dim is None and secondary_anonymous is not None and tensor.name != primary:
                dims.append(secondary_anonymous)
            else:
                dims.append(size)
        shapes[tensor.name] = tuple(dims)
    return shapes


def scalar_hints(info: ModelInfo) -> dict[str, list[int]]:
    """Values to try for each int scalar input: the model's int constants that a node reads next to the
    input (a ``sr == 16000`` check), then :data:`SCALAR_VALUES`."""
    scalars = [t.name for t in info.inputs if t.dtype.kind in "iu" and all(d == 1 for d in t.shape)]
    hints: dict[str, list[int]] = {}
    for name in scalars:
        found = [v for v in info.int_constants_beside.get(name, ()) if v > 1]
        hints[name] = list(dict.fromkeys([*found, *SCALAR_VALUES]))
    return hints


def random_tensor(
    rng: np.random.Generator, tensor: TensorInfo, batch: int | None, guess: Guess | None = None
) -> np.ndarray:
    """A plausible input: N(0, 1) floats, small non-negative ints (indices), 0..255 bytes, empty strings; with a
    ``guess``, its shape (dim 0 the batch, when batching) and its value for an int scalar input."""
    shape = concrete_shape(tensor, batch)
    if guess is not None and tensor.name in guess.dims:
        shape = guess.dims[tensor.name]
        if batch is not None and shape:
            shape = (batch, *shape[1:])
    kind = tensor.dtype.kind
    if guess is not None and tensor.name in guess.values:
        return np.full(shape, guess.values[tensor.name], dtype=tensor.dtype)
    if kind == "f":
        return rng.standard_normal(shape).astype(tensor.dtype)
    if kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if kind in "iu":
        high = 256 if tensor.dtype.itemsize == 1 and kind == "u" else DYNAMIC_DIM
        return rng.integers(0, high, shape).astype(tensor.dtype)
    out = np.empty(shape, dtype=object)
    out.fill("")
    return out


def concrete_shape(tensor: TensorInfo, batch: int | None) -> tuple[int, ...]:
    """Symbolic dims filled: dim 0 with the batch (when batching), the others with :data:`DYNAMIC_DIM`."""
    dims = []
    for index, dim in enumerate(tensor.shape):
        if index == 0 and batch is not None:
            dims.append(batch)
        else:
            dims.append(dim if isinstance(dim, int) and dim > 0 else DYNAMIC_DIM)
    return tuple(dims)


def resize_batch(feed: Feed, batch: int) -> Feed:
    """A feed with ``batch`` rows, repeating the given ones (for timing at sizes the set lacks)."""
    out = {}
    for name, array in feed.items():
        reps = -(-batch // len(array))
        out[name] = np.concatenate([array] * reps)[:batch] if reps > 1 else array[:batch]
    return out
