"""Benchmark models built from scratch with onnx.helper, so the benchmark needs no downloads.

Weights are random (fixed seed, He-initialised so activations stay finite): the numbers they produce are
meaningless, but the compute and memory traffic match the real architectures, which is what timing needs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8  # the lowest IR version carrying opset 17, so older onnxruntime builds load the files
SEED = 0


class _GraphBuilder:
    """Accumulates nodes and initializers and hands out unique tensor names."""

    def __init__(self, seed: int = SEED) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def _name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def _const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(value.astype(np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: object) -> str:
        """Append one node and return its (single) output name."""
        out = output or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def gemm(self, x: str, fan_in: int, fan_out: int, output: str | None = None) -> str:
        """Fully connected layer; the weight is stored [out, in] (transB=1) like PyTorch's Linear."""
        name = self._name("fc")
        weight = self.rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in))
        w = self._const(f"{name}.weight", weight)
        b = self._const(f"{name}.bias", np.zeros(fan_out))
        return self.op("Gemm", [x, w, b], output, transB=1)

    def conv(self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1, gain: float = 1.0) -> str:
        """Conv with bias (BatchNorm folded away); 'same'-style padding of kernel // 2."""
        name = self._name("conv")
        fan_in = c_in * kernel * kernel
        weight = self.rng.normal(0.0, gain * np.sqrt(2.0 / fan_in), size=(c_out, c_in, kernel, kernel))
        w = self._const(f"{name}.weight", weight)
        b = self._const(f"{name}.bias", np.zeros(c_out))
        pad = kernel // 2
        return self.op("Conv", [x, w, b], kernel_shape=[kernel, kernel], strides=[stride, stride], pads=[pad] * 4)

    def matmul(self, x: str, fan_in: int, fan_out: int) -> str:
        """x @ W + b on the last axis (works on [batch, seq, fan_in] too, unlike Gemm)."""
        name = self._name("proj")
        w = self._const(f"{name}.weight", self.rng.normal(0.0, np.sqrt(1.0 / fan_in), size=(fan_in, fan_out)))
        b = self._const(f"{name}.bias", np.zeros(fan_out))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def layer_norm(self, x: str, width: int) -> str:
        """LayerNormalization over the last axis with unit scale and zero bias."""
        name = self._name("ln")
        scale = self._const(f"{name}.scale", np.ones(width))
        bias = self._const(f"{name}.bias", np.zeros(width))
        return self.op("LayerNormalization", [x, scale, bias], axis=-1, epsilon=1e-5)

    def shape_const(self, dims: list[int]) -> str:
        """An INT64 shape tensor for Reshape (0 keeps that input dim)."""
        name = self._name("shape")
        self.initializers.append(numpy_helper.from_array(np.array(dims, dtype=np.int64), name))
        return name

    def finish(self, graph_name: str, in_shape: list[int], out_features: int) -> onnx.ModelProto:
        """Wrap the graph with a dynamic 'batch' dimension on input and output and validate it."""
        graph = helper.make_graph(
            self.nodes,
            graph_name,
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", out_features])],
            initializer=self.initializers,
        )
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="optiserve-bench"
        )
        model.ir_version = IR_VERSION
        onnx.checker.check_model(model)
        return model


def build_mlp() -> onnx.ModelProto:
    """input [batch,256] -> 1024 -> 1024 -> 10: a small, latency-bound model that exposes serving overhead."""
    g = _GraphBuilder()
    x = g.op("Relu", [g.gemm("input", 256, 1024)])
    x = g.op("Relu", [g.gemm(x, 1024, 1024)])
    g.gemm(x, 1024, 10, output="output")
    return g.finish("bench_mlp", [256], 10)


def _basic_block(g: _GraphBuilder, x: str, c_in: int, c_out: int, stride: int) -> str:
    """ResNet basic block; a 1x1 projection shortcut wherever the shape changes."""
    # Without BatchNorm the residual sum doubles the variance per block; damping the branch keeps it flat.
    y = g.op("Relu", [g.conv(x, c_in, c_out, 3, stride)])
    y = g.conv(y, c_out, c_out, 3, gain=0.5)
    shortcut = x if stride == 1 and c_in == c_out else g.conv(x, c_in, c_out, 1, stride, gain=0.5)
    return g.op("Relu", [g.op("Add", [y, shortcut])])


