"""TensorFlow: a SavedModel folder to ONNX with tf2onnx, through its ``serving_default`` signature.

A SavedModel is a TensorFlow program: loading it runs its resource initializers, and converting and
checking it runs its signature's ops. Before TensorFlow loads anything, the graph (parsed as a protobuf,
which runs nothing) is scanned: ops that touch files, the network, Python, summaries or debuggers are refused
anywhere, and checkpoint ops (save, restore, merge) only in the functions the saver alone calls."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from optimizers.modelinfo import Dim, TensorInfo
from optimizers.runtime import Feed
from server.convert.inputs import validation_batches
from server.convert.job import ConvertError, Job, Produced, require

SIGNATURE = "serving_default"
OPSET = 17
FREE_DIM = 8
MAX_GRAPH_BYTES = 2**31 - 1
DENIED_OPS = frozenset(
    [
        "ReadFile",
        "WriteFile",
        "MatchingFiles",
        "ImmutableConst",
        "Print",
        "PrintV2",
        "PyFunc",
        "PyFuncStateless",
        "EagerPyFunc",
        "DebugIdentity",
        "DebugIdentityV2",
        "DebugIdentityV3",
        "DebugNanCount",
        "DebugNumericSummary",
        "DebugNumericSummaryV2",
        "DebugGradientIdentity",
        "DebugGradientRefIdentity",
        "CreateSummaryFileWriter",
        "CreateSummaryDbWriter",
        "ImportEvent",
        "FlushSummaryWriter",
        "CloseSummaryWriter",
        "SummaryWriter",
        "InitializeTableFromTextFile",
        "InitializeTableFromTextFileV2",
        "LoadAndRemapMatrix",
        "GenerateVocabRemapping",
        "DecodeProtoV2",
        "EncodeProto",
        "_Send",
        "_Recv",
        "_HostSend",
        "_HostRecv",
        "Send",
        "Recv",
        "RemoteCall",
        "RemoteFusedGraphExecute",
        "DatasetToTFRecord",
        "ExperimentalDatasetToTFRecord",
    ]
)
DENIED_PATTERN = re.compile(r".*(Dataset(V[0-9])?|Reader(V[0-9])?|Summary(V[0-9])?|Iterator.*|^Collective.*|^Nccl.*)$")
CHECKPOINT_OPS = frozenset(
    ["Save", "SaveV2", "SaveSlices", "Restore", "RestoreV2", "RestoreSlice", "MergeV2Checkpoints"]
)


def produce(job: Job) -> Produced:
    """Convert the SavedModel folder ``job.source`` and run its signature on the validation inputs."""
    tf = require("tensorflow", "tensorflow", "TensorFlow")
    tf2onnx = require("tf2onnx", "tensorflow", "TensorFlow")
    folder = Path(job.source)
    check_saved_model(folder)
    try:
        loaded = tf.saved_model.load(str(folder), tags=["serve"])
        function = loaded.signatures[SIGNATURE]
    except (KeyError, ValueError, OSError) as exc:
        raise ConvertError(f"saved_model: cannot load the {SIGNATURE!r} signature ({exc})", "invalid") from None
    specs = dict(function.structured_input_signature[1])
    signature, dynamic = _signature(tf, specs)
    if job.max_batch_size_hint and not dynamic:
        raise ConvertError(
            "the config asks for batching (max_batch_size > 0) but the signature's dim 0 is fixed; "
            "export it with shape (None, ...) or set max_batch_size: 0",
            "invalid",
        )
    batches, source = validation_batches(signature, job.load_samples(), dynamic)
    names = sorted(function.structured_outputs)
    _export(tf, tf2onnx, function, signature, job.onnx_path)
    outputs = [_run(tf, function, feed, names) for feed in batches]
    return Produced(batches, outputs, source, {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__})


def _export(tf: Any, tf2onnx: Any, function: Any, signature: list[TensorInfo], path: Path) -> None:
    """tf2onnx on a positional wrapper of the keyword-only signature (input names = signature keys; output
    names = the signature's output keys, which tf2onnx takes from the structured outputs)."""
    specs = [tf.TensorSpec(_tf_shape(t), tf.as_dtype(t.dtype), name=t.name) for t in signature]
    names = [t.name for t in signature]
    wrapper = tf.function(lambda *args: function(**dict(zip(names, args, strict=True))), input_signature=specs)
    try:
        model, _ = tf2onnx.convert.from_function(wrapper, input_signature=specs, opset=OPSET)
    except Exception as exc:
        raise ConvertError(f"tf2onnx failed: {type(exc).__name__}: {str(exc)[:500]}") from None
    path.write_bytes(model.SerializeToString())


def _tf_shape(tensor: TensorInfo) -> list[int | None]:
    return [None if index == 0 and dim == "batch" else int(dim or FREE_DIM) for index, dim in enumerate(tensor.shape)]


def _signature(tf: Any, specs: dict[str, Any]) -> tuple[list[TensorInfo], bool]:
    signature, dynamic = [], True
    for name in sorted(specs):
        spec = specs[name]
        if spec.shape.rank is None:
            raise ConvertError(f"input {name!r} has an unknown rank", "invalid")
        dims: list[Dim] = []
        for index, size in enumerate(spec.shape.as_list()):
            dims.append(("batch" if index == 0 else FREE_DIM) if size is None else int(size))
        dynamic = dynamic and bool(dims) and dims[0] == "batch"
        dtype = np.dtype(object) if spec.dtype == tf.string else np.dtype(spec.dtype.as_numpy_dtype)
        signature.append(TensorInfo(name, dtype, tuple(dims)))
    if not signature:
        raise ConvertError(f"the {SIGNATURE!r} signature has no inputs", "invalid")
    return signature, dynamic


def _run(tf: Any, function: Any, feed: Feed, names: list[str]) -> Feed:
    result = function(**{name: tf.constant(value) for name, value in feed.items()})
    return {name: np.asarray(result[name].numpy()) for name in names}


# ---- the graph scan -------------------------------------------------------------------------------
def check_saved_model(folder: Path) -> None:
    """Refuse graphs that can touch the world: denied ops anywhere, checkpoint ops outside saver functions."""
    saved_model_pb2 = require("tensorflow.core.protobuf.saved_model_pb2", "tensorflow", "TensorFlow")
    graph_file = folder / "saved_model.pb"
    if not graph_file.is_file() or graph_file.stat().st_size > MAX_GRAPH_BYTES:
        raise ConvertError("saved_model: saved_model.pb is missing or too large", "invalid")
    saved = saved_model_pb2.SavedModel()
    try:
        saved.ParseFromString(graph_file.read_bytes())
    except Exception as exc:
        raise ConvertError(f"saved_model: saved_model.pb does not parse ({exc})", "invalid") from None
    for meta_graph in saved.meta_graphs:
        _check_meta_graph(meta_graph)


def _check_meta_graph(meta_graph: Any) -> None:
    graph = meta_graph.graph_def
    functions = {f.signature.name: f for f in graph.library.function}
    saver_nodes = {
        name.split(":")[0]
        for name in (meta_graph.saver_def.save_tensor_name, meta_graph.saver_def.restore_op_name)
        if name
    }
    roots: list[str] = []
    for node in graph.node:
        _check_op(node.op, "the main graph", checkpoint_ok=False)
        if node.name not in saver_nodes:
            roots.extend(_called(node))
    reachable = _closure(roots, functions)
    for name, function in functions.items():
        for node in function.node_def:
            _check_op(node.op, f"function {name!r}", checkpoint_ok=name not in reachable)


def _check_op(op: str, where: str, *, checkpoint_ok: bool) -> None:
    if op in DENIED_OPS or DENIED_PATTERN.fullmatch(op) or (op in CHECKPOINT_OPS and not checkpoint_ok):
        raise ConvertError(
            f"saved_model: {where} uses the op {op!r}, which can read or write files, reach the network or run "
            "Python; such graphs are refused. Convert it on your own machine with `optiserve convert`",
            "refused",
        )


def _called(node: Any) -> list[str]:
    """Functions a node calls through its attributes (``f``, branches, loop bodies, lists of functions)."""
    names = []
    for value in node.attr.values():
        if value.HasField("func"):
            names.append(value.func.name)
        names.extend(func.name for func in value.list.func)
    return names


def _closure(roots: list[str], functions: dict[str, Any]) -> set[str]:
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        name = stack.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        for node in functions[name].node_def:
            stack.extend(_called(node))
    return seen
