"""Model configuration in Triton's schema (the ``ModelConfig`` protobuf message).

Configs are read from ``config.pbtxt`` (Triton's protobuf text format), ``config.yaml`` or ``config.json``
(the same field names), then completed from the ONNX graph the way Triton's auto-complete does. Using the
protobuf message itself as the in-memory form means the HTTP ``/config`` JSON and the gRPC ``ModelConfig``
reply are the exact shapes Triton's tools read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import yaml
from google.protobuf import descriptor, json_format, text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from server import datatypes
from server.errors import LoadFailed
from server.optimize_block import split_pbtxt

ModelConfig = mc.ModelConfig
CONFIG_FILES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
DEFAULT_MODEL_FILENAME = "model.onnx"
PLATFORM = "onnxruntime_onnx"


@dataclass(frozen=True)
class TensorSpec:
    """What the server checks a request tensor against: dims exclude the batch dim; -1 is any size."""

    name: str
    datatype: datatypes.DataType
    dims: tuple[int, ...]


@dataclass
class LoadedConfig:
    """A config as read from disk, before completion; ``explicit`` lists the top-level keys it set."""

    config: Any
    explicit: set[str]
    optimize: dict[str, Any] | None = None
    """The ``optimize`` block (our extension), if the config has one."""


def read_config(model_dir: Path) -> LoadedConfig:
    """Read the model's config file if there is one; an empty config otherwise."""
    for name in CONFIG_FILES:
        path = model_dir / name
        if path.is_file():
            return parse_config(path.read_text(encoding="utf-8"), path.suffix.lstrip("."))
    return LoadedConfig(ModelConfig(), set())


def parse_config(text: str, fmt: str) -> LoadedConfig:
    """Parse config text in ``pbtxt``, ``yaml``/``yml`` or ``json`` format into a ModelConfig."""
    config = ModelConfig()
    try:
        if fmt == "pbtxt":
            text, optimize = split_pbtxt(text)
            text_format.Parse(text, config)
            explicit = _top_level_fields(text)
        else:
            data = yaml.safe_load(text) if fmt in ("yaml", "yml") else json.loads(text)
            if data is None:
                data = {}
            if not isinstance(data, dict):
                raise LoadFailed(f"config.{fmt}: top level must be a mapping, got {type(data).__name__}")
            optimize = data.pop("optimize", None)
            if optimize is not None and not isinstance(optimize, dict):
                raise LoadFailed(f"config.{fmt}: optimize must be a mapping, got {type(optimize).__name__}")
            json_format.ParseDict(data, config)
            explicit = set(data)
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError, ValueError) as exc:
        raise LoadFailed(f"config.{fmt}: {exc}") from None
    return LoadedConfig(config, explicit, optimize)


def _top_level_fields(text: str) -> set[str]:
    """Names of the fields a pbtxt sets at its top level, including scalars set to their default (proto3
    has no presence for those, and ``max_batch_size: 0`` must not be auto-completed away)."""
    tokenizer = text_format.Tokenizer(text.splitlines())
    tokens: list[str] = []
    while not tokenizer.AtEnd():
        tokens.append(tokenizer.token)
        tokenizer.NextToken()
    fields: set[str] = set()
    depth = 0
    for index, token in enumerate(tokens):
        if token in ("{", "[", "<"):
            depth += 1
        elif token in ("}", "]", ">"):
            depth -= 1
        elif (
            depth == 0
            and tokens[index + 1 : index + 2] in ([":"], ["{"], ["<"], ["["])
            and tokens[index - 1 : index] != [":"]
        ):
            fields.add(token)
    return fields


def complete_config(
    loaded: LoadedConfig,
    model_name: str,
    model: onnx.ModelProto,
    default_max_batch_size: int,
    gpus_visible: bool = False,
) -> Any:
    """Fill what the config leaves out from the ONNX graph, then check the two agree."""
    config = ModelConfig()
    config.CopyFrom(loaded.config)
    if config.name and config.name != model_name:
        raise LoadFailed(f"config name {config.name!r} does not match the model folder {model_name!r}")
    config.name = model_name
    if config.platform and config.platform != PLATFORM:
        raise LoadFailed(f"platform {config.platform!r} is not supported; expected {PLATFORM!r}")
    if config.backend and config.backend != "onnxruntime":
        raise LoadFailed(f"backend {config.backend!r} is not supported; expected 'onnxruntime'")
    config.platform = PLATFORM
    config.backend = "onnxruntime"
    if not config.default_model_filename:
        config.default_model_filename = DEFAULT_MODEL_FILENAME

    graph_inputs = _graph_tensors(model, inputs=True)
    graph_outputs = _graph_tensors(model, inputs=False)
    if "max_batch_size" not in loaded.explicit and _batchable(graph_inputs, graph_outputs):
        config.max_batch_size = default_max_batch_size
    if config.max_batch_size < 0:
        raise LoadFailed(f"max_batch_size must be >= 0, got {config.max_batch_size}")
    _complete_tensors(config.input, graph_inputs, config.max_batch_size, "input")
    _complete_tensors(config.output, graph_outputs, config.max_batch_size, "output")
    if config.max_batch_size > 0 and not loaded.explicit & {"max_batch_size", "dynamic_batching"}:
        # Fully auto-completed batchable model: batch dynamically. A config that sets max_batch_size
        # without dynamic_batching keeps Triton's meaning (no batching).
        config.dynamic_batching.SetInParent()
    if not config.instance_group:
        # As Triton's auto-complete: one instance on each GPU when there are GPUs, else one on the CPU.
        kind = mc.ModelInstanceGroup.KIND_GPU if gpus_visible else mc.ModelInstanceGroup.KIND_CPU
        config.instance_group.add(count=1, kind=kind)
    return config


