"""Validation inputs for the conversion guard: the user's samples when given, else seeded random tensors
from the model's signature (batches of 8, 8 and 1 when the batch dim is dynamic, so a conversion that froze
the batch size is caught)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from optimizers.modelinfo import TensorInfo
from optimizers.reference import random_tensor
from optimizers.runtime import Feed
from server.convert.job import ConvertError

BATCH = 8
MAX_SAMPLES = 256
RANDOM_BATCHES = (BATCH, BATCH, 1)


def validation_batches(
    signature: Sequence[TensorInfo], samples: Mapping[str, np.ndarray] | None, batch_dynamic: bool
) -> tuple[list[Feed], str]:
    """(batches, "samples" | "random"). Non-batch dims of ``signature`` must be concrete ints."""
    if samples:
        return _from_samples(signature, samples, batch_dynamic), "samples"
    rng = np.random.default_rng(0)
    if batch_dynamic:
        return [{t.name: random_tensor(rng, t, size) for t in signature} for size in RANDOM_BATCHES], "random"
    return [{t.name: random_tensor(rng, t, None) for t in signature} for _ in range(3)], "random"


def _from_samples(signature: Sequence[TensorInfo], samples: Mapping[str, np.ndarray], batched: bool) -> list[Feed]:
    names = [t.name for t in signature]
    if set(samples) != set(names):
        raise ConvertError(f"samples: keys must be the input names {names}, got {sorted(samples)}", "invalid")
    feeds = {t.name: _cast(t, samples[t.name]) for t in signature}
    first = signature[0]
    stacked = batched or feeds[first.name].ndim == len(first.shape) + 1
    if not stacked:
        return [feeds]
    count = min(len(a) for a in feeds.values())
    if count == 0 or any(len(a) != count for a in feeds.values()):
        raise ConvertError("samples: every input needs the same, non-zero number of samples", "invalid")
    count = min(count, MAX_SAMPLES)
    if not batched:
        return [{n: a[i] for n, a in feeds.items()} for i in range(min(count, 16))]
    return [{n: a[s : s + BATCH] for n, a in feeds.items()} for s in range(0, count, BATCH)]


def _cast(tensor: TensorInfo, array: np.ndarray) -> np.ndarray:
    if not np.can_cast(array.dtype, tensor.dtype, casting="same_kind"):
        raise ConvertError(f"samples: {tensor.name!r} is {array.dtype}, the model wants {tensor.dtype}", "invalid")
    return np.ascontiguousarray(array.astype(tensor.dtype, copy=False))
