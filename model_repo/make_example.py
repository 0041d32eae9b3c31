"""Write the tiny example model served by `make serve`: model_repo/example/1/model.onnx.

The model is generated rather than committed so that the repository holds no binary blobs; a fixed seed
makes every run produce the same bytes, so re-running is harmless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 0
IN_FEATURES, HIDDEN, OUT_FEATURES = 16, 32, 4
OPSET = 17
# IR 8 is the lowest version that carries opset 17; older onnxruntime builds reject newer IR versions.
IR_VERSION = 8
TARGET = Path(__file__).resolve().parent / "example" / "1" / "model.onnx"


def _dense(rng: np.random.Generator, name: str, fan_in: int, fan_out: int) -> list[onnx.TensorProto]:
    """He-initialised weight ([out, in], used with transB=1) and a zero bias, as initializers."""
    weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=(fan_out, fan_in)).astype(np.float32)
    bias = np.zeros(fan_out, dtype=np.float32)
    return [numpy_helper.from_array(weight, f"{name}.weight"), numpy_helper.from_array(bias, f"{name}.bias")]


def build_example() -> onnx.ModelProto:
    """input [batch,16] -> Gemm 32 -> Relu -> Gemm 4 -> output [batch,4]."""
    rng = np.random.default_rng(SEED)
    initializers = _dense(rng, "fc1", IN_FEATURES, HIDDEN) + _dense(rng, "fc2", HIDDEN, OUT_FEATURES)
    nodes = [
        helper.make_node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["fc1"], name="fc1", transB=1),
        helper.make_node("Relu", ["fc1"], ["relu1"], name="relu1"),
        helper.make_node("Gemm", ["relu1", "fc2.weight", "fc2.bias"], ["output"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "example_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", IN_FEATURES])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", OUT_FEATURES])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="optiserve-make-example"
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    """Write the model, replacing any previous copy."""
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_example(), str(TARGET))
    print(f"wrote {TARGET} ({TARGET.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
