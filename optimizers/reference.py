"""The validation set every candidate is compared on (and INT8 calibrates with): the user's samples when
there are any, else inputs generated from the input metadata. The original model's outputs on it are the
reference."""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

from optimizers.errors import OptimizeError
from optimizers.modelinfo import ModelInfo, TensorInfo, sha256_file
from optimizers.runtime import Feed

SAMPLES_FILE = "samples.npz"
REFERENCE_BATCH = 8
MAX_SAMPLES = 256
DYNAMIC_DIM = 8
MAX_SAMPLES_BYTES = 512 * 2**20
RANDOM_NOTE = (
    "random inputs from the input metadata: a weak check (real data can hit ranges these never do); "
    f"put a {SAMPLES_FILE} (keys = input names) next to the model for a real one"
)


@dataclass
class ReferenceSet:
    """Inputs in batches, and (once :meth:`record` ran) the original model's outputs for them."""

    source: Literal["samples", "random"]
    batches: list[Feed]
    count: int
    digest: str
    outputs: list[Feed] = field(default_factory=list)

    @property
    def note(self) -> str:
        """What the reader of a report should know about this set."""
        return RANDOM_NOTE if self.source == "random" else f"{self.count} user samples"

    def summary(self) -> dict[str, object]:
        """The report's ``reference`` entry."""
        return {"source": self.source, "count": self.count, "note": self.note}


def find_samples(model_path: Path, explicit: Path | None) -> Path | None:
    """The samples file to use: the explicit one (must exist), else ``samples.npz`` beside the model."""
    if explicit is not None:
        if not explicit.is_file():
            raise OptimizeError(f"samples: {explicit} does not exist")
        return explicit
    beside = model_path.parent / SAMPLES_FILE
    return beside if beside.is_file() else None


def build_reference(info: ModelInfo, samples: Path | None, count: int, batch_dim: bool) -> ReferenceSet:
    """The validation inputs, in batches of at most :data:`REFERENCE_BATCH` along dim 0."""
    if samples is not None:
        return _from_samples(info, samples, batch_dim)
    return _random(info, count, batch_dim)


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
    return ReferenceSet("samples", batches, count, f"samples:{sha256_file(path)}")


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """A .npz of plain arrays, size-capped before loading; pickled objects are refused."""
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(item.file_size for item in archive.infolist())
        if unpacked > MAX_SAMPLES_BYTES:
            raise OptimizeError(f"samples {path.name}: {unpacked} bytes unpacked, limit {MAX_SAMPLES_BYTES}")
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
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


def _random(info: ModelInfo, count: int, batch_dim: bool) -> ReferenceSet:
    """Seeded, so the same model always gets the same set (and cache keys stay stable)."""
    rng = np.random.default_rng(0)
    if batch_dim:
        sizes = [min(REFERENCE_BATCH, count - start) for start in range(0, count, REFERENCE_BATCH)]
    else:
        sizes = [0] * max(1, min(count, 4))  # fixed shapes: a few whole inputs
    batches = [{t.name: random_tensor(rng, t, size or None) for t in info.inputs} for size in sizes]
    total = count if batch_dim else len(batches)
    shapes = ";".join(f"{t.name}:{t.dtype}:{t.shape}" for t in info.inputs)
    return ReferenceSet("random", batches, total, f"random:v1:{total}:{batch_dim}:{shapes}")


def random_tensor(rng: np.random.Generator, tensor: TensorInfo, batch: int | None) -> np.ndarray:
    """A plausible input: N(0, 1) floats, small non-negative ints (indices), 0..255 bytes, empty strings."""
    shape = concrete_shape(tensor, batch)
    kind = tensor.dtype.kind
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
