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