def build_resnet18_like() -> onnx.ModelProto:
    """ResNet-18-sized CNN (~11.7M params) on [batch,3,224,224]: a compute-bound model."""
    g = _GraphBuilder()
    x = g.op("Relu", [g.conv("input", 3, 64, 7, stride=2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = 64
    for stage, c_out in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(g, x, c_in, c_out, stride)
            c_in = c_out
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    g.gemm(x, 512, 1000, output="output")
    return g.finish("bench_resnet18", [3, 224, 224], 1000)


def _bottleneck(g: _GraphBuilder, x: str, c_in: int, width: int, stride: int) -> str:
    """ResNet bottleneck (1x1 reduce, 3x3, 1x1 expand x4), stride on the 3x3 as torchvision does."""
    c_out = width * 4
    y = g.op("Relu", [g.conv(x, c_in, width, 1)])
    y = g.op("Relu", [g.conv(y, width, width, 3, stride)])
    y = g.conv(y, width, c_out, 1, gain=0.5)
    shortcut = x if stride == 1 and c_in == c_out else g.conv(x, c_in, c_out, 1, stride, gain=0.5)
    return g.op("Relu", [g.op("Add", [y, shortcut])])


def build_resnet50_like(base_width: int = 64) -> onnx.ModelProto:
    """ResNet-50-sized CNN (~25.5M params at ``base_width`` 64; BatchNorm folded into conv biases) on
    [batch,3,224,224]: the GPU benchmark's model. A smaller ``base_width`` keeps the topology for quick tests."""
    g = _GraphBuilder()
    x = g.op("Relu", [g.conv("input", 3, base_width, 7, stride=2)])
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])
    c_in = base_width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        width = base_width * 2**stage
        for block in range(blocks):
            x = _bottleneck(g, x, c_in, width, stride=2 if stage > 0 and block == 0 else 1)
            c_in = width * 4
    x = g.op("Flatten", [g.op("GlobalAveragePool", [x])], axis=1)
    g.gemm(x, c_in, 1000, output="output")
    return g.finish("bench_resnet50", [3, 224, 224], 1000)


def _attention_block(g: _GraphBuilder, x: str, seq: int, width: int, heads: int) -> str:
    """Post-norm encoder layer: multi-head self-attention + residual + LayerNorm, then a 4x FFN + residual
    + LayerNorm. Tensors stay [batch, seq, width]; heads are split with Reshape/Transpose."""
    head = width // heads
    q, k, v = (g.matmul(x, width, width) for _ in range(3))
    split = g.shape_const([0, seq, heads, head])

    def heads_first(t: str) -> str:
        return g.op("Transpose", [g.op("Reshape", [t, split])], perm=[0, 2, 1, 3])

    scores = g.op("MatMul", [heads_first(q), g.op("Transpose", [heads_first(k)], perm=[0, 1, 3, 2])])
    scores = g.op("Mul", [scores, g._const(g._name("scale"), np.array(1.0 / np.sqrt(head)))])
    context = g.op("MatMul", [g.op("Softmax", [scores], axis=-1), heads_first(v)])
    merged = g.op("Reshape", [g.op("Transpose", [context], perm=[0, 2, 1, 3]), g.shape_const([0, seq, width])])
    x = g.layer_norm(g.op("Add", [x, g.matmul(merged, width, width)]), width)
    hidden = g.op("Relu", [g.matmul(x, width, 4 * width)])
    return g.layer_norm(g.op("Add", [x, g.matmul(hidden, 4 * width, width)]), width)


def build_transformer_encoder(seq: int = 64, width: int = 256, heads: int = 4, layers: int = 4) -> onnx.ModelProto:
    """A small BERT-like encoder (~3.2M params) on [batch, seq, width] embeddings, mean-pooled into a
    10-class head: MatMul-heavy, the kind of model dynamic INT8 is for."""
    g = _GraphBuilder()
    x = "input"
    for _ in range(layers):
        x = _attention_block(g, x, seq, width, heads)
    pooled = g.op("ReduceMean", [x], axes=[1], keepdims=0)
    g.gemm(pooled, width, 10, output="output")
    return g.finish("transformer_encoder", [seq, width], 10)


BUILDERS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": build_mlp,
    "resnet18": build_resnet18_like,
    "transformer": build_transformer_encoder,
}


def param_count(model: onnx.ModelProto) -> int:
    """Number of scalars held in initializers."""
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def write_repo(root: Path, names: list[str]) -> list[Path]:
    """Write root/<name>/1/model.onnx for each name; no config.pbtxt, the server derives it."""
    unknown = sorted(set(names) - BUILDERS.keys())
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; known: {sorted(BUILDERS)}")
    paths = []
    for name in names:
        path = root / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(BUILDERS[name](), str(path))
        paths.append(path)
    return paths
