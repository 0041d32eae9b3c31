"""gRPC messages <-> InferenceRequest/InferenceResponse."""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf import json_format
from tritonclient.grpc import service_pb2 as pb

from server.errors import InvalidInput, PayloadTooLarge
from server.protocol import classification, datatypes, tensors
from server.protocol import shared_memory as shm
from server.protocol.inference import InferenceRequest, InferenceResponse, InputTensor, RequestedOutput

# Which typed ``InferTensorContents`` field carries each datatype (FP16/BF16 travel only as raw bytes).
_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def parameter_value(param: Any) -> Any:
    """The Python value of an InferParameter / ModelRepositoryParameter oneof."""
    kind = param.WhichOneof("parameter_choice")
    return getattr(param, kind) if kind else None


def decode_request(
    message: Any, limits: tensors.Limits, regions: shm.SharedMemoryRegistry | None = None
) -> InferenceRequest:
    """Decode a ModelInferRequest; raw contents become numpy arrays without copying. Inputs in shared memory
    (read from ``regions``) have no raw_input_contents entry: the entries belong to the other inputs, in order,
    as tritonclient sends them."""
    if not message.inputs:
        raise InvalidInput("inputs: must be a non-empty list of tensors")
    if len(message.inputs) > limits.max_tensors or len(message.outputs) > limits.max_tensors:
        raise PayloadTooLarge(f"a request may carry at most {limits.max_tensors} inputs and outputs")
    refs = [_reference(tensor.parameters, f"input {tensor.name!r}") for tensor in message.inputs]
    raw = message.raw_input_contents
    direct = sum(ref is None for ref in refs)
    if raw and len(raw) != direct:
        raise InvalidInput(f"raw_input_contents has {len(raw)} entries for {direct} inputs not in shared memory")
    inputs: list[InputTensor] = []
    next_raw = 0
    for tensor, ref in zip(message.inputs, refs, strict=True):
        if ref is not None:
            inputs.append(_shared_input(tensor, ref, regions, limits))
            continue
        inputs.append(_decode_input(tensor, raw[next_raw] if raw else None, limits))
        next_raw += 1
    outputs = [_requested_output(index, output, regions) for index, output in enumerate(message.outputs)]
    parameters = {key: parameter_value(value) for key, value in message.parameters.items()}
    return InferenceRequest(message.model_name, message.model_version, inputs, outputs, message.id, parameters)


def _reference(parameters: Any, field: str) -> shm.SharedMemoryRef | None:
    if shm.REGION not in parameters and shm.BYTE_SIZE not in parameters and shm.OFFSET not in parameters:
        return None
    return shm.reference({key: parameter_value(value) for key, value in parameters.items()}, field)


def _shared_input(
    tensor: Any, ref: shm.SharedMemoryRef, regions: shm.SharedMemoryRegistry | None, limits: tensors.Limits
) -> InputTensor:
    field = f"input {tensor.name!r}"
    if not tensor.name:
        raise InvalidInput("inputs: every tensor needs a name")
    if tensor.HasField("contents"):
        raise InvalidInput(f"{field}: contents must not be set for an input in shared memory")
    if regions is None:
        raise InvalidInput(f"{field}: {shm.REGION}: this server does not serve shared memory")
    dtype = datatypes.by_name(tensor.datatype, field=f"{field} datatype")
    array = tensors.from_raw(regions.read(ref, field), dtype, list(tensor.shape), field, limits)
    return InputTensor(tensor.name, dtype, array)


def _requested_output(index: int, output: Any, regions: shm.SharedMemoryRegistry | None) -> RequestedOutput:
    """An InferRequestedOutputTensor; ``parameters["classification"]`` (an int64_param, as tritonclient's
    ``class_count`` sets it) asks for the top k; shared-memory parameters say where to write it."""
    ref = _reference(output.parameters, f"output {output.name!r}")
    if ref is not None:
        if regions is None:
            raise InvalidInput(f"output {output.name!r}: {shm.REGION}: this server does not serve shared memory")
        regions.check(ref, f"output {output.name!r}")
    top = output.parameters.get(classification.PARAMETER)
    if top is None:
        return RequestedOutput(output.name, shared_memory=ref)
    field = f"outputs[{index}].parameters.classification"
    if top.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"{field}: must be an int64_param")
    k = classification.class_count(parameter_value(top), field)
    return RequestedOutput(output.name, classification=k, shared_memory=ref)


def _decode_input(tensor: Any, raw: bytes | None, limits: tensors.Limits) -> InputTensor:
    field = f"input {tensor.name!r}"
    if not tensor.name:
        raise InvalidInput("inputs: every tensor needs a name")
    dtype = datatypes.by_name(tensor.datatype, field=f"{field} datatype")
    shape = list(tensor.shape)
    if raw is not None:
        if tensor.HasField("contents"):  # Triton's rule: one source of data per request, never both
            raise InvalidInput(f"{field}: contents must not be set when the request uses raw_input_contents")
        return InputTensor(tensor.name, dtype, tensors.from_raw(raw, dtype, shape, field, limits))
    contents_field = _CONTENTS_FIELD.get(dtype.name)
    if contents_field is None:
        raise InvalidInput(f"{field}: {dtype.name} data must be sent in raw_input_contents")
    values = getattr(tensor.contents, contents_field)
    count = tensors.check_shape(shape, field, limits)
    tensors.check_count(len(values), count, field, limits)
    if dtype.name == "BYTES":
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
    else:
        try:
            array = np.array(values, dtype=dtype.numpy)
        except (OverflowError, ValueError, TypeError) as exc:
            raise InvalidInput(f"{field}: {contents_field} do not fit {dtype.name}: {exc}") from None
    return InputTensor(tensor.name, dtype, array.reshape(shape))


def encode_response(
    response: InferenceResponse,
    request: InferenceRequest | None = None,
    regions: shm.SharedMemoryRegistry | None = None,
) -> Any:
    """A ModelInferResponse carrying every output in raw_output_contents, as Triton does. An output asked for in
    shared memory is written there and carries its shared-memory parameters and an empty raw entry, so the raw
    entries still pair with the outputs by index (NVIDIA's C++ client, perf_analyzer's, crashes otherwise)."""
    message = pb.ModelInferResponse(
        model_name=response.model_name, model_version=response.model_version, id=response.id
    )
    targets = {o.name: o.shared_memory for o in request.outputs if o.shared_memory} if request and regions else {}
    for out in response.outputs:
        tensor = message.outputs.add(name=out.name, datatype=out.datatype.name, shape=out.array.shape)
        target = targets.get(out.name)
        if target is None or regions is None:
            message.raw_output_contents.append(tensors.to_raw(out.array))
            continue
        regions.write(target, tensors.to_raw(out.array), f"output {out.name!r}")
        for key, value in target.parameters().items():
            if isinstance(value, str):
                tensor.parameters[key].string_param = value
            else:
                tensor.parameters[key].int64_param = value
        message.raw_output_contents.append(b"")
    return message


def from_json(data: Any, message: Any) -> Any:
    """Fill a protobuf message from the dict the DataPlane returns (Triton's JSON shapes)."""
    return json_format.ParseDict(data, message, ignore_unknown_fields=True)
