"""XGBoost (JSON/UBJ) and LightGBM (text) boosters to ONNX with onnxmltools. Those files are data: the
frameworks parse them in C++ and run no Python from them. Outputs follow onnxmltools: classifiers give
``label`` and ``probabilities``, regressors ``variable``; the framework's predictions are put in that shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizers.modelinfo import TensorInfo
from optimizers.runtime import Feed
from server.convert.inputs import validation_batches
from server.convert.job import ConvertError, Job, Produced, require

INPUT = "input"
OPSET = 15  # the highest onnxmltools' tree converters support
XGBOOST_OBJECTIVES = ("binary:logistic", "multi:softprob", "multi:softmax", "reg:")


def produce_xgboost(job: Job) -> Produced:
    """An XGBoost booster saved with ``save_model("model.json" | "model.ubj")``."""
    xgb = require("xgboost", "sklearn", "XGBoost")
    onnxmltools = require("onnxmltools", "sklearn", "XGBoost")
    booster = xgb.Booster()
    try:
        booster.load_model(job.source)
    except Exception as exc:
        raise ConvertError(f"not a loadable XGBoost model ({str(exc)[:300]})", "invalid") from None
    objective = json.loads(booster.save_config())["learner"]["objective"]["name"]
    if objective == "multi:softmax" or not objective.startswith(XGBOOST_OBJECTIVES):
        raise ConvertError(
            f"XGBoost objective {objective!r} is not supported: use binary:logistic, multi:softprob or reg:*",
            "invalid",
        )
    model = _convert(onnxmltools.convert_xgboost, booster, booster.num_features())

    versions = {"xgboost": xgb.__version__, "onnxmltools": onnxmltools.__version__}
    predict = lambda x: np.asarray(booster.predict(xgb.DMatrix(x)))  # noqa: E731
    return _finish(job, model, booster.num_features(), predict, versions)


def produce_lightgbm(job: Job) -> Produced:
    """A LightGBM booster saved with ``save_model("model.txt")``."""
    lgb = require("lightgbm", "sklearn", "LightGBM")
    onnxmltools = require("onnxmltools", "sklearn", "LightGBM")
    try:
        booster = lgb.Booster(model_file=job.source)
    except Exception as exc:
        raise ConvertError(f"not a loadable LightGBM model ({str(exc)[:300]})", "invalid") from None
    model = _convert(onnxmltools.convert_lightgbm, booster, booster.num_feature(), zipmap=False)
    versions = {"lightgbm": lgb.__version__, "onnxmltools": onnxmltools.__version__}
    return _finish(job, model, booster.num_feature(), lambda x: np.asarray(booster.predict(x)), versions)


def _convert(convert: Any, booster: Any, features: int, **options: Any) -> onnx.ModelProto:
    from onnxmltools.convert.common.data_types import FloatTensorType

    try:
        model: onnx.ModelProto = convert(
            booster, initial_types=[(INPUT, FloatTensorType([None, features]))], target_opset=OPSET, **options
        )
    except Exception as exc:
        raise ConvertError(f"onnxmltools failed: {type(exc).__name__}: {str(exc)[:500]}") from None
    batch_outputs(model)
    return model


def batch_outputs(model: onnx.ModelProto) -> None:
    """Give every output the input's symbolic batch dim (onnxmltools declares LightGBM's label as [1])."""
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    name = batch.dim_param or "N"
    batch.dim_param = name
    for output in model.graph.output:
        dims = output.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = name


def _finish(job: Job, model: onnx.ModelProto, features: int, predict: Any, versions: dict[str, str]) -> Produced:
    if job.max_batch_size_hint == 0:
        raise ConvertError("tree models take a batch of rows: set max_batch_size > 0 (or leave it out)", "invalid")
    job.onnx_path.write_bytes(model.SerializeToString())
    signature = [TensorInfo(INPUT, np.dtype(np.float32), ("N", features))]
    batches, source = validation_batches(signature, job.load_samples(), True)
    names = [output.name for output in model.graph.output]
    outputs = [_shape_like(names, predict(feed[INPUT])) for feed in batches]
    return Produced(batches, outputs, source, versions)


def _shape_like(names: list[str], prediction: np.ndarray) -> Feed:
    """The framework's prediction as onnxmltools' outputs: label + probabilities, or variable [N, 1]."""
    if names == ["variable"]:
        return {"variable": prediction.reshape(len(prediction), -1).astype(np.float32)}
    if names != ["label", "probabilities"]:
        raise ConvertError(f"unexpected converted outputs {names}")
    probabilities = prediction if prediction.ndim == 2 else np.stack([1 - prediction, prediction], axis=1)
    return {"label": probabilities.argmax(axis=1).astype(np.int64), "probabilities": probabilities.astype(np.float32)}


def source_path(folder: Path, names: tuple[str, ...]) -> Path | None:
    """The first of ``names`` present in ``folder``."""
    return next((folder / name for name in names if (folder / name).is_file()), None)
