"""Model configuration in Triton's schema (the ``ModelConfig`` protobuf message).

Configs are read from ``config.pbtxt`` (Triton's protobuf text format), ``config.yaml`` or ``config.json``
(the same field names), then completed from the ONNX graph the way Triton's auto-complete does. Using the
protobuf message itself as the in-memory form means the HTTP ``/config`` JSON and the gRPC ``ModelConfig``
reply are the exact shapes Triton's tools read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import onnx
import yaml
from google.protobuf import descriptor, json_format, text_format
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2 as mc

from server.errors import InvalidInput, LoadFailed
from server.protocol import datatypes
from server.protocol.numbers import INT64_MAX, parse_positive
from server.protocol.validation import TensorSpec
from server.repository.modelfile import check_file_name
from server.repository.optimize_block import check_block, split_pbtxt

ModelConfig: TypeAlias = mc.ModelConfig
"""Triton's ModelConfig message: the in-memory form of a model's config (tritonclient ships no type stubs, so for
mypy this is Any; the name still says what a ``config`` parameter holds)."""
ModelInstanceGroup: TypeAlias = mc.ModelInstanceGroup
"""One ``instance_group`` entry of a ModelConfig."""
ModelInput: TypeAlias = mc.ModelInput
"""One ``input`` entry of a ModelConfig."""
CONFIG_FILES = ("config.pbtxt", "config.yaml", "config.yml", "config.json")
DEFAULT_MODEL_FILENAME = "model.onnx"
PLATFORM = "onnxruntime_onnx"

# ---- what a config may ask for ------------------------------------------------------------------------
# Triton's schema takes any int32/uint64 here. Past these limits a config fails its load (400 from the load
# and upload APIs, before an upload is published; UNAVAILABLE with the reason at start) rather than loading
# and then hanging or failing every request, killing a batcher thread or allocating until the process dies.
MAX_BATCH_SIZE = 1 << 20
"""max_batch_size, preferred and CUDA graph batch sizes."""
MAX_DIM = 2**31 - 1
"""One configured dimension (TensorRT and most kernels index with int32); -1 is any size."""
MAX_RANK = 64
"""Dimensions of one configured tensor."""
MAX_TENSORS = 1024
"""Inputs, and outputs, a config may list."""
MAX_INSTANCES = 256
"""Instances of one model version in all: count x GPUs, summed over the instance groups."""
MAX_PRIORITY_LEVELS = 1000
"""dynamic_batching.priority_levels: the batcher keeps a queue per level and scans them per batch."""
MAX_MICROSECONDS = 3_600_000_000
"""Every duration in microseconds (queue delay, queue timeouts): one hour."""
MAX_QUEUE_SIZE = 1_000_000
"""max_queue_size of a queue policy (0: the server's --default-max-queue-size)."""
MAX_THREADS = 1024
"""parameters intra_op_thread_count / inter_op_thread_count."""
MAX_CONFIG_BYTES = 4 << 20
"""A config file read from the repository."""
MAX_WARMUP_ENTRIES = 256
"""model_warmup entries of one config."""
MAX_WARMUP_COUNT = 1000
"""model_warmup[].count: times one entry runs on each instance."""
MAX_WARMUP_ELEMENTS = 1 << 26
"""Elements of every model_warmup entry together (batch_size x dims, summed over inputs and entries): the
samples are built in memory before a load."""
THREAD_PARAMETERS = ("intra_op_thread_count", "inter_op_thread_count")


@dataclass
class LoadedConfig:
    """A config as read from disk, before completion; ``explicit`` lists the top-level keys it set."""

    config: ModelConfig
    explicit: set[str]
    optimize: dict[str, Any] | None = None
    """The ``optimize`` block (our extension), if the config has one."""


def read_config(model_dir: Path) -> LoadedConfig:
    """Read the model's config file if there is one; an empty config otherwise. The file may be a link, but
    only to a file inside the model's own folder: a config is never read from elsewhere (nor does an error
    tell whether something exists out there)."""
    folder = model_dir.resolve()
    for name in CONFIG_FILES:
        path = model_dir / name
        if not path.is_symlink() and not path.exists():
            continue
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a link loop
            raise LoadFailed(f"{name}: the link cannot be resolved") from None
        if target == folder or not target.is_relative_to(folder):
            raise LoadFailed(f"{name}: links to a file outside the model folder; a config must be the model's own")
        if not target.is_file():
            continue
        return parse_config(_read_text(target, name), path.suffix.lstrip("."))
    return LoadedConfig(ModelConfig(), set())


def _read_text(path: Path, name: str) -> str:
    """A config file's text, at most MAX_CONFIG_BYTES of UTF-8."""
    with open(path, "rb") as file:
        data = file.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise LoadFailed(f"{name}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LoadFailed(f"{name}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def parse_config(text: str, fmt: str) -> LoadedConfig:
    """Parse config text in ``pbtxt``, ``yaml``/``yml`` or ``json`` format into a ModelConfig, and check
    every value against :func:`check_config` (LoadFailed naming the field)."""
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
            _check_json_integers(config.DESCRIPTOR, data, "")
            json_format.ParseDict(data, config)
            explicit = set(data)
    except (text_format.ParseError, json_format.ParseError, yaml.YAMLError, ValueError) as exc:
        raise LoadFailed(f"config.{fmt}: {exc}") from None
    except RecursionError:
        raise LoadFailed(f"config.{fmt}: nested too deeply") from None
    loaded = LoadedConfig(config, explicit, optimize)
    check_config(loaded)
    return loaded


_JSON_INTEGER = re.compile(r"-?[0-9]{1,20}")
_INTEGER_TYPES = {
    descriptor.FieldDescriptor.TYPE_INT32,
    descriptor.FieldDescriptor.TYPE_UINT32,
    descriptor.FieldDescriptor.TYPE_SINT32,
    descriptor.FieldDescriptor.TYPE_FIXED32,
    descriptor.FieldDescriptor.TYPE_SFIXED32,
    descriptor.FieldDescriptor.TYPE_INT64,
    descriptor.FieldDescriptor.TYPE_UINT64,
    descriptor.FieldDescriptor.TYPE_SINT64,
    descriptor.FieldDescriptor.TYPE_FIXED64,
    descriptor.FieldDescriptor.TYPE_SFIXED64,
}


def _check_json_integers(desc: Any, data: Any, where: str) -> None:
    """JSON may give integers as strings (protobuf's JSON mapping); protobuf then reads them with ``int()``,
    which takes ``"1_000"`` and non-ASCII digits. Only plain ASCII digits are numbers here, as everywhere."""
    if not isinstance(data, dict):
        return  # protobuf's own parse reports the wrong shape
    for key, value in data.items():
        field = desc.fields_by_name.get(key) or next((f for f in desc.fields if f.json_name == key), None)
        if field is None:
            continue
        name = f"{where}.{field.name}" if where else field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if isinstance(value, dict):
                key_field = field.message_type.fields_by_name["key"]
                value_field = field.message_type.fields_by_name["value"]
                for map_key, item in value.items():
                    if key_field.type in _INTEGER_TYPES:
                        _check_json_integer(map_key, f"{name} key")
                    _check_field_values(value_field, [item], f"{name}[{map_key}]")
        else:
            _check_field_values(field, value if isinstance(value, list) else [value], name)


def _check_field_values(field: Any, values: list[Any], name: str) -> None:
    for value in values:
        if field.message_type is not None:
            _check_json_integers(field.message_type, value, name)
        elif field.type in _INTEGER_TYPES:
            _check_json_integer(value, name)


def _check_json_integer(value: Any, name: str) -> None:
    if isinstance(value, str) and _JSON_INTEGER.fullmatch(value) is None:
        raise ValueError(f"{name}: {value[:40]!r} is not an integer in ASCII digits")  # parse_config names the file


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


def named_copy(loaded: LoadedConfig, model_name: str) -> ModelConfig:
    """A copy of the config named after its model folder; a config naming another model is refused."""
    config = ModelConfig()
    config.CopyFrom(loaded.config)
    if config.name and config.name != model_name:
        raise LoadFailed(f"config name {config.name!r} does not match the model folder {model_name!r}")
    config.name = model_name
    return config


def complete_config(
    loaded: LoadedConfig,
    model_name: str,
    model: onnx.ModelProto,
    default_max_batch_size: int,
    gpus_visible: bool = False,
) -> ModelConfig:
    """Fill what the config leaves out from the ONNX graph, then check the two agree."""
    config = named_copy(loaded, model_name)
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
    _check_range("max_batch_size", config.max_batch_size, 0, MAX_BATCH_SIZE)
    check_batch_sizes(config)
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
    check_warmup(config, completed=True)
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


def tensor_specs(config: ModelConfig, *, inputs: bool) -> list[TensorSpec]:
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


# ---- checks: every value a config gives, before anything is published, allocated or served ------------
def check_config(loaded: LoadedConfig) -> None:
    """Check what a config asks for on its own, before completion: enum values, every field that names a
    file, the range of every number the server uses, and the relations between them. Relations to
    ``max_batch_size`` are checked here when the config sets it, and again by :func:`complete_config`."""
    config = loaded.config
    _check_enums(config, "")
    _check_file_fields(config)
    _check_range("max_batch_size", config.max_batch_size, 0, MAX_BATCH_SIZE)
    for version in config.version_policy.specific.versions:
        _check_range("version_policy.specific.versions", version, 1, INT64_MAX)
    for kind, tensors in (("input", config.input), ("output", config.output)):
        _check_tensors(kind, tensors)
    _check_instance_groups(config)
    _check_dynamic_batching(config.dynamic_batching)
    for key in THREAD_PARAMETERS:
        thread_count(config, key)
    if "max_batch_size" in loaded.explicit:
        check_batch_sizes(config)
    check_warmup(config, completed=False)
    if loaded.optimize is not None:
        check_block(loaded.optimize)


def model_filename(config: ModelConfig) -> str:
    """The model file a config names (``default_model_filename``, else model.onnx): a plain file name."""
    return check_file_name(config.default_model_filename or DEFAULT_MODEL_FILENAME, "default_model_filename")


def thread_count(config: ModelConfig, key: str) -> int:
    """Triton's onnxruntime-backend thread parameters (``parameters { key: "intra_op_thread_count" ... }``):
    a positive count in ASCII digits up to MAX_THREADS, 0 when absent."""
    if key not in config.parameters:
        return 0
    text = config.parameters[key].string_value
    try:
        count = parse_positive(text, f"parameters.{key}")
    except InvalidInput as exc:
        raise LoadFailed(exc.message) from None
    _check_range(f"parameters.{key}", count, 1, MAX_THREADS)
    return count


def check_batch_sizes(config: ModelConfig) -> None:
    """Batch sizes the config names must be ones the model can take: 1..max_batch_size."""
    largest = int(config.max_batch_size)
    preferred = list(config.dynamic_batching.preferred_batch_size)
    if preferred and largest < 1:
        raise LoadFailed("dynamic_batching.preferred_batch_size: needs max_batch_size > 0 (the model has no batch dim)")
    for size in preferred:
        _check_range("dynamic_batching.preferred_batch_size", size, 1, largest, "max_batch_size")
    specified = [int(spec.batch_size) for spec in config.optimization.cuda.graph_spec]
    if largest < 1 and any(specified):
        raise LoadFailed("optimization.cuda.graph_spec.batch_size: must be 0 for a model with max_batch_size 0")
    outside = [size for size in specified if largest >= 1 and not 1 <= size <= largest]
    if outside:
        raise LoadFailed(
            f"optimization.cuda.graph_spec.batch_size: {outside[0]} is outside 1..max_batch_size ({largest})"
        )


def _check_range(name: str, value: int, low: int, high: int, high_name: str = "") -> None:
    if not low <= value <= high:
        limit = f"{high_name} ({high})" if high_name else str(high)
        raise LoadFailed(f"{name}: {value} is outside {low}..{limit}")


def _check_enums(message: Message, where: str) -> None:
    """proto3 enums are open: ``kind: 7`` or ``"data_type": 99`` parse, and would then fail or misbehave
    far from the config. Every enum value must be one the schema names."""
    for field, value in message.ListFields():
        name = f"{where}.{field.name}" if where else field.name
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            if field.message_type.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    _check_enums(item, f"{name}[{key}]")
        elif field.message_type is not None:
            for index, item in enumerate(value if field.is_repeated else [value]):
                _check_enums(item, f"{name}[{index}]" if field.is_repeated else name)
        elif field.enum_type is not None:
            for number in value if field.is_repeated else [value]:
                if number not in field.enum_type.values_by_number:
                    raise LoadFailed(f"{name}: {number} is not a {field.enum_type.name} value")


def _check_file_fields(config: ModelConfig) -> None:
    """Every field of Triton's schema that names a file takes a plain file name (no folder, no ``..``, not
    absolute, not hidden), with the rules of uploaded file names; a custom-op library (a shared object,
    i.e. code) is never loaded."""
    model_filename(config)
    for key, name in config.cc_model_filenames.items():
        check_file_name(name, f"cc_model_filenames[{key!r}]")
    for index, output in enumerate(config.output):
        if output.label_filename:
            check_file_name(output.label_filename, f"output[{index}].label_filename")
    for index, warmup in enumerate(config.model_warmup):
        for key, value in warmup.inputs.items():
            if value.input_data_file:
                check_file_name(value.input_data_file, f"model_warmup[{index}].inputs[{key!r}].input_data_file")
    for index, state in enumerate(config.sequence_batching.state):
        for number, initial in enumerate(state.initial_state):
            if initial.data_file:
                check_file_name(
                    initial.data_file, f"sequence_batching.state[{index}].initial_state[{number}].data_file"
                )
    if config.model_operations.op_library_filename:
        raise InvalidInput("model_operations.op_library_filename: custom operation libraries are not loaded")


def _check_tensors(kind: str, tensors: Any) -> None:
    if len(tensors) > MAX_TENSORS:
        raise LoadFailed(f"{kind}: {len(tensors)} tensors listed, at most {MAX_TENSORS}")
    seen: set[str] = set()
    for index, tensor in enumerate(tensors):
        where = f"{kind}[{index}]"
        if tensor.name in seen:
            raise LoadFailed(f"{where}.name: {tensor.name!r} is listed twice")
        seen.add(tensor.name)
        if len(tensor.dims) > MAX_RANK:
            raise LoadFailed(f"{where}.dims: rank {len(tensor.dims)} is more than {MAX_RANK}")
        for dim in tensor.dims:
            if dim != -1 and not 1 <= dim <= MAX_DIM:
                raise LoadFailed(f"{where}.dims: {dim} must be -1 (any size) or 1..{MAX_DIM}")


def _check_instance_groups(config: ModelConfig) -> None:
    """count 0 is Triton's default of 1 (proto3 cannot tell it from unset); a negative count is refused."""
    total = 0
    for index, group in enumerate(config.instance_group):
        _check_range(f"instance_group[{index}].count", group.count, 0, MAX_INSTANCES)
        for gpu in group.gpus:
            _check_range(f"instance_group[{index}].gpus", gpu, 0, MAX_INSTANCES - 1)
        total += (group.count or 1) * max(1, len(group.gpus))
        if total > MAX_INSTANCES:
            raise LoadFailed(
                f"instance_group: {total} instances (count x gpus, over every group), at most {MAX_INSTANCES}"
            )


def _check_dynamic_batching(batching: Any) -> None:
    """Triton's rules (default and per-key levels within 1..priority_levels), within our limits."""
    where = "dynamic_batching"
    _check_range(f"{where}.max_queue_delay_microseconds", batching.max_queue_delay_microseconds, 0, MAX_MICROSECONDS)
    levels = int(batching.priority_levels)
    _check_range(f"{where}.priority_levels", levels, 0, MAX_PRIORITY_LEVELS)
    if batching.default_priority_level > levels:
        raise LoadFailed(
            f"{where}.default_priority_level: {batching.default_priority_level} is more than priority_levels ({levels})"
        )
    _check_queue_policy(f"{where}.default_queue_policy", batching.default_queue_policy)
    for level, policy in batching.priority_queue_policy.items():
        _check_range(f"{where}.priority_queue_policy key", level, 1, levels, "priority_levels")
        _check_queue_policy(f"{where}.priority_queue_policy[{level}]", policy)


def _check_queue_policy(where: str, policy: Any) -> None:
    _check_range(f"{where}.default_timeout_microseconds", policy.default_timeout_microseconds, 0, MAX_MICROSECONDS)
    _check_range(f"{where}.max_queue_size", policy.max_queue_size, 0, MAX_QUEUE_SIZE)


def check_warmup(config: ModelConfig, *, completed: bool) -> None:
    """Triton's ``model_warmup`` entries, against what the config says: every input named must be a model
    input with the same data_type, dims (without the batch dim) fixed and fitting the configured dims,
    1 <= batch_size <= max_batch_size (1 without a batch dim; 0 is 1), exactly one data source, count
    (0 is 1) and the elements of all entries bounded. Before completion (``completed`` False) only what the
    config itself lists is checked against; after it, every model input must be given."""
    entries = config.model_warmup
    if len(entries) > MAX_WARMUP_ENTRIES:
        raise LoadFailed(f"model_warmup: {len(entries)} entries, at most {MAX_WARMUP_ENTRIES}")
    inputs = {tensor.name: tensor for tensor in config.input}
    batched = int(config.max_batch_size) > 0
    total = 0
    for index, warmup in enumerate(entries):
        where = f"model_warmup[{index}]" + (f" ({warmup.name!r})" if warmup.name else "")
        if batched:
            _check_range(
                f"{where}.batch_size", max(int(warmup.batch_size), 1), 1, int(config.max_batch_size), "max_batch_size"
            )
        elif completed and warmup.batch_size > 1:
            raise LoadFailed(
                f"{where}.batch_size: {warmup.batch_size} must be 1 (max_batch_size 0: no batch dimension)"
            )
        _check_range(f"{where}.count", warmup.count, 0, MAX_WARMUP_COUNT)
        if not warmup.inputs:
            raise LoadFailed(f"{where}.inputs: no inputs given; every model input needs data")
        if completed and (missing := sorted(set(inputs) - set(warmup.inputs))):
            raise LoadFailed(f"{where}.inputs: the model's inputs {missing} have no warmup data")
        for key, value in sorted(warmup.inputs.items()):
            elements = _check_warmup_input(f"{where}.inputs[{key!r}]", key, value, inputs, batched)
            total += max(int(warmup.batch_size), 1) * elements
            if total > MAX_WARMUP_ELEMENTS:
                raise LoadFailed(
                    f"{where}.inputs[{key!r}]: the warmup entries hold more than {MAX_WARMUP_ELEMENTS} elements "
                    "(batch_size x dims over every input and entry)"
                )


def _check_warmup_input(at: str, key: str, value: Any, inputs: dict[str, Any], batched: bool) -> int:
    """One ``model_warmup[].inputs`` value; returns the elements of one sample."""
    if inputs and key not in inputs:
        raise LoadFailed(f"{at}: not an input of the model {sorted(inputs)}")
    if value.WhichOneof("input_data_type") is None:
        raise LoadFailed(f"{at}: give exactly one of zero_data, random_data or input_data_file")
    if value.data_type == mc.TYPE_INVALID:
        raise LoadFailed(f"{at}.data_type: missing")
    tensor = inputs.get(key)
    if tensor is not None and tensor.data_type not in (mc.TYPE_INVALID, value.data_type):
        raise LoadFailed(
            f"{at}.data_type: {mc.DataType.Name(value.data_type)} does not match the input's "
            f"{mc.DataType.Name(tensor.data_type)}"
        )
    dims = [int(d) for d in value.dims]
    if len(dims) > MAX_RANK:
        raise LoadFailed(f"{at}.dims: rank {len(dims)} is more than {MAX_RANK}")
    elements = 1
    for dim in dims:
        _check_range(f"{at}.dims", dim, 1, MAX_DIM)
        elements *= dim
    configured = [int(d) for d in tensor.dims] if tensor is not None else []
    if configured and (
        len(dims) != len(configured) or any(c not in (-1, d) for c, d in zip(configured, dims, strict=False))
    ):
        raise LoadFailed(
            f"{at}.dims: {dims} do not fit the input's dims {configured}"
            + (" (without the batch dimension)" if batched else "")
        )
    return elements
