"""The V2 protocol's tensor datatypes and their numpy, ONNX and Triton-config equivalents."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto

from server.errors import InvalidInput


@dataclass(frozen=True)
class DataType:
    """One V2 datatype: its wire name, numpy dtype, Triton config enum name and ONNX element type."""

    name: str
    numpy: np.dtype
    config_name: str
    onnx_type: int

    @property
    def itemsize(self) -> int:
        """Bytes per element in the binary encoding (BYTES has no fixed size: 0)."""
        return 0 if self.name == "BYTES" else self.numpy.itemsize


_ALL = [
    DataType("BOOL", np.dtype(np.bool_), "TYPE_BOOL", TensorProto.BOOL),
    DataType("UINT8", np.dtype(np.uint8), "TYPE_UINT8", TensorProto.UINT8),
    DataType("UINT16", np.dtype(np.uint16), "TYPE_UINT16", TensorProto.UINT16),
    DataType("UINT32", np.dtype(np.uint32), "TYPE_UINT32", TensorProto.UINT32),
    DataType("UINT64", np.dtype(np.uint64), "TYPE_UINT64", TensorProto.UINT64),
    DataType("INT8", np.dtype(np.int8), "TYPE_INT8", TensorProto.INT8),
    DataType("INT16", np.dtype(np.int16), "TYPE_INT16", TensorProto.INT16),
    DataType("INT32", np.dtype(np.int32), "TYPE_INT32", TensorProto.INT32),
    DataType("INT64", np.dtype(np.int64), "TYPE_INT64", TensorProto.INT64),
    DataType("FP16", np.dtype(np.float16), "TYPE_FP16", TensorProto.FLOAT16),
    DataType("FP32", np.dtype(np.float32), "TYPE_FP32", TensorProto.FLOAT),
    DataType("FP64", np.dtype(np.float64), "TYPE_FP64", TensorProto.DOUBLE),
    DataType("BF16", np.dtype(ml_dtypes.bfloat16), "TYPE_BF16", TensorProto.BFLOAT16),
    DataType("BYTES", np.dtype(np.object_), "TYPE_STRING", TensorProto.STRING),
]

BY_NAME: dict[str, DataType] = {d.name: d for d in _ALL}
BY_CONFIG_NAME: dict[str, DataType] = {d.config_name: d for d in _ALL}
BY_ONNX_TYPE: dict[int, DataType] = {d.onnx_type: d for d in _ALL}


def by_name(name: str, *, field: str = "datatype") -> DataType:
    """Resolve a wire datatype name, raising a 400 that names the field when it is unknown."""
    try:
        return BY_NAME[name]
    except (KeyError, TypeError):
        raise InvalidInput(f"{field}: unknown datatype {name!r}; expected one of {sorted(BY_NAME)}") from None


def of_array(array: np.ndarray) -> DataType:
    """The V2 datatype of a numpy array (strings and bytes map to BYTES)."""
    if array.dtype.kind in "OSU":
        return BY_NAME["BYTES"]
    for dtype in _ALL:
        if dtype.numpy == array.dtype:
            return dtype
    raise InvalidInput(f"numpy dtype {array.dtype} has no V2 datatype")
