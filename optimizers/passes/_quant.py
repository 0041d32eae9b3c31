"""Helpers shared by the two INT8 passes: onnxruntime's pre-processing (Constant nodes folded into initializers,
subgraphs' included, then shape inference + basic fusions, which quantization needs to see every tensor's shape),
the quantization types and the quantizer fallbacks. onnxruntime's log chatter while they run stays at DEBUG
(:mod:`optimizers.library_logs`)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from optimizers import library_logs
from optimizers.modelinfo import normalize

log = logging.getLogger("optiserve.optimizers")

IntType = Literal["int8", "uint8"]


def preprocess(source: Path, target: Path) -> bool:
    """``quant_pre_process`` into ``target``; returns whether symbolic shape inference could run (it can fail
    on exotic graphs, and the ONNX shape inference alone is then the best there is). Constant nodes are folded
    into initializers first: onnxruntime folds the main graph's itself, but leaves those inside ``If``/``Loop``
    subgraphs as nodes, and its quantizer only quantizes weights it finds as initializers."""
    with library_logs.quieted():
        folded = fold_constants(source, target.with_name(target.stem + ".folded.onnx"))
        try:
            return _preprocess(folded or source, target)
        finally:
            if folded is not None:
                folded.unlink(missing_ok=True)


def fold_constants(source: Path, target: Path) -> Path | None:
    """``source`` with its Constant nodes folded (:func:`optimizers.modelinfo.normalize`) written to ``target``;
    None (nothing written) when it has none."""
    import onnx

    model = onnx.load(str(source))
    normalized, folded = normalize(model, infer_shapes=False)
    if not folded:
        return None
    onnx.save(normalized, str(target))
    return target


def _preprocess(source: Path, target: Path) -> bool:
    from onnxruntime.quantization import quant_pre_process

    if (Path.cwd() / SYMBOLIC_DEBRIS).exists():  # a failure would overwrite it: never touch a file we did not write
        log.warning("%s exists in the working folder; skipping symbolic shape inference", SYMBOLIC_DEBRIS)
    else:
        try:
            with _SYMBOLIC_LOCK, _no_debris_in_cwd():
                quant_pre_process(str(source), str(target))
            return True
        except Exception as exc:  # onnxruntime raises bare Exceptions from its shape inference
            log.debug("quant_pre_process with symbolic shapes failed (%s); retrying without", exc)
    quant_pre_process(str(source), str(target), skip_symbolic_shape=True)
    return False


#: onnxruntime's symbolic shape inference, when it cannot finish, saves the partial model as this file (plus
#: external data) in the *current folder* of the process before raising: a server's working folder.
SYMBOLIC_DEBRIS = "sym_shape_infer_temp.onnx"
_SYMBOLIC_LOCK = threading.Lock()


@contextlib.contextmanager
def _no_debris_in_cwd() -> Iterator[None]:
    """Remove what a failed symbolic shape inference left in the current folder (only files that were not there
    before). Callers hold _SYMBOLIC_LOCK so two runs never share the file."""
    debris = Path.cwd() / SYMBOLIC_DEBRIS
    before = {p.name for p in Path.cwd().iterdir()}
    try:
        yield
    finally:
        if SYMBOLIC_DEBRIS not in before and debris.exists():
            for name in _external_files(debris):
                if name not in before:
                    (Path.cwd() / name).unlink(missing_ok=True)
            debris.unlink(missing_ok=True)


def _external_files(model_path: Path) -> list[str]:
    """The plain file names the saved model's tensors point to (onnx names them itself, next to the model)."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # a half-written file: nothing more to find
        return []
    names = set()
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == Path(entry.value).name:
                names.add(entry.value)
    return sorted(names)


def quant_type(name: IntType) -> Any:
    """onnxruntime's QuantType for our config's spelling."""
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


#: Ops whose third input is a bias onnxruntime quantizes to int32 (the path that raises on some real models).
BIASED_OPS = ("Conv", "Gemm", "ConvTranspose")
MAX_ERROR_CHARS = 300


