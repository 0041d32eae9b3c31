"""Tiny ONNX models built in code for the tests (no downloads, no committed binaries).

Each builder returns an ``onnx.ModelProto``; :func:`write_model` puts one into a Triton-layout repository.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


def _model(
    nodes: list[onnx.NodeProto], inputs: list, outputs: list, initializers: list | None = None
) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "fixture", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def float_mlp(features: int = 8, hidden: int = 16, classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """x FP32 [batch, features] -> Gemm -> Relu -> Gemm -> y FP32 [batch, classes]."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(rng.standard_normal((features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((hidden, classes)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(classes).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])],
        weights,
    )


def wide_mlp(seed: int = 0) -> onnx.ModelProto:
    """x FP32 [batch, 256] -> 512 -> 512 -> y [batch, 10]: big enough for INT8 to pay on a CPU."""
    rng = np.random.default_rng(seed)
    sizes = [256, 512, 512, 10]
    nodes, weights, previous = [], [], "x"
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        weights.append(
            numpy_helper.from_array((rng.standard_normal((n_in, n_out)) / np.sqrt(n_in)).astype(np.float32), f"w{i}")
        )
        weights.append(numpy_helper.from_array(np.zeros(n_out, np.float32), f"b{i}"))
        out = "y" if i == len(sizes) - 2 else f"h{i}"
        nodes.append(helper.make_node("Gemm", [previous, f"w{i}", f"b{i}"], [out if out == "y" else f"g{i}"]))
        if out != "y":
            nodes.append(helper.make_node("Relu", [f"g{i}"], [out]))
        previous = out
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 10])],
        weights,
    )


def int64_model() -> onnx.ModelProto:
    """ids INT64 [batch, 5] -> doubled INT64 [batch, 5] and total FP32 [batch, 1]."""
    two = numpy_helper.from_array(np.array(2, dtype=np.int64), "two")
    axes = numpy_helper.from_array(np.array([1], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Mul", ["ids", "two"], ["doubled"]),
        helper.make_node("Cast", ["ids"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["as_float", "axes"], ["total"], keepdims=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["batch", 5]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1]),
        ],
        [two, axes],
    )


def multi_io() -> onnx.ModelProto:
    """a, b FP32 [batch, 3] -> sum, prod FP32 [batch, 3]."""
    nodes = [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Mul", ["a", "b"], ["prod"])]
    tensor = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 3])  # noqa: E731
    return _model(nodes, [tensor("a"), tensor("b")], [tensor("sum"), tensor("prod")])


def dynamic_seq() -> onnx.ModelProto:
    """tokens FP32 [batch, seq] (seq dynamic) -> scaled [batch, seq] and mean [batch, 1]."""
    two = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "two")
    nodes = [
        helper.make_node("Mul", ["tokens", "two"], ["scaled"]),
        helper.make_node("ReduceMean", ["tokens"], ["mean"], axes=[1], keepdims=1),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "seq"])],
        [
            helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mean", TensorProto.FLOAT, ["batch", 1]),
        ],
        [two],
    )


def no_batch() -> onnx.ModelProto:
    """x FP32 [2, 3] (fixed: max_batch_size 0) -> y = 3x."""
    three = numpy_helper.from_array(np.array(3.0, dtype=np.float32), "three")
    return _model(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [three],
    )


def strings() -> onnx.ModelProto:
    """text STRING [batch, 2] -> echo STRING [batch, 2] (Identity)."""
    return _model(
        [helper.make_node("Identity", ["text"], ["echo"])],
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["batch", 2])],
        [helper.make_tensor_value_info("echo", TensorProto.STRING, ["batch", 2])],
    )


def fp16_model() -> onnx.ModelProto:
    """h FP16 [batch, 4] -> out FP16 [batch, 4] = h + h."""
    return _model(
        [helper.make_node("Add", ["h", "h"], ["out"])],
        [helper.make_tensor_value_info("h", TensorProto.FLOAT16, ["batch", 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT16, ["batch", 4])],
    )


def slow_model(size: int = 256, repeats: int = 40) -> onnx.ModelProto:
    """x FP32 [batch, size] -> y: ``repeats`` chained MatMuls, to make executions take measurable time."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array((rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32), "w")
    nodes, previous = [], "x"
    for i in range(repeats):
        out = "y" if i == repeats - 1 else f"t{i}"
        nodes.append(helper.make_node("MatMul", [previous, "w"], [out]))
        previous = out
    return _model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])],
        [weight],
    )


ALL = {
    "mlp": float_mlp,
    "int64": int64_model,
    "multi_io": multi_io,
    "dynamic_seq": dynamic_seq,
    "no_batch": no_batch,
    "strings": strings,
    "fp16": fp16_model,
}


def write_model(
    repo: Path, name: str, model: onnx.ModelProto, version: int = 1, config: str | None = None, config_name: str = ""
) -> Path:
    """Write ``repo/name/version/model.onnx`` (and a config file if given); returns the version folder."""
    version_dir = repo / name / str(version)
    version_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(version_dir / "model.onnx"))
    if config is not None:
        (repo / name / (config_name or "config.pbtxt")).write_text(config)
    return version_dir
