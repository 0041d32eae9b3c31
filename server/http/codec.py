"""HTTP body <-> InferenceRequest/InferenceResponse, JSON and Triton's binary tensor extension.

Tensor payloads never pass through pydantic: JSON is parsed once by orjson and binary sections become
numpy arrays with ``np.frombuffer`` (zero copy)."""

from __future__ import annotations

import zlib
from typing import Any

import orjson

from server.errors import InvalidInput, PayloadTooLarge
from server.protocol import classification, datatypes, tensors
from server.protocol import shared_memory as shm
from server.protocol.inference import InferenceRequest, InferenceResponse, InputTensor, RequestedOutput
from server.protocol.numbers import parse_uint

HEADER_LENGTH = "Inference-Header-Content-Length"


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """Undo ``Content-Encoding: gzip|deflate``, never producing more than ``limit`` bytes."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidInput(f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise InvalidInput(f"body is not valid {encoding}: {exc}") from None
    if len(data) > limit or inflater.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed body exceeds the limit of {limit} bytes")
    if not inflater.eof:
        raise InvalidInput(f"body is not valid {encoding}: the stream is truncated")
    return data


def parse_json_object(data: bytes | memoryview, what: str = "request body") -> dict[str, Any]:
    """Parse a JSON object, turning any syntax error into a 400 that says where."""
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{what} must be a JSON object, got {type(parsed).__name__}")
    return parsed


def decode_request(
    body: bytes,
    header_length: str | None,
    model: str,
    version: str,
    limits: tensors.Limits,
    regions: shm.SharedMemoryRegistry | None = None,
) -> InferenceRequest:
    """Decode an infer request body (JSON, optionally followed by binary tensor data); tensors with
    shared-memory parameters are read from / checked against ``regions``."""
    binary = memoryview(b"")
    json_part: bytes | memoryview = body
    if header_length is not None:
        size = _header_size(header_length, len(body))
        view = memoryview(body)
        json_part, binary = view[:size], view[size:]
    doc = parse_json_object(json_part)
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidInput("inputs: must be a non-empty list of tensors")
    if len(raw_inputs) > limits.max_tensors:
        raise PayloadTooLarge(f"inputs: {len(raw_inputs)} tensors exceed the limit of {limits.max_tensors}")
    offset = 0
    inputs: list[InputTensor] = []
    for index, raw in enumerate(raw_inputs):
        tensor, offset = _decode_input(raw, index, binary, offset, limits, regions)
        inputs.append(tensor)
    if offset != len(binary):
        raise InvalidInput(f"binary data has {len(binary) - offset} bytes that no input's binary_data_size claims")
    request_id = doc.get("id", "")
    parameters = doc.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput("parameters: must be a JSON object")
    return InferenceRequest(
        model_name=model,
        model_version=version,
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs"), limits, regions),
        id=request_id if isinstance(request_id, str) else "" if request_id is None else str(request_id),
        parameters=parameters,
    )


def _header_size(header_length: str, body_size: int) -> int:
    size = parse_uint(header_length, HEADER_LENGTH)
    if size > body_size:
        raise InvalidInput(f"{HEADER_LENGTH}: {size} is outside the body's {body_size} bytes")
    return size


def _decode_input(
    raw: Any,
    index: int,
    binary: memoryview,
    offset: int,
    limits: tensors.Limits,
    regions: shm.SharedMemoryRegistry | None,
) -> tuple[InputTensor, int]:
    field = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise InvalidInput(f"{field}: must be a JSON object")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{field}.name: must be a non-empty string")
    field = f"input {name!r}"
    dtype = datatypes.by_name(str(raw.get("datatype")), field=f"{field} datatype")
    shape: Any = raw.get("shape")
    params = raw.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{field}.parameters: must be a JSON object")
    size = params.get("binary_data_size")
    ref = shm.reference(params, field)
    if ref is not None:
        if size is not None or "data" in raw:
            raise InvalidInput(f"{field}: {shm.REGION} excludes 'data' and binary_data_size")
        return InputTensor(
            name, dtype, tensors.from_raw(_read(regions, ref, field), dtype, shape, field, limits)
        ), offset
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
            raise InvalidInput(
                f"{field}: binary_data_size {size!r} runs past the {len(binary) - offset} binary bytes left"
            )
        array = tensors.from_raw(binary[offset : offset + size], dtype, shape, field, limits)
        return InputTensor(name, dtype, array), offset + size
    if "data" not in raw:
        raise InvalidInput(f"{field}: needs 'data' or a 'binary_data_size' parameter")
    array = tensors.from_list(raw["data"], dtype, shape, field, limits)
    return InputTensor(name, dtype, array), offset


def _read(regions: shm.SharedMemoryRegistry | None, ref: shm.SharedMemoryRef, field: str) -> bytes:
    if regions is None:
        raise InvalidInput(f"{field}: {shm.REGION}: this server does not serve shared memory")
    return regions.read(ref, field)


def _decode_outputs(
    raw: Any, limits: tensors.Limits, regions: shm.SharedMemoryRegistry | None
) -> list[RequestedOutput]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidInput("outputs: must be a list")
    if len(raw) > limits.max_tensors:
        raise PayloadTooLarge(f"outputs: {len(raw)} entries exceed the limit of {limits.max_tensors}")
    outputs: list[RequestedOutput] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"outputs[{index}]: must be an object with a string 'name'")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise InvalidInput(f"outputs[{index}].parameters: must be a JSON object")
        binary = params.get("binary_data")
        top = params.get(classification.PARAMETER)
        k = 0 if top is None else classification.class_count(top, f"outputs[{index}].parameters.classification")
        field = f"output {item['name']!r}"
        ref = shm.reference(params, field)
        if ref is not None:
            if regions is None:
                raise InvalidInput(f"{field}: {shm.REGION}: this server does not serve shared memory")
            regions.check(ref, field)
        outputs.append(RequestedOutput(item["name"], binary if isinstance(binary, bool) else None, k, ref))
    return outputs


def encode_response(
    response: InferenceResponse, request: InferenceRequest, regions: shm.SharedMemoryRegistry | None = None
) -> tuple[bytes, int | None]:
    """Encode a response; returns the body and, when binary sections follow, the JSON header's length.
    An output asked for in shared memory is written there and listed without its data."""
    default_binary = bool(request.parameters.get("binary_data_output", False))
    wants = {o.name: o.binary for o in request.outputs}
    targets = {o.name: o.shared_memory for o in request.outputs if o.shared_memory is not None}
    blobs: list[bytes] = []
    outputs: list[dict[str, Any]] = []
    for out in response.outputs:
        entry: dict[str, Any] = {
            "name": out.name,
            "datatype": out.datatype.name,
            "shape": list(out.array.shape),
        }
        target = targets.get(out.name)
        binary = wants.get(out.name)
        if target is not None and regions is not None:
            # As Triton: no data and no parameters (NVIDIA's C++ client reads binary_data_size from any
            # output that has parameters); the client knows where it asked for the output.
            regions.write(target, tensors.to_raw(out.array), f"output {out.name!r}")
        elif binary if binary is not None else default_binary:
            blob = tensors.to_raw(out.array)
            blobs.append(blob)
            entry["parameters"] = {"binary_data_size": len(blob)}
        else:
            entry["data"] = tensors.to_list(out.array)
        outputs.append(entry)
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    doc["outputs"] = outputs
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def dumps(value: Any) -> bytes:
    """JSON-encode a non-tensor reply."""
    return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
