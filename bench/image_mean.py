"""A model whose cost is its input: ReduceMean over a 1x3x224x224 FP32 image (602,112 bytes in, 12 out).

It takes microseconds to compute, so serving it measures what a front end does with an image-sized request:
receive, decode, hand to the batcher, answer. The ResNet-18-sized CNN has the same input but hides that
cost behind ~13 ms of compute.
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper

from bench.models import IR_VERSION, OPSET

NAME = "image_mean"


def build_image_mean() -> onnx.ModelProto:
    """input [batch,3,224,224] -> output [batch,3]: the mean of each colour plane."""
    node = helper.make_node("ReduceMean", ["input"], ["output"], axes=[2, 3], keepdims=0, name="mean")
    graph = helper.make_graph(
        [node],
        "bench_image_mean",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 224, 224])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="optiserve-bench")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model
