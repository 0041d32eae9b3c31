"""PyTorch: a torch.export archive (``model.pt2``) to ONNX with ``torch.onnx.export(dynamo=True)``.

Runs in the converter worker. An untrusted archive is checked first (:mod:`server.convert.pt2`) and loaded
from a copy whose sample-inputs pickle is replaced by one we write, so no byte of the upload is unpickled.
When the config asks for batching and the archive's dim 0 is static, the program is re-exported with a
dynamic batch dim."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from optimizers.modelinfo import Dim, TensorInfo
from optimizers.reference import random_tensor
from optimizers.runtime import Feed
from server.convert.inputs import validation_batches
from server.convert.job import ConvertError, Job, Produced, require
from server.convert.pt2 import SAMPLE_INPUTS, check_pt2

OPSET = 18
FREE_DIM = 8


def produce(job: Job) -> Produced:
    """Convert ``job.source`` and run the original on the validation inputs."""
    torch = require("torch", "torch", "PyTorch")
    onnxscript = require("onnxscript", "torch", "PyTorch")
    program = load_program(torch, Path(job.source), Path(job.work_dir), job.trusted)
    return export_program(torch, program, job, {"torch": torch.__version__, "onnxscript": onnxscript.__version__})


def export_program(torch: Any, program: Any, job: Job, versions: dict[str, str]) -> Produced:
    """ExportedProgram -> ONNX at ``job.onnx_path``, plus the program's own outputs on the validation set."""
    signature, dynamic = program_signature(torch, program)
    notes: list[str] = []
    if job.max_batch_size_hint and not dynamic:
        program = _dynamic_batch(torch, program, signature)
        signature, dynamic = program_signature(torch, program)
        notes.append("re-exported with a dynamic batch dim (the archive's dim 0 was static)")
    batches, source = validation_batches(signature, job.load_samples(), dynamic)
    example = tuple(torch.from_numpy(batches[0][t.name]) for t in signature)
    program.example_inputs = (example, {})
    try:
        torch.onnx.export(program, example, str(job.onnx_path), dynamo=True, external_data=False, opset_version=OPSET)
    except Exception as exc:
        raise ConvertError(f"torch.onnx.export failed: {type(exc).__name__}: {_short(exc)}") from None
    names = [output.name for output in onnx.load(str(job.onnx_path), load_external_data=False).graph.output]
    module = program.module()
    outputs = [_run(torch, module, feed, signature, names) for feed in batches]
    return Produced(batches, outputs, source, versions, notes)


def load_program(torch: Any, source: Path, work_dir: Path, trusted: bool) -> Any:
    """``torch.export.load`` on a checked copy of the archive (or on the file itself when trusted)."""
    if trusted:
        return torch.export.load(str(source))
    check_pt2(source, source.name)
    safe = work_dir / "checked.pt2"
    _copy_without_samples(torch, source, safe)
    try:
        return torch.export.load(str(safe))
    except Exception as exc:
        raise ConvertError(f"{source.name}: torch.export.load failed: {_short(exc)}", "invalid") from None


def _copy_without_samples(torch: Any, source: Path, target: Path) -> None:
    """The archive with its sample inputs (a pickle) replaced by an empty one written here."""
    placeholder = io.BytesIO()
    torch.save(((), {}), placeholder)
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            if info.filename.split("/", 1)[-1] == SAMPLE_INPUTS:
                out.writestr(info.filename, placeholder.getvalue())
            else:
                out.writestr(info.filename, src.read(info))


def program_signature(torch: Any, program: Any) -> tuple[list[TensorInfo], bool]:
    """The user inputs (numpy dtype, shape with concrete non-batch dims) and whether every dim 0 is dynamic."""
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    signature: list[TensorInfo] = []
    dynamic = True
    for name in program.graph_signature.user_inputs:
        value = placeholders[name].meta.get("val")
        if not isinstance(value, torch.Tensor):
            raise ConvertError(f"input {name!r} is not a tensor; only tensor inputs can be served", "invalid")
        dims: list[Dim] = []
        for index, size in enumerate(value.shape):
            if isinstance(size, int):
                dims.append(size)
            else:
                dims.append("batch" if index == 0 else _free_size(program, size))
        dynamic = dynamic and bool(dims) and dims[0] == "batch"
        signature.append(TensorInfo(name, _numpy_dtype(torch, value.dtype, name), tuple(dims)))
    if not signature:
        raise ConvertError("the exported program has no inputs", "invalid")
    return signature, dynamic


def _free_size(program: Any, size: Any) -> int:
    """A concrete size for a dynamic non-batch dim, inside its range constraint."""
    bounds = program.range_constraints.get(size.node.expr)
    low = int(bounds.lower) if bounds is not None and bounds.lower.is_finite else 1
    high = int(bounds.upper) if bounds is not None and bounds.upper.is_finite else 1 << 30
    return max(low, min(FREE_DIM, high))


def _numpy_dtype(torch: Any, dtype: Any, name: str) -> np.dtype:
    try:
        result: np.dtype = np.dtype(torch.empty(0, dtype=dtype).numpy().dtype)
        return result
    except (TypeError, RuntimeError):
        raise ConvertError(
            f"input {name!r} has dtype {dtype}, which numpy (and the protocol) lacks", "invalid"
        ) from None


def _dynamic_batch(torch: Any, program: Any, signature: list[TensorInfo]) -> Any:
    """Re-export with dim 0 dynamic (torch needs an example batch of at least 2 to keep it symbolic)."""
    rng = np.random.default_rng(0)
    args = tuple(torch.from_numpy(random_tensor(rng, t, 2)) for t in signature)
    program.example_inputs = (args, {})
    batch = torch.export.Dim("batch")
    try:
        return torch.export.export(program.module(), args, dynamic_shapes=tuple({0: batch} for _ in signature))
    except Exception as exc:
        raise ConvertError(
            "the config asks for batching (max_batch_size > 0) but the archive's dim 0 is static and cannot be "
            f"made dynamic ({type(exc).__name__}: {_short(exc)}); export with dynamic_shapes={{0: Dim('batch')}} "
            "or set max_batch_size: 0",
            "invalid",
        ) from None


def _run(torch: Any, module: Any, feed: Feed, signature: list[TensorInfo], names: list[str]) -> Feed:
    with torch.no_grad():
        result = module(*(torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in signature))
    flat = torch.utils._pytree.tree_flatten(result)[0]
    if len(flat) != len(names) or not all(isinstance(value, torch.Tensor) for value in flat):
        raise ConvertError(f"the program returns {len(flat)} values, the ONNX model {len(names)} tensors", "invalid")
    return {name: value.detach().cpu().numpy() for name, value in zip(names, flat, strict=True)}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]