@dataclass(frozen=True)
class QuantSetting:
    """One way to call onnxruntime's quantizer. The passes try a list of them in order, each one avoiding the
    path that made the previous one raise: per-tensor instead of per-channel scales, no weight-scale adjustment
    for int32 biases (``QDQDisableWeightAdjustForInt32Bias``), biases left in float (``QuantizeBias``), and last
    the nodes with a bias left out of quantization."""

    name: str
    per_channel: bool
    extra_options: dict[str, Any] = field(default_factory=dict)
    exclude_biased: bool = False


def fallback_settings(per_channel: bool, extra_options: dict[str, Any], qdq: bool) -> list[QuantSetting]:
    """The configured setting first, then the fallbacks (``qdq``: the static QDQ quantizer's extra options)."""
    settings = [QuantSetting("configured", per_channel, dict(extra_options))]
    if per_channel:
        settings.append(QuantSetting("per_tensor", False, dict(extra_options)))
    if qdq:
        no_adjust = {**extra_options, "QDQDisableWeightAdjustForInt32Bias": True}
        settings.append(QuantSetting("no_int32_bias_weight_adjust", False, no_adjust))
        settings.append(QuantSetting("float_bias", False, {**no_adjust, "QuantizeBias": False}))
    settings.append(QuantSetting("exclude_biased_nodes", False, dict(extra_options), exclude_biased=True))
    return settings


def quantize_with_fallbacks(
    settings: Sequence[QuantSetting],
    prepared: Path,
    target: Path,
    quantize: Callable[[QuantSetting, list[str]], None],
) -> dict[str, Any]:
    """Call ``quantize(setting, nodes_to_exclude)`` (which writes ``target``) for each setting until one returns
    a model that loads (:func:`check_loads`); the report's details name the setting that passed and every
    attempt. Raises :class:`QuantizeFailed` when all of them fail."""
    attempts: list[dict[str, Any]] = []
    for setting in settings:
        excluded = name_biased_nodes(prepared) if setting.exclude_biased else []
        try:
            with library_logs.quieted():
                quantize(setting, excluded)
            check_loads(target)
        except Exception as exc:  # onnxruntime's quantizer raises anything (ValueError, IndexError, bare Exception)
            error = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            attempts.append({"setting": setting.name, "error": error})
            log.info(
                "quantizer setting %s failed (%s)%s",
                setting.name,
                error,
                "; trying the next" * (setting != settings[-1]),
            )
            continue
        attempt: dict[str, Any] = {"setting": setting.name, "error": None}
        if excluded:
            attempt["excluded_nodes"] = len(excluded)
        return {"quantizer_setting": setting.name, "quantizer_attempts": [*attempts, attempt]}
    tried = "; ".join(f"{a['setting']}: {a['error']}" for a in attempts)
    raise QuantizeFailed(f"onnxruntime's quantizer failed with every setting ({tried})")


def check_loads(path: Path) -> None:
    """Open the quantized model in onnxruntime (CPU, no graph optimizations: only the graph's validity is in
    question). The quantizer can return without error and still write a graph that does not load, e.g.
    per-channel ``DequantizeLinear`` with an ``axis`` on an opset below 13; raising here sends the fallback
    loop on to the next setting instead of leaving the guard to reject the whole pass."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class QuantizeFailed(RuntimeError):
    """Every quantizer setting raised."""


def name_biased_nodes(prepared: Path) -> list[str]:
    """Names of the nodes with a bias input in ``prepared`` (unnamed nodes get a name, written back), so
    ``nodes_to_exclude`` can leave them in float."""
    import onnx

    model = onnx.load(str(prepared))
    taken = {node.name for node in model.graph.node if node.name}
    changed, names = False, []
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = next(
                n for n in (f"{node.op_type}_{index}_{k}" for k in range(len(taken) + 1)) if n not in taken
            )
            taken.add(node.name)
            changed = True
        if node.op_type in BIASED_OPS and len(node.input) > 2 and node.input[2]:
            names.append(node.name)
    if changed:
        onnx.save(model, str(prepared))
    return names
