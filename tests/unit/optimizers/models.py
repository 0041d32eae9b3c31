"""Extra fixture models for the optimizer tests: a small conv net, and (from bench/digits.py, which the optimizer
benchmark shares) an MLP trained on scikit-learn's digits: real weights, real accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from bench.digits import Digits, top1_accuracy, trained_digits
from tests.models.fixtures import _model

__all__ = ["Digits", "conv_net", "save", "top1_accuracy", "trained_digits"]


def conv_net(channels: int = 8, size: int = 16, classes: int = 10, seed: int = 0) -> onnx.ModelProto:
    """image FP32 [batch, 3, size, size] -> Conv/Relu/Conv/Relu/GlobalAveragePool/Flatten/Gemm -> logits."""
    rng = np.random.default_rng(seed)

    def he(*shape: int) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    weights = [
        numpy_helper.from_array(he(channels, 3, 3, 3), "c1"),
        numpy_helper.from_array(np.zeros(channels, np.float32), "c1b"),
        numpy_helper.from_array(he(2 * channels, channels, 3, 3), "c2"),
        numpy_helper.from_array(np.zeros(2 * channels, np.float32), "c2b"),
        numpy_helper.from_array(he(classes, 2 * channels).T.copy(), "fc"),
        numpy_helper.from_array(np.zeros(classes, np.float32), "fcb"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "c1", "c1b"], ["a1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2", "c2b"], ["a2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc", "fcb"], ["logits"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        weights,
    )


def save(model: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Write a model into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    onnx.save(model, str(path))
    return path


def constant_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model with every initializer moved into a ``Constant`` node (how Paddle exports weights)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    constants = [helper.make_node("Constant", [], [init.name], value=init) for init in graph.initializer]
    nodes = [*constants, *graph.node]
    del graph.initializer[:]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(copy, full_check=True)
    return copy


def stride_detector(channels: int = 4, seed: int = 0) -> onnx.ModelProto:
    """image FP32 [batch, 3, height, width] -> five stride-2 convs (strides 2..32) -> the stride-32 map upsampled
    x2 and concatenated with the stride-16 map -> 1x1 head. Like a detector's FPN, it only runs where height and
    width are multiples of 32: elsewhere the Concat gets mismatched dimensions."""
    rng = np.random.default_rng(seed)
    weights, nodes = [], []
    previous, width = "image", 3
    for level in range(5):
        weights.append(
            numpy_helper.from_array(
                (rng.standard_normal((channels, width, 3, 3)) * 0.3).astype(np.float32), f"w{level}"
            )
        )
        weights.append(numpy_helper.from_array(np.zeros(channels, np.float32), f"b{level}"))
        conv_inputs = [previous, f"w{level}", f"b{level}"]
        nodes.append(helper.make_node("Conv", conv_inputs, [f"c{level}"], pads=[1, 1, 1, 1], strides=[2, 2]))
        nodes.append(helper.make_node("Relu", [f"c{level}"], [f"f{level}"]))
        previous, width = f"f{level}", channels
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"))
    head = (rng.standard_normal((6, 2 * channels, 1, 1)) * 0.3).astype(np.float32)
    weights.append(numpy_helper.from_array(head, "head"))
    nodes += [
        helper.make_node("Resize", ["f4", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["f3", "up"], ["merged"], axis=1),
        helper.make_node("Conv", ["merged", "head"], ["boxes"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 6, None, None])],
        weights,
    )


AUDIO_PAD = 64
AUDIO_RATE = 16000


def stateful_audio(hidden: int = 128, seed: int = 0) -> onnx.ModelProto:
    """Like a voice-activity detector: input FP32 [batch, sequence], state FP32 [2, batch, hidden], sr INT64 scalar
    -> a reflect Pad of :data:`AUDIO_PAD` samples (fails unless sequence > AUDIO_PAD), a MatMul over the padded
    signal's mean, the state updated -> output FP32 [batch, 1], stateN FP32 [2, batch, hidden]. ``sr`` must be
    :data:`AUDIO_RATE`: any other rate divides by zero and the output is NaN."""
    rng = np.random.default_rng(seed)
    weights = [
        numpy_helper.from_array(np.array([0, AUDIO_PAD, 0, AUDIO_PAD], np.int64), "pads"),
        numpy_helper.from_array((rng.standard_normal((1, hidden)) * 0.5).astype(np.float32), "w_in"),
        numpy_helper.from_array((rng.standard_normal((hidden, 1)) * 0.1).astype(np.float32), "w_out"),
        numpy_helper.from_array(np.array(AUDIO_RATE, np.int64), "rate"),
    ]
    nodes = [
        helper.make_node("Pad", ["input", "pads"], ["padded"], mode="reflect"),
        helper.make_node("ReduceMean", ["padded"], ["level"], axes=[-1], keepdims=1),  # [batch, 1]
        helper.make_node("MatMul", ["level", "w_in"], ["features"]),  # [batch, hidden]
        helper.make_node("Add", ["state", "features"], ["stateN"]),  # [2, batch, hidden]
        helper.make_node("ReduceMean", ["stateN"], ["pooled"], axes=[-1], keepdims=0),  # [2, batch]
        helper.make_node("Equal", ["sr", "rate"], ["known"]),
        helper.make_node("Cast", ["known"], ["ok"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pooled", "ok"], ["scaled"]),  # inf (then NaN) for another rate
        helper.make_node("Sub", ["scaled", "scaled"], ["zero"]),
        helper.make_node("MatMul", ["features", "w_out"], ["logit"]),  # [batch, 1]
        helper.make_node("ReduceSum", ["zero"], ["offset"], keepdims=0),
        helper.make_node("Add", ["logit", "offset"], ["output"]),
    ]
    return _model(
        nodes,
        [
            helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", "sequence"]),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "batch", hidden]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1]),
            helper.make_tensor_value_info("stateN", TensorProto.FLOAT, [2, "batch", hidden]),
        ],
        weights,
    )


def branching(channels: int = 8, classes: int = 4, seed: int = 0) -> onnx.ModelProto:
    """image FP32 [batch, 3, 8, 8] -> ``If`` (mean of the image > 0) whose two branches each run
    Conv/Relu/GlobalAveragePool/Flatten/MatMul with their own weights, held in Constant nodes inside the branch
    (how spox exports write them) -> logits FP32 [batch, classes]. No weight lives in the main graph."""
    rng = np.random.default_rng(seed)

    def branch(name: str) -> onnx.GraphProto:
        conv = (rng.standard_normal((channels, 3, 3, 3)) * 0.3).astype(np.float32)
        dense = (rng.standard_normal((channels, classes)) * 0.5).astype(np.float32)
        nodes = [
            helper.make_node("Constant", [], [f"{name}_conv"], value=numpy_helper.from_array(conv)),
            helper.make_node("Constant", [], [f"{name}_dense"], value=numpy_helper.from_array(dense)),
            helper.make_node("Conv", ["image", f"{name}_conv"], [f"{name}_c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", [f"{name}_c"], [f"{name}_r"]),
            helper.make_node("GlobalAveragePool", [f"{name}_r"], [f"{name}_p"]),
            helper.make_node("Flatten", [f"{name}_p"], [f"{name}_f"]),
            helper.make_node("MatMul", [f"{name}_f", f"{name}_dense"], [f"{name}_y"]),
        ]
        output = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["batch", classes])
        return helper.make_graph(nodes, name, [], [output])

    nodes = [
        helper.make_node("ReduceMean", ["image"], ["level"], keepdims=0),
        helper.make_node("Greater", ["level", "zero"], ["bright"]),
        helper.make_node("If", ["bright"], ["logits"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        [numpy_helper.from_array(np.array(0, np.float32), "zero")],
    )


YOLO_OUTPUTS = 5 + 3
"""Per anchor point: box (4), objectness (1) and 3 class scores."""


def yolo_detector(channels: int = 4, seed: int = 0) -> onnx.ModelProto:
    """Shaped like a small YOLO: images FP32 [batch, 3, height, width] -> five stride-2 Conv/Relu (strides 2..32)
    -> a top-down neck (the stride-32 map upsampled x2 and concatenated with stride 16, that upsampled and
    concatenated with stride 8) -> a 1x1 head per stride (8, 16, 32), each reshaped to [batch, 8, points] and
    concatenated along the points -> Transpose, Sigmoid -> detections FP32 [batch, points, 8]. Height and width
    must be multiples of 32: elsewhere a neck Concat gets mismatched dimensions."""
    rng = np.random.default_rng(seed)
    weights: list[onnx.TensorProto] = []

    def conv(name: str, source: str, out: int, width: int, kernel: int, stride: int) -> onnx.NodeProto:
        weight = rng.standard_normal((out, width, kernel, kernel)) * (0.6 / np.sqrt(width * kernel * kernel))
        weights.append(numpy_helper.from_array(weight.astype(np.float32), f"{name}_w"))
        weights.append(numpy_helper.from_array(np.zeros(out, np.float32), f"{name}_b"))
        pads = [kernel // 2] * 4
        return helper.make_node("Conv", [source, f"{name}_w", f"{name}_b"], [name], pads=pads, strides=[stride] * 2)

    nodes, previous, width = [], "images", 3
    for level in range(1, 6):  # p1..p5 at strides 2..32
        nodes.append(conv(f"c{level}", previous, channels, width, 3, 2))
        nodes.append(helper.make_node("Relu", [f"c{level}"], [f"p{level}"]))
        previous, width = f"p{level}", channels
    weights.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up2"))
    weights.append(numpy_helper.from_array(np.array([0, YOLO_OUTPUTS, -1], np.int64), "points"))
    nodes += [
        helper.make_node("Resize", ["p5", "", "up2"], ["p5_up"], mode="nearest"),
        helper.make_node("Concat", ["p4", "p5_up"], ["n4_in"], axis=1),
        conv("n4", "n4_in", channels, 2 * channels, 1, 1),
        helper.make_node("Resize", ["n4", "", "up2"], ["n4_up"], mode="nearest"),
        helper.make_node("Concat", ["p3", "n4_up"], ["n3_in"], axis=1),
        conv("n3", "n3_in", channels, 2 * channels, 1, 1),
    ]
    for stride, source in ((8, "n3"), (16, "n4"), (32, "p5")):
        nodes += [
            conv(f"head{stride}", source, YOLO_OUTPUTS, channels, 1, 1),
            helper.make_node("Reshape", [f"head{stride}", "points"], [f"flat{stride}"]),
        ]
    nodes += [
        helper.make_node("Concat", ["flat8", "flat16", "flat32"], ["all"], axis=2),
        helper.make_node("Transpose", ["all"], ["rows"], perm=[0, 2, 1]),
        helper.make_node("Sigmoid", ["rows"], ["detections"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, ["batch", None, YOLO_OUTPUTS])],
        weights,
    )
