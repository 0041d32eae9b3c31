"""Triton's classification extension: an output requested with ``classification: k`` comes back as the top
``k`` of its scores, a BYTES tensor of ``"score:index"`` or ``"score:index:label"`` strings.

As Triton does: for a model that batches, each sample's scores (every non-batch element, flattened, so
``[batch, classes]`` and ``[batch, classes, 1]`` both work) give one row, and the result is ``[batch, k]``;
without batching all elements are one row and the result is ``[k]``. ``k`` is clamped to the number of scores.
Scores print as C++'s ``std::to_string`` prints them (``%f``, six decimals, for FP32/FP64; plain digits for
integers); the label is the index's line of the output's ``label_filename``, left out when there is none.
Scores sort highest first; equal scores keep index order (Triton leaves ties unspecified), NaN sorts last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from server.errors import InvalidInput
from server.protocol.datatypes import DataType

PARAMETER = "classification"
"""The requested-output parameter (HTTP ``outputs[i].parameters``, gRPC ``InferRequestedOutputTensor``'s
``parameters``, an int64_param) that asks for the top k."""

CLASSIFIABLE = frozenset(["UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP32", "FP64"])
"""The datatypes Triton classifies; any other (BOOL, FP16, BF16, BYTES) is a 400."""


def class_count(value: Any, field: str) -> int:
    """The ``classification`` parameter's k: a positive integer (not a bool, float or string)."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise InvalidInput(f"{field}: must be a positive integer (the number of classes), got {value!r}")
    return value


def check_classifiable(name: str, datatype: DataType) -> None:
    """Refuse classification of an output whose datatype holds no scores."""
    if datatype.name not in CLASSIFIABLE:
        raise InvalidInput(
            f"output {name!r}: classification is not available for datatype {datatype.name}; "
            f"it needs one of {sorted(CLASSIFIABLE)}"
        )


def top_k(scores: np.ndarray, k: int, *, batched: bool, labels: Sequence[bytes] = ()) -> np.ndarray:
    """The top ``k`` classes of each row of ``scores`` as an object array of bytes, ``[batch, k']`` when
    ``batched`` (and scores has a dim), ``[k']`` otherwise, with ``k' = min(k, classes)``."""
    batched = batched and scores.ndim > 0
    rows = scores.reshape(scores.shape[0] if batched else 1, -1)
    count = min(k, rows.shape[1])
    order = _descending(rows)[:, :count]
    is_float = rows.dtype.kind == "f"
    result = np.empty((rows.shape[0], count), dtype=object)
    for row in range(rows.shape[0]):
        for column in range(count):
            index = int(order[row, column])
            value = rows[row, index]
            text = f"{float(value):f}" if is_float else str(int(value))
            entry = f"{text}:{index}".encode()
            if index < len(labels) and labels[index]:  # Triton leaves an empty label out
                entry += b":" + labels[index]
            result[row, column] = entry
    return result if batched else result.reshape(count)


def _descending(rows: np.ndarray) -> np.ndarray:
    """Per row, the indices by score, highest first; equal scores by index; NaN last."""
    if rows.dtype.kind == "f":
        rows = np.where(np.isnan(rows), -np.inf, rows)
    width = rows.shape[1]
    # A stable ascending sort of the reversed row, read backwards: highest first, ties in index order.
    ascending = np.argsort(rows[:, ::-1], axis=1, kind="stable")
    return np.asarray(width - 1 - ascending[:, ::-1])
