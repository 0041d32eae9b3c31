"""What the passes need to know about a model without running it: inputs/outputs, which ops hold the
weights (decides dynamic vs static INT8), whether weights live in external files."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

Dim = int | str | None
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")
INT_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8)


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, numpy dtype (object for strings), shape with symbolic dims."""

    name: str
    dtype: np.dtype
    shape: tuple[Dim, ...]

    @property
    def is_float(self) -> bool:
        """Float tensors are the ones the accuracy metrics and FP16 conversion are about."""
        return self.dtype.kind == "f"


@dataclass(frozen=True)
class ModelInfo:
    """A static summary of one ONNX file."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    op_counts: dict[str, int] = field(default_factory=dict)
    weight_params: dict[str, int] = field(default_factory=dict)
    external_data: bool = False
    size_bytes: int = 0
    subgraph_weight_params: dict[str, int] = field(default_factory=dict)
    """MatMul/Gemm/Conv weights inside control-flow subgraphs (``If`` branches, ``Loop``/``Scan`` bodies, nested
    too), by op type: not in :attr:`weight_params`, because only some passes reach them."""
    subgraph_hosts: tuple[str, ...] = ()
    """The op types of the nodes whose subgraphs hold those weights (``If``, ``Loop``...)."""
    int_constants_beside: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Per input: the int scalar constants a node reads together with it (directly or through a Cast), such
    as the 16000 of a ``sr == 16000`` check: hints for the values an int scalar input takes."""

    @property
    def batch_dynamic(self) -> bool:
        """Dim 0 of every input is symbolic, so the model takes any batch size."""
        return bool(self.inputs) and all(t.shape and not isinstance(t.shape[0], int) for t in self.inputs)

    @property
    def all_weight_params(self) -> dict[str, int]:
        """Weights by op type, in the main graph and in subgraphs together."""
        merged = Counter(self.weight_params)
        merged.update(self.subgraph_weight_params)
        return dict(merged)

    @property
    def matmul_share(self) -> float:
        """Fraction of the weights (subgraphs' included) held by MatMul/Gemm (the rest by Conv): 1.0 for an
        MLP/transformer."""
        weights = self.all_weight_params
        total = sum(weights.values())
        dense = weights.get("MatMul", 0) + weights.get("Gemm", 0)
        return dense / total if total else 0.0

    @property
    def has_float_weights(self) -> bool:
        """Whether any MatMul/Gemm/Conv of the main graph holds a float initializer (else nothing there to quantize
        or prune; see :attr:`subgraph_weight_params` for those inside subgraphs)."""
        return sum(self.weight_params.values()) > 0

    @property
    def subgraph_note(self) -> str:
        """``432 Conv and 64 MatMul weights inside If subgraphs``; empty without any."""
        if not self.subgraph_weight_params:
            return ""
        held = " and ".join(f"{count} {op}" for op, count in sorted(self.subgraph_weight_params.items()))
        return f"{held} weights inside {'/'.join(self.subgraph_hosts)} subgraphs"


def analyze(path: Path) -> ModelInfo:
    """Read the graph (not the external weights) and summarise it."""
    model = onnx.load(str(path), load_external_data=False)
    return analyze_model(model, path.stat().st_size)


