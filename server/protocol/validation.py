"""Checks of a decoded request against what the model accepts (a :class:`TensorSpec` per tensor, which
``server.repository.config.tensor_specs`` builds from the model's config), done before anything is queued, so
a bad request fails alone and never poisons a batch."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

from server.errors import InvalidInput
from server.protocol.datatypes import DataType
from server.protocol.inference import InferenceRequest


@dataclass(frozen=True)
class TensorSpec:
    """What the server checks a request tensor against: dims exclude the batch dim; -1 is any size."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]


@dataclass(frozen=True)
class PreparedInputs:
    """Validated inputs, their sample count, and the key that decides which requests may share a batch."""

    tensors: dict[str, np.ndarray]
    samples: int
    key: Hashable


def prepare_inputs(request: InferenceRequest, specs: list[TensorSpec], max_batch_size: int) -> PreparedInputs:
    """Check names, datatypes, ranks and dims; return the arrays keyed by input name."""
    by_name = {spec.name: spec for spec in specs}
    tensors: dict[str, np.ndarray] = {}
    for tensor in request.inputs:
        spec = by_name.get(tensor.name)
        if spec is None:
            raise InvalidInput(
                f"input {tensor.name!r} is not an input of model {request.model_name!r}; expected {sorted(by_name)}"
            )
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is given more than once")
        if tensor.datatype.name != spec.datatype.name:
            raise InvalidInput(
                f"input {tensor.name!r}: datatype {tensor.datatype.name} does not match "
                f"the model's {spec.datatype.name}"
            )
        _check_dims(tensor.name, tuple(tensor.array.shape), spec.dims, max_batch_size)
        tensors[tensor.name] = tensor.array
    missing = sorted(set(by_name) - set(tensors))
    if missing:
        raise InvalidInput(f"model {request.model_name!r} needs input(s) {missing}, which the request lacks")
    samples = _samples(tensors, max_batch_size)
    key = tuple((name, tensors[name].shape[1:]) for name in by_name) if max_batch_size > 0 else None
    return PreparedInputs(tensors, samples, key)


def _check_dims(name: str, shape: tuple[int, ...], dims: tuple[int, ...], max_batch_size: int) -> None:
    batched = max_batch_size > 0
    expected_rank = len(dims) + (1 if batched else 0)
    if len(shape) != expected_rank:
        want = f"[batch, {', '.join(map(str, dims))}]" if batched else str(list(dims))
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has rank {len(shape)}; the model expects {want}")
    if batched and not 1 <= shape[0] <= max_batch_size:
        raise InvalidInput(f"input {name!r}: batch size {shape[0]} is outside 1..{max_batch_size} (max_batch_size)")
    offset = 1 if batched else 0
    for index, (size, wanted) in enumerate(zip(shape[offset:], dims, strict=True)):
        if wanted != -1 and size != wanted:
            raise InvalidInput(f"input {name!r}: dim {index + offset} is {size}, the model expects {wanted}")


def _samples(tensors: dict[str, np.ndarray], max_batch_size: int) -> int:
    if max_batch_size <= 0:
        return 1
    sizes = {array.shape[0] for array in tensors.values()}
    if len(sizes) > 1:
        raise InvalidInput(f"inputs disagree on the batch size: {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def check_requested_outputs(request: InferenceRequest, outputs: list[TensorSpec]) -> list[str]:
    """Names of the outputs to return, in the order the client asked (all of them if it asked none)."""
    known = [spec.name for spec in outputs]
    if not request.outputs:
        return known
    names = [output.name for output in request.outputs]
    if len(set(names)) != len(names):
        raise InvalidInput(f"outputs: an output is requested more than once in {names}")
    for name in names:
        if name not in known:
            raise InvalidInput(
                f"requested output {name!r} is not an output of model {request.model_name!r}; expected {known}"
            )
    return names
