"""Engine candidates: a model file run by another engine at an explicit precision. They compete with the model
passes' candidates (onnxruntime's CPU kernels at FP32/INT8) through the same guard, timing and selection:

- ``openvino_fp32``: the original model on OpenVINO computing in f32 (family fp32, the lossless budget);
- ``openvino_bf16``: the original on OpenVINO in bf16, only where the CPU has avx512_bf16 or AMX (its own family,
  bf16, with FP16's budget; refused under ``precision: fp32``);
- ``openvino_int8``: the ``int8_static`` pass's QDQ model on OpenVINO (family int8), whose INT8 kernels read the
  QDQ graph; everything not quantized computes in f32.

Each spec sets its precision explicitly (:mod:`optimizers.openvino`) and keeps OpenVINO's compiled models in the
optimizer's cache folder, and the report names the engine, the precision and where onnxruntime really placed the
nodes."""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optimizers import openvino
from optimizers.accuracy import Family
from optimizers.device import DeviceInfo
from optimizers.providers import CPU, OPENVINO
from optimizers.runtime import SessionSpec

log = logging.getLogger("optiserve.optimizers")

ORIGINAL = "original"
"""The ``source`` of a candidate that runs the uploaded model itself."""


@dataclass(frozen=True)
class EngineCandidate:
    """One engine x precision. ``source`` is the model it runs: :data:`ORIGINAL`, or the name of the pass whose
    artifact it takes."""

    name: str
    family: Family
    source: str
    spec: SessionSpec


def openvino_spec(hint: openvino.Hint, device: str = "CPU", cache_root: Path | None = None) -> SessionSpec:
    """OpenVINO on ``device`` computing in ``hint``, with onnxruntime's CPU kernels for any node it does not take;
    OpenVINO's model cache under ``cache_root`` (:func:`optimizers.openvino.cache_dir`) when given."""
    cache = openvino.cache_dir(cache_root) if cache_root is not None else None
    options = openvino.provider_options(hint, device, cache)
    return SessionSpec(providers=(OPENVINO, CPU), provider_options={OPENVINO: options})


def openvino_candidates(cache_root: Path | None = None) -> tuple[EngineCandidate, ...]:
    """The OpenVINO candidates, their compiled models cached under ``cache_root`` when given."""
    return (
        EngineCandidate("openvino_fp32", "fp32", ORIGINAL, openvino_spec("f32", cache_root=cache_root)),
        EngineCandidate("openvino_bf16", "bf16", ORIGINAL, openvino_spec("bf16", cache_root=cache_root)),
        EngineCandidate("openvino_int8", "int8", "int8_static", openvino_spec("f32", cache_root=cache_root)),
    )


OPENVINO_CANDIDATES = openvino_candidates()
"""The candidates without a model cache (their names, families and precisions)."""


def candidates(target: str, cache_root: Path | None = None) -> tuple[EngineCandidate, ...]:
    """The engine candidates for a target, in report order (none on GPUs yet: TensorRT is the compile step's);
    OpenVINO's compiled models are cached under ``cache_root`` when given."""
    return openvino_candidates(cache_root) if target == "cpu" else ()


def skip_reason(
    candidate: EngineCandidate, device: DeviceInfo, built: Collection[str], listed: Sequence[str] = ()
) -> str | None:
    """Why ``candidate`` cannot run here (None: it can). ``built`` names the passes whose artifact exists;
    ``listed`` is the server's ``--execution-providers`` (empty: no list, every engine may compete)."""
    if candidate.spec.engine == "openvino" and (refusal := openvino_refusal(device, listed)):
        return refusal
    if candidate.family == "bf16" and not device.has_bf16:
        return "this CPU has neither avx512_bf16 nor amx_bf16: bf16 would not pay"
    if candidate.source != ORIGINAL and candidate.source not in built:
        return f"needs the {candidate.source} model, which this run did not build"
    return None


def openvino_refusal(device: DeviceInfo, listed: Sequence[str] = ()) -> str | None:
    """Why no OpenVINO candidate may run (None: they may): the operator's provider list leaves it out, or the plugin
    offers no CPU here (said plainly when the list asks for it)."""
    if listed and OPENVINO not in listed:
        return f"{OPENVINO} is not among the server's execution_providers ({', '.join(listed)})"
    if device.openvino_cpu:
        return None
    note = device.openvino_note or "the plugin offers no CPU device"
    if OPENVINO in listed:
        return f"{OPENVINO} is listed in execution_providers but unavailable: {note}"
    return f"OpenVINO unavailable: {note}"


def provider_notes(listed: Sequence[str], device: DeviceInfo) -> list[str]:
    """The report's ``notes`` for the operator's provider list: each listed provider this machine cannot give
    (OpenVINO without a device from its plugin, any other one missing from this onnxruntime), logged as a
    warning, so a listed engine is never dropped without a word."""
    notes = []
    for provider in dict.fromkeys(listed):
        if provider == OPENVINO:
            if device.openvino_cpu:
                continue
            why = device.openvino_note or "the plugin offers no CPU device"
            notes.append(
                f"execution_providers lists {OPENVINO}, which is unavailable here ({why}): "
                "no OpenVINO candidate runs, onnxruntime's own kernels serve"
            )
        elif provider not in device.providers:
            notes.append(
                f"execution_providers lists {provider}, which this onnxruntime lacks "
                f"(it has {', '.join(device.providers)}); it is not used"
            )
    for note in notes:
        log.warning("%s", note)
    return notes


def describe(spec: SessionSpec, family: Family, nodes: dict[str, int]) -> dict[str, Any]:
    """What runs, for the report: the engine, its device, the precision family (plus the hint the engine was given,
    where it takes one), the providers asked for, and nodes by provider as onnxruntime placed them when the guard
    ran this spec (an OpenVINO candidate whose nodes all fell back is rejected there)."""
    summary: dict[str, Any] = {"engine": spec.engine, "precision": family}
    if spec.engine == "openvino":
        summary["device"] = openvino.device_of(spec.provider_options.get(OPENVINO, {}))
        summary["precision_hint"] = spec.precision_hint
    summary["providers"] = list(spec.providers)
    summary["nodes"] = dict(nodes)
    return summary
