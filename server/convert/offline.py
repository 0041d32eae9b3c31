"""Formats only the offline converter takes, because loading them runs code from the file: scikit-learn
pickles (and joblib files), TorchScript archives and Keras files. ``optiserve convert`` runs these on the
user's own machine, on files the user trusts; the server refuses them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizers.modelinfo import TensorInfo
from server.convert import savedmodel
from server.convert.inputs import validation_batches
from server.convert.job import ConvertError, Job, Produced, require
from server.convert.trees import INPUT, batch_outputs

SKLEARN_OPSET = 17
TORCHSCRIPT_OPSET = 17


def produce_sklearn(job: Job) -> Produced:
    """A fitted estimator or pipeline from a pickle/joblib file, through skl2onnx (float32 features)."""
    joblib = require("joblib", "sklearn", "scikit-learn")
    skl2onnx = require("skl2onnx", "sklearn", "scikit-learn")
    from skl2onnx.common.data_types import FloatTensorType

    model = joblib.load(job.source)  # a pickle: the offline converter runs only on the user's own files
    features = getattr(model, "n_features_in_", None)
    if not isinstance(features, int):
        raise ConvertError("the pickle holds no fitted scikit-learn estimator (no n_features_in_)", "invalid")
    final = model.steps[-1][1] if hasattr(model, "steps") else model
    options = {id(final): {"zipmap": False}} if hasattr(final, "predict_proba") else None
    try:
        converted: onnx.ModelProto = skl2onnx.to_onnx(
            model,
            initial_types=[(INPUT, FloatTensorType([None, features]))],
            options=options,
            target_opset=SKLEARN_OPSET,
        )
    except Exception as exc:
        raise ConvertError(f"skl2onnx failed: {type(exc).__name__}: {str(exc)[:500]}") from None
    batch_outputs(converted)
    job.onnx_path.write_bytes(converted.SerializeToString())
    signature = [TensorInfo(INPUT, np.dtype(np.float32), ("N", features))]
    batches, source = validation_batches(signature, job.load_samples(), True)
    names = [output.name for output in converted.graph.output]
    outputs = [_sklearn_outputs(model, feed[INPUT], names) for feed in batches]
    import sklearn

    return Produced(batches, outputs, source, {"scikit-learn": sklearn.__version__, "skl2onnx": skl2onnx.__version__})


def _sklearn_outputs(model: Any, x: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    if names == ["variable"]:
        prediction = np.asarray(model.predict(x))
        return {"variable": prediction.reshape(len(x), -1).astype(np.float32)}
    if names == ["label", "probabilities"]:
        label = np.asarray(model.predict(x))
        label = label.astype(np.int64) if label.dtype.kind in "iub" else label
        return {"label": label, "probabilities": np.asarray(model.predict_proba(x), dtype=np.float32)}
    raise ConvertError(f"unexpected converted outputs {names}")


def produce_torchscript(job: Job) -> Produced:
    """A TorchScript archive (``torch.jit.save``), through the TorchScript ONNX exporter. Its input shapes
    are unknown, so ``--sample`` is required (keys = forward's argument names)."""
    torch = require("torch", "torch", "PyTorch")
    module = torch.jit.load(job.source, map_location="cpu").eval()  # unpickles: only for the user's own files
    samples = job.load_samples()
    if not samples:
        raise ConvertError("TorchScript models carry no input shapes: pass --sample S.npz (keys = input names)")
    names = [arg.name for arg in module.forward.schema.arguments if arg.name != "self"]
    signature = [
        TensorInfo(n, np.asarray(samples[n]).dtype, ("batch", *np.asarray(samples[n]).shape[1:]))
        for n in names
        if n in samples
    ]
    batched = bool(job.max_batch_size_hint)
    batches, source = validation_batches(signature, samples, batched)
    example = tuple(torch.from_numpy(np.ascontiguousarray(batches[0][n])) for n in names)
    axes = {n: {0: "batch"} for n in names} if batched else None
    torch.onnx.export(
        module,
        example,
        str(job.onnx_path),
        dynamo=False,
        input_names=names,
        dynamic_axes=axes,
        opset_version=TORCHSCRIPT_OPSET,
    )
    outputs_names = [o.name for o in onnx.load(str(job.onnx_path)).graph.output]
    outputs = []
    for feed in batches:
        with torch.no_grad():
            result = module(*(torch.from_numpy(np.ascontiguousarray(feed[n])) for n in names))
        flat = torch.utils._pytree.tree_flatten(result)[0]
        outputs.append({n: t.detach().numpy() for n, t in zip(outputs_names, flat, strict=True)})
    return Produced(batches, outputs, source, {"torch": torch.__version__})


def produce_keras(job: Job) -> Produced:
    """A Keras file (``.keras``; legacy ``.h5``): loaded in Keras' safe mode, exported as a SavedModel, then
    converted like an uploaded one."""
    keras = require("keras", "tensorflow", "Keras")
    model = keras.models.load_model(job.source)
    exported = Path(job.work_dir) / "saved_model"
    model.export(str(exported))
    job.source = str(exported)
    return savedmodel.produce(job)