def normalize(model: onnx.ModelProto, infer_shapes: bool = True) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` with its ``Constant`` nodes folded into initializers, in the main graph and in every
    subgraph (Paddle and some TensorFlow exports keep every weight in one; spox exports keep a branch's weights
    inside its ``If``), and ONNX shape inference run where it can (``infer_shapes``). The input is never changed.
    Returns the copy and how many Constant nodes were folded."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    folded = _fold_constants(copy.graph)
    if infer_shapes:
        with contextlib.suppress(Exception):  # a bonus: custom domains and odd graphs make it raise
            copy = onnx.shape_inference.infer_shapes(copy)
    return copy, folded


def _fold_constants(graph: onnx.GraphProto) -> int:
    """Move ``graph``'s Constant nodes into its initializers, then do the same inside its nodes' subgraphs."""
    kept, folded = [], 0
    for node in graph.node:
        tensor = _constant_value(node)
        if tensor is None:
            kept.append(node)
            continue
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
        folded += 1
    if folded:
        del graph.node[:]
        graph.node.extend(kept)
    return folded + sum(_fold_constants(sub) for node in graph.node for sub in subgraphs(node))


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node holds in its attributes: ``If``'s branches, ``Loop``'s and ``Scan``'s bodies."""
    found: list[onnx.GraphProto] = []
    for attribute in node.attribute:
        if attribute.type == onnx.AttributeProto.GRAPH:
            found.append(attribute.g)
        elif attribute.type == onnx.AttributeProto.GRAPHS:
            found.extend(attribute.graphs)
    return found


def _constant_value(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node holds (value, or one of the value_* attributes), else None."""
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx") or len(node.output) != 1:
        return None
    for attribute in node.attribute:
        if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(attribute.t)
            return tensor
        if attribute.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = helper.get_attribute_value(attribute)
            dtype = np.float32 if attribute.name.startswith("value_float") else np.int64
            return numpy_helper.from_array(np.asarray(value, dtype=dtype))
    return None


def analyze_model(model: onnx.ModelProto, size_bytes: int = 0) -> ModelInfo:
    """:func:`analyze` for a model already in memory: on its normalized copy (:func:`normalize`), so weights
    held in Constant nodes count as weights."""
    model, _ = normalize(model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    external = any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    inputs = tuple(_tensor_info(v) for v in graph.input if v.name not in initializers)
    outputs = tuple(_tensor_info(v) for v in graph.output)
    params = _weights(graph.node, initializers)
    inner: Counter[str] = Counter()
    hosts: set[str] = set()
    for node in graph.node:
        for sub in subgraphs(node):
            found = _subgraph_weights(sub, initializers)
            if found:
                inner.update(found)
                hosts.add(node.op_type)
    return ModelInfo(
        inputs=inputs,
        outputs=outputs,
        op_counts=dict(Counter(node.op_type for node in graph.node)),
        weight_params=dict(params),
        subgraph_weight_params=dict(inner),
        subgraph_hosts=tuple(sorted(hosts)),
        external_data=external,
        size_bytes=size_bytes,
        int_constants_beside=_int_constants_beside(graph, [t.name for t in inputs], initializers),
    )


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def _weights(nodes: Iterable[onnx.NodeProto], initializers: dict[str, onnx.TensorProto]) -> Counter[str]:
    """Float weight elements of the MatMul/Gemm/Conv among ``nodes`` whose second input is a constant."""
    params: Counter[str] = Counter()
    for node in nodes:
        if node.op_type in WEIGHT_OPS and len(node.input) > 1 and node.input[1] in initializers:
            weight = initializers[node.input[1]]
            if weight.data_type in FLOAT_TYPES:
                params[node.op_type] += int(np.prod(weight.dims)) if weight.dims else 1
    return params


def _subgraph_weights(graph: onnx.GraphProto, outer: dict[str, onnx.TensorProto]) -> Counter[str]:
    """:func:`_weights` of a subgraph and of the subgraphs nested in it; a weight may be the subgraph's own
    initializer or one of an enclosing graph (outer scope)."""
    visible = {**outer, **{init.name: init for init in graph.initializer}}
    found = _weights(graph.node, visible)
    for node in graph.node:
        for sub in subgraphs(node):
            found.update(_subgraph_weights(sub, visible))
    return found


def _int_constants_beside(
    graph: onnx.GraphProto, inputs: list[str], initializers: dict[str, onnx.TensorProto]
) -> dict[str, tuple[int, ...]]:
    scalars = {}
    for name, init in initializers.items():
        if (
            init.data_type in INT_TYPES
            and int(np.prod(init.dims)) == 1
            and init.data_location != onnx.TensorProto.EXTERNAL
        ):
            scalars[name] = int(numpy_helper.to_array(init).reshape(-1)[0])
    found: dict[str, tuple[int, ...]] = {}
    for source in inputs:
        names = {source} | {n.output[0] for n in graph.node if n.op_type == "Cast" and n.input[:1] == [source]}
        values = [scalars[i] for n in graph.node if names & set(n.input) for i in n.input if i in scalars]
        if values:
            found[source] = tuple(dict.fromkeys(values))
    return found


def _tensor_info(value: onnx.ValueInfoProto) -> TensorInfo:
    tensor = value.type.tensor_type
    dtype = np.dtype(object) if tensor.elem_type == onnx.TensorProto.STRING else _np_dtype(tensor.elem_type)
    dims: list[Dim] = []
    for dim in tensor.shape.dim:
        dims.append(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None))
    return TensorInfo(value.name, dtype, tuple(dims))


def _np_dtype(elem_type: int) -> np.dtype:
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError):
        return np.dtype(object)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Content hash of a file, streamed (a model can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
