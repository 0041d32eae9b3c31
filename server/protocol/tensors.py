"""Tensor encoding shared by both protocols: shape checks, raw bytes <-> numpy, JSON lists <-> numpy.

Every size is checked before anything is allocated: a request that claims a huge shape with a tiny
payload is refused from the header alone.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.errors import InvalidInput, PayloadTooLarge
from server.protocol.datatypes import DataType

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class Limits:
    """Caps applied to every decoded tensor."""

    max_elements: int
    max_rank: int
    max_tensors: int


def check_shape(shape: Any, field: str, limits: Limits) -> int:
    """Validate a wire shape and return its element count."""
    if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{field}: shape must be a list of integers, got {shape!r}")
    if len(shape) > limits.max_rank:
        raise InvalidInput(f"{field}: rank {len(shape)} exceeds the limit of {limits.max_rank}")
    if any(d < 0 for d in shape):
        raise InvalidInput(f"{field}: shape {list(shape)} has a negative dimension")
    return math.prod(shape)


def check_count(count: int, expected: int, field: str, limits: Limits) -> None:
    """The data must hold exactly prod(shape) elements, and no more than the configured cap."""
    if count != expected:
        raise InvalidInput(f"{field}: data has {count} elements but shape implies {expected}")
    if expected > limits.max_elements:
        raise PayloadTooLarge(f"{field}: {expected} elements exceed the limit of {limits.max_elements}")


def from_raw(raw: bytes | memoryview, dtype: DataType, shape: list[int], field: str, limits: Limits) -> Any:
    """Decode a binary tensor (the HTTP binary extension or gRPC raw contents) without copying."""
    expected = check_shape(shape, field, limits)
    if dtype.name == "BYTES":
        items = _split_bytes(memoryview(raw), field)
        check_count(len(items), expected, field, limits)
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    if len(raw) % dtype.itemsize:
        raise InvalidInput(f"{field}: {len(raw)} bytes is not a multiple of {dtype.name}'s {dtype.itemsize}")
    check_count(len(raw) // dtype.itemsize, expected, field, limits)
    return np.frombuffer(raw, dtype=dtype.numpy).reshape(shape)


def _split_bytes(view: memoryview, field: str) -> list[bytes]:
    """Split BYTES elements, each a 4-byte little-endian length followed by that many bytes."""
    items: list[bytes] = []
    offset, end = 0, len(view)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInput(f"{field}: truncated BYTES length prefix at byte {offset}")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > end:
            raise InvalidInput(f"{field}: BYTES element of {length} bytes runs past the end of the data")
        items.append(bytes(view[offset : offset + length]))
        offset += length
    return items


def to_raw(array: np.ndarray) -> bytes:
    """Encode a tensor for the binary extension / gRPC raw contents (row-major)."""
    if array.dtype.kind in "OSU":
        parts: list[bytes] = []
        for item in array.reshape(-1):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts.append(_LENGTH.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array).tobytes()


def from_list(data: Any, dtype: DataType, shape: list[int], field: str, limits: Limits) -> Any:
    """Decode JSON tensor data (flat or nested lists, row-major) into an array of ``shape``."""
    expected = check_shape(shape, field, limits)
    if not isinstance(data, list):
        data = [data]
    if dtype.name == "BYTES":
        flat = _flatten(data)
        check_count(len(flat), expected, field, limits)
        array = np.empty(len(flat), dtype=object)
        array[:] = [item.encode("utf-8") if isinstance(item, str) else item for item in flat]
        if not all(isinstance(item, bytes) for item in array):
            raise InvalidInput(f"{field}: BYTES data must be strings")
        return array.reshape(shape)
    try:
        parsed = np.array(data)
    except ValueError as exc:  # ragged nesting
        raise InvalidInput(f"{field}: data is not a regular nested list: {exc}") from None
    if dtype.numpy.kind in "iu" and parsed.dtype.kind in "fO":
        parsed = _exact_integers(data, dtype, field)  # e.g. UINT64 values past 2**63 parse as floats
    if parsed.size and parsed.dtype.kind not in _JSON_KINDS[dtype.numpy.kind]:
        got = _KIND_NAMES.get(parsed.dtype.kind, "values of another type")
        raise InvalidInput(f"{field}: data is not valid {dtype.name}: got {got}")
    try:
        array = parsed.astype(dtype.numpy)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInput(f"{field}: data is not valid {dtype.name}: {exc}") from None
    if dtype.numpy.kind in "iu" and not np.array_equal(array, parsed):
        raise InvalidInput(f"{field}: data has values out of {dtype.name}'s range")
    check_count(array.size, expected, field, limits)
    return array.reshape(shape)


def _exact_integers(data: list[Any], dtype: DataType, field: str) -> np.ndarray:
    """Integer data that numpy could not type exactly: check every value is an int, then convert."""
    flat = _flatten(data)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        raise InvalidInput(f"{field}: data is not valid {dtype.name}: got non-integer values")
    try:
        return np.array(flat, dtype=dtype.numpy)
    except OverflowError:
        raise InvalidInput(f"{field}: data has values out of {dtype.name}'s range") from None


# Which numpy kinds a JSON list may parse to for each target kind: no strings, no nulls, no truncation.
_JSON_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf", "V": "iuf"}
_KIND_NAMES = {
    "U": "strings",
    "S": "strings",
    "O": "nulls or mixed values",
    "f": "non-integer numbers",
    "b": "booleans",
}


def _flatten(data: list[Any]) -> list[Any]:
    """Flatten nested lists (JSON tensors may be nested row-major)."""
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item) if isinstance(item, list) else [item])
    return flat


def to_list(array: np.ndarray) -> Any:
    """A flat, JSON-serialisable view of a tensor for the JSON response body."""
    if array.dtype.kind in "OSU":
        return [
            item.decode("utf-8", errors="replace") if isinstance(item, bytes) else str(item)
            for item in array.reshape(-1)
        ]
    if (array.dtype.kind == "f" and array.dtype.itemsize < 4) or array.dtype.name == "bfloat16":
        return array.astype(np.float32).reshape(-1)
    return np.ascontiguousarray(array).reshape(-1)
