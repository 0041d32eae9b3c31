"""ModelInferRequest parsing that leaves large tensors where gRPC put them, and the service registration that
uses it.

protobuf copies a ``bytes`` field twice on its way to Python: into the parsed message, then into a new
``bytes`` object on every access. For a 600 KB image that is two 600 KB copies (~40 µs here) before numpy sees
it. A large request is therefore split at the wire level: its ``raw_input_contents`` entries (field 7, which
numpy reads in place) become views into the received buffer, and only the small remainder is parsed by
protobuf. The received buffer (the one copy out of gRPC's slices) is then the only copy before the batch.
"""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

SERVICE = "inference.GRPCInferenceService"
RAW_INPUT_CONTENTS = 7  # ModelInferRequest.raw_input_contents
ZERO_COPY_MIN_BYTES = 64 * 1024  # below this, two copies cost less than splitting the message in Python
_LENGTH_DELIMITED, _VARINT, _FIXED64, _FIXED32 = 2, 0, 1, 5


class RawViewRequest:
    """A ModelInferRequest whose ``raw_input_contents`` are read-only views into the received bytes; every
    other attribute is the parsed message's."""

    __slots__ = ("_message", "raw_input_contents")

    def __init__(self, message: Any, raw: list[memoryview]) -> None:
        self._message = message
        self.raw_input_contents = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._message, name)


def parse_model_infer(data: bytes) -> Any:
    """A ModelInferRequest from the wire; large ones come as a RawViewRequest. A message the split cannot
    read is handed to protobuf whole, so a malformed request fails exactly as it would without the split."""
    if len(data) < ZERO_COPY_MIN_BYTES:
        return pb.ModelInferRequest.FromString(data)
    split = _split_raw(data)
    if split is None:
        return pb.ModelInferRequest.FromString(data)
    rest, raw = split
    return RawViewRequest(pb.ModelInferRequest.FromString(rest), raw)


def _split_raw(data: bytes) -> tuple[bytes, list[memoryview]] | None:
    """(every field but raw_input_contents, the raw_input_contents entries as views), or None when the top
    level is not well formed."""
    view = memoryview(data)
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        key, pos = _varint(data, pos)
        wire_type = key & 7
        if pos < 0:
            return None
        if wire_type == _LENGTH_DELIMITED:
            length, pos = _varint(data, pos)
            if pos < 0:
                return None
            if key >> 3 == RAW_INPUT_CONTENTS and pos + length <= end:
                raw.append(view[pos : pos + length])
                pos += length
                continue
            pos += length
        elif wire_type == _VARINT:
            pos = _varint(data, pos)[1]
        elif wire_type in (_FIXED64, _FIXED32):
            pos += 8 if wire_type == _FIXED64 else 4
        else:
            return None  # groups or garbage: not in this message
        if not 0 <= pos <= end:
            return None
        kept.append(view[start:pos])
    return b"".join(kept), raw


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it); a truncated or over-long varint gives position -1."""
    value = shift = 0
    while pos < len(data) and shift < 64:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    return 0, -1


def add_inference_service(servicer: Any, server: grpc.aio.Server) -> None:
    """Register GRPCInferenceService like the generated helper does, with ModelInfer and ModelStreamInfer
    reading their requests through ``parse_model_infer``."""
    capture = _Capture()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, capture)
    handlers = {
        name: handler._replace(request_deserializer=parse_model_infer)
        if name in ("ModelInfer", "ModelStreamInfer")
        else handler
        for name, handler in capture.handlers.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


class _Capture:
    """Stands in for the server while the generated helper builds the method handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The generated helper registers the same handlers both ways; the registered ones are kept."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self.handlers = dict(handlers)
