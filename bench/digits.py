"""A real classifier for the optimizer benchmark (and the optimizer tests): an MLP trained on scikit-learn's 8x8
digits, which ship inside the package (no download), with plain numpy gradient descent and exported with
onnx.helper. Real weights give a real top-1 accuracy to measure each variant's cost against."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9


@dataclass(frozen=True)
class Digits:
    """A trained digits classifier and its held-out split."""

    model: onnx.ModelProto
    x_test: np.ndarray
    y_test: np.ndarray
    x_train: np.ndarray


@functools.cache
def trained_digits(hidden: int = 64, epochs: int = 60, seed: int = 0) -> Digits:
    """An MLP trained on sklearn's 8x8 digits. Mini-batch SGD with momentum on softmax cross-entropy; about a
    second on one core."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    split = int(0.7 * len(x))
    train, test = order[:split], order[split:]
    layers = _train(x[train], y[train], hidden, epochs, rng)
    return Digits(mlp_from_weights(layers, 64, 10), x[test], y[test], x[train])


def mlp_from_weights(layers: list[tuple[np.ndarray, np.ndarray]], features: int, classes: int) -> onnx.ModelProto:
    """x [batch, features] -> (MatMul + Add + Relu)* -> MatMul + Add -> logits [batch, classes]."""
    nodes, inits, previous = [], [], "x"
    for index, (weight, bias) in enumerate(layers):
        inits += [numpy_helper.from_array(weight, f"w{index}"), numpy_helper.from_array(bias, f"b{index}")]
        last = index == len(layers) - 1
        nodes.append(helper.make_node("MatMul", [previous, f"w{index}"], [f"m{index}"]))
        nodes.append(helper.make_node("Add", [f"m{index}", f"b{index}"], ["logits" if last else f"z{index}"]))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{index}"], [f"h{index}"]))
            previous = f"h{index}"
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", classes])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def top1_accuracy(model_path: Path, x: np.ndarray, y: np.ndarray) -> float:
    """Real top-1 accuracy of an ONNX classifier on labelled data."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean())


def _train(
    x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    w1 = (rng.standard_normal((x.shape[1], hidden)) * np.sqrt(2 / x.shape[1])).astype(np.float32)
    b1 = np.zeros(hidden, np.float32)
    w2 = (rng.standard_normal((hidden, 10)) * np.sqrt(2 / hidden)).astype(np.float32)
    b2 = np.zeros(10, np.float32)
    params = [w1, b1, w2, b2]
    velocity = [np.zeros_like(p) for p in params]
    onehot = np.eye(10, dtype=np.float32)[y]
    for _ in range(epochs):
        for start in range(0, len(x), 32):
            batch = rng.permutation(len(x))[:32] if start else np.arange(min(32, len(x)))
            grads = _gradients(x[batch], onehot[batch], params)
            for p, v, g in zip(params, velocity, grads, strict=True):
                v *= 0.9
                v -= 0.05 * g
                p += v
    return [(params[0], params[1]), (params[2], params[3])]


def _gradients(x: np.ndarray, target: np.ndarray, params: list[np.ndarray]) -> list[np.ndarray]:
    w1, b1, w2, b2 = params
    z = x @ w1 + b1
    h = np.maximum(z, 0)
    logits = h @ w2 + b2
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    d_logits = (probs - target) / len(x)
    d_h = d_logits @ w2.T * (z > 0)
    return [x.T @ d_h, d_h.sum(0), h.T @ d_logits, d_logits.sum(0)]