def _graph_tensors(model: onnx.ModelProto, *, inputs: bool) -> dict[str, tuple[int, list[int]]]:
    """Name -> (ONNX element type, dims with -1 for symbolic or unknown) of graph inputs or outputs."""
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    values = graph.input if inputs else graph.output
    result: dict[str, tuple[int, list[int]]] = {}
    for value in values:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor_type.shape.dim]
        result[value.name] = (tensor_type.elem_type, dims)
    return result


def _batchable(*groups: dict[str, tuple[int, list[int]]]) -> bool:
    """True when every graph input and output has a dynamic first dimension."""
    tensors = [t for group in groups for t in group.values()]
    return bool(tensors) and all(dims and dims[0] == -1 for _, dims in tensors)


def _complete_tensors(configured: Any, graph: dict[str, tuple[int, list[int]]], max_batch_size: int, kind: str) -> None:
    """Add graph tensors the config lacks, fill missing datatype/dims, and check consistency."""
    listed = {t.name for t in configured}
    for unknown in listed - set(graph):
        raise LoadFailed(f"{kind} {unknown!r} in the config is not a {kind} of the ONNX graph {sorted(graph)}")
    missing = sorted(set(graph) - listed)
    if listed and missing and kind == "input":
        raise LoadFailed(f"the config lists inputs {sorted(listed)} but the model also needs {missing}")
    if not listed:
        for name in graph:
            configured.add(name=name)
    for tensor in configured:
        _complete_tensor(tensor, *graph[tensor.name], max_batch_size, kind)


def _complete_tensor(tensor: Any, elem_type: int, graph_dims: list[int], max_batch_size: int, kind: str) -> None:
    """Fill one tensor's datatype and dims from the graph, or check the configured ones against it."""
    dtype = datatypes.BY_ONNX_TYPE.get(elem_type)
    if dtype is None:
        raise LoadFailed(f"{kind} {tensor.name!r}: ONNX element type {elem_type} is not supported")
    if tensor.data_type == mc.TYPE_INVALID:
        tensor.data_type = mc.DataType.Value(dtype.config_name)
    elif mc.DataType.Name(tensor.data_type) != dtype.config_name:
        raise LoadFailed(
            f"{kind} {tensor.name!r}: config data_type {mc.DataType.Name(tensor.data_type)} "
            f"does not match the model's {dtype.config_name}"
        )
    model_dims = graph_dims[1:] if max_batch_size > 0 else graph_dims
    if max_batch_size > 0 and graph_dims and graph_dims[0] != -1:
        raise LoadFailed(
            f"{kind} {tensor.name!r}: max_batch_size is {max_batch_size} but the model's first "
            f"dimension is fixed at {graph_dims[0]}; set max_batch_size: 0"
        )
    if tensor.HasField("reshape"):
        raise LoadFailed(f"{kind} {tensor.name!r}: 'reshape' is not supported; give dims matching the ONNX graph")
    if not tensor.dims and not tensor.HasField("reshape"):
        tensor.dims.extend(model_dims)
    elif not tensor.HasField("reshape"):
        _check_configured_dims(tensor, model_dims, max_batch_size, kind)


def _check_configured_dims(tensor: Any, model_dims: list[int], max_batch_size: int, kind: str) -> None:
    """Configured dims must have the model's rank and may only narrow its dynamic dims."""
    dims = list(tensor.dims)
    if len(dims) != len(model_dims):
        raise LoadFailed(
            f"{kind} {tensor.name!r}: config dims {dims} have rank {len(dims)}, "
            f"the model expects rank {len(model_dims)} ({model_dims})"
            + (" not counting the batch dimension" if max_batch_size > 0 else "")
        )
    for index, (configured, model) in enumerate(zip(dims, model_dims, strict=True)):
        if configured != -1 and model != -1 and configured != model:
            raise LoadFailed(
                f"{kind} {tensor.name!r}: config dim {index} is {configured}, the model fixes it at {model}"
            )


def tensor_specs(config: Any, *, inputs: bool) -> list[TensorSpec]:
    """The input or output specs that requests and responses are checked against."""
    tensors = config.input if inputs else config.output
    return [TensorSpec(t.name, datatypes.BY_CONFIG_NAME[mc.DataType.Name(t.data_type)], tuple(t.dims)) for t in tensors]


def config_to_json(config: Message) -> dict[str, Any]:
    """Triton's JSON form of a config: proto field names, enum names, and 64-bit ints as numbers."""
    data = json_format.MessageToDict(
        config, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return _int64_as_numbers(config.DESCRIPTOR, data)


_INT64_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _int64_as_numbers(desc: Any, data: dict[str, Any]) -> dict[str, Any]:
    """json_format writes int64 as strings (JSON's number precision); Triton and perf_analyzer expect
    numbers, so convert them back, walking the message descriptor."""
    for key, value in data.items():
        field = desc.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            if value_field.message_type is not None:
                for item in value.values():
                    _int64_as_numbers(value_field.message_type, item)
            elif value_field.type in _INT64_TYPES:
                data[key] = {k: int(v) for k, v in value.items()}
        elif field.message_type is not None:
            items = value if isinstance(value, list) else [value]
            for item in items:
                _int64_as_numbers(field.message_type, item)
        elif field.type in _INT64_TYPES:
            data[key] = [int(v) for v in value] if isinstance(value, list) else int(value)
    return data
