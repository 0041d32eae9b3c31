"""Helpers shared by the two INT8 passes: onnxruntime's pre-processing (shape inference + basic fusions,
which quantization needs to see every tensor's shape) and the quantization types."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("optiserve.optimizers")

IntType = Literal["int8", "uint8"]


def preprocess(source: Path, target: Path) -> bool:
    """``quant_pre_process`` into ``target``; returns whether symbolic shape inference could run (it can fail
    on exotic graphs, and the ONNX shape inference alone is then the best there is)."""
    from onnxruntime.quantization import quant_pre_process

    try:
        quant_pre_process(str(source), str(target))
        return True
    except Exception as exc:  # onnxruntime raises bare Exceptions from its shape inference
        log.info("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return False


def quant_type(name: IntType) -> Any:
    """onnxruntime's QuantType for our config's spelling."""
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8
