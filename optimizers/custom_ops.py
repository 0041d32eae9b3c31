"""onnxruntime-extensions' custom operators (image decode, tokenizers, string ops) for models that use them.

A model asks for them by importing one of the extensions' operator domains in its ``opset_import``. Only such a
model gets the library registered on its session (``SessionOptions.register_custom_ops_library``), so a server
without the extra installed serves every other model as before, and a model that needs it fails to load with a
message naming the extra. The domains are read from the file's top-level protobuf fields without parsing the
graph, so the check costs next to nothing even for a model of gigabytes.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

DOMAINS = frozenset({"ai.onnx.contrib", "com.microsoft.extensions"})
"""The operator domains onnxruntime-extensions registers (its string/tokenizer ops and its image/audio ops)."""
EXTRA = "pip install optiserve[extensions]"
OPTIMIZER_SKIP = (
    "the model uses onnxruntime-extensions' custom operators (pre/post-processing): the optimizer leaves it as it is "
    "(its passes and random reference inputs are not made for them)"
)
_OPSET_IMPORT = 8  # ModelProto.opset_import
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


class CustomOpsUnavailable(RuntimeError):
    """The model uses the extensions' operators and onnxruntime-extensions is not installed."""


def opset_domains(model_path: Path) -> frozenset[str]:
    """The operator domains a model file imports (empty when the file cannot be read as a ModelProto: the
    runtime then reports what is wrong with it)."""
    try:
        with open(model_path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return frozenset(_scan_opset_domains(data))
    except (OSError, ValueError, DecodeError):
        return frozenset()


def _scan_opset_domains(data: mmap.mmap) -> list[str]:
    """Walk the top-level fields of a serialized ModelProto, parsing only ``opset_import`` entries."""
    domains, offset, end = [], 0, len(data)
    while offset < end:
        key, offset = _varint(data, offset)
        field, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, offset = _varint(data, offset)
        elif wire == _FIXED64:
            offset += 8
        elif wire == _FIXED32:
            offset += 4
        elif wire == _LENGTH_DELIMITED:
            size, offset = _varint(data, offset)
            if field == _OPSET_IMPORT:
                entry = onnx.OperatorSetIdProto()
                entry.ParseFromString(data[offset : offset + size])
                domains.append(entry.domain)
            offset += size
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if offset != end:
        raise ValueError("truncated protobuf")
    return domains


def _varint(data: mmap.mmap, offset: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("bad varint")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, offset
        shift += 7


def uses_custom_ops(model_path: Path) -> bool:
    """Whether the model imports one of onnxruntime-extensions' operator domains."""
    return bool(opset_domains(model_path) & DOMAINS)


def library_for(model_path: Path) -> str | None:
    """The custom-ops library to register for this model's sessions: None for a model that needs none.
    Raises :class:`CustomOpsUnavailable` (naming the extra) when it needs them and they are not installed."""
    used = sorted(opset_domains(model_path) & DOMAINS)
    if not used:
        return None
    try:
        import onnxruntime_extensions
    except ImportError:
        raise CustomOpsUnavailable(
            f"the model uses onnxruntime-extensions' custom operators (domain {', '.join(used)}), which are not "
            f"installed; install them with `{EXTRA}`"
        ) from None
    return str(onnxruntime_extensions.get_library_path())


def register(options: Any, library: str | None) -> None:
    """Register ``library`` (from :func:`library_for`) on onnxruntime ``SessionOptions``; nothing for None."""
    if library is not None:
        options.register_custom_ops_library(library)
