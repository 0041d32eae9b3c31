"""Sessions for checking and timing candidates: one small spec (threads, providers, provider options) that is
both what the pipeline times and what it hands the server to serve with (``PipelineResult.session``). A spec
whose providers include OpenVINO opens through the plugin (:mod:`optimizers.openvino`), never by name."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optimizers import custom_ops, openvino
from optimizers.providers import CPU, OPENVINO, engine_of, uses_gpu

Feed = dict[str, np.ndarray]
DeviceGuard = Callable[[], AbstractContextManager[object]]
"""What the host wraps the optimizer's GPU work in (creating, running and dropping sessions): the server passes
its CUDA-graph capture lock, taken shared, because onnxruntime captures in CUDA's global mode and a synchronous
copy or an allocation from any other thread would break a capture. Given to :class:`optimizers.Pipeline`."""
NO_GUARD: DeviceGuard = contextlib.nullcontext
"""The guard of a host with no GPU work of its own to protect."""


def device_work(spec: SessionSpec, guard: DeviceGuard = NO_GUARD) -> AbstractContextManager[object]:
    """``guard()`` for GPU work with ``spec``; nothing for a CPU-only spec."""
    return guard() if uses_gpu(spec.providers) else contextlib.nullcontext()


@dataclass(frozen=True)
class SessionSpec:
    """How to open a session. ``intra_op_threads=None`` keeps onnxruntime's default (one per core).
    ``instances``: how many such sessions the server should run side by side (each on its own worker), where
    the compile step timed that N instances x T threads beat one instance on every core; None leaves the
    count to the model's config and the server."""

    providers: tuple[str, ...] = (CPU,)
    provider_options: dict[str, dict[str, str]] = field(default_factory=dict)
    intra_op_threads: int | None = None
    instances: int | None = None

    @property
    def chooses_providers(self) -> bool:
        """Whether the spec names providers of its own (the default, CPU alone, leaves the host's choice)."""
        return self.providers != (CPU,)

    def as_options(self) -> dict[str, Any]:
        """The non-default parts, as the report's ``session_options`` (and the CLI's session_options.json)."""
        options: dict[str, Any] = {}
        if self.intra_op_threads is not None:
            options["intra_op_threads"] = self.intra_op_threads
        if self.instances is not None:
            options["instances"] = self.instances
        if self.chooses_providers:
            options["providers"] = list(self.providers)
        if self.provider_options:
            options["provider_options"] = {name: dict(opts) for name, opts in self.provider_options.items()}
        return options

    @property
    def engine(self) -> str:
        """The engine that computes: ``openvino``, ``tensorrt``, ``cuda`` or ``onnxruntime`` (its CPU kernels)."""
        return engine_of(self.providers)

    @property
    def precision_hint(self) -> str | None:
        """The precision the engine is told to compute in, where it takes one (OpenVINO: ``f32``/``bf16``)."""
        if self.engine != "openvino":
            return None
        return openvino.precision_hint(self.provider_options.get(OPENVINO, {}))


def open_session(model_path: Path, spec: SessionSpec, guard: DeviceGuard = NO_GUARD) -> Any:
    """An InferenceSession for ``spec``, created inside ``guard`` when it uses a GPU. Providers this onnxruntime
    lacks are dropped (CPU stays last), so a plan made for a GPU still opens, on CPU, where there is none. An
    OpenVINO spec opens through the plugin and fails (:class:`optimizers.openvino.OpenVinoError`) rather than run
    elsewhere. Every session records which provider got each node (:func:`optimizers.openvino.placement`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # candidates are expected to warn (e.g. FP16 casts); keep logs readable
    options.add_session_config_entry(openvino.ASSIGNMENT_ENTRY, "1")
    custom_ops.register(options, custom_ops.library_for(model_path))
    if spec.intra_op_threads is not None:
        options.intra_op_num_threads = spec.intra_op_threads
    if spec.engine == "openvino":
        ov_options = spec.provider_options.get(OPENVINO, {})
        return openvino.PLUGIN.create_session(model_path, options, ov_options, spec.intra_op_threads)
    installed = set(ort.get_available_providers())
    providers = [(p, spec.provider_options.get(p, {})) for p in spec.providers if p in installed]
    if not any(name == CPU for name, _ in providers):
        providers.append((CPU, {}))
    with device_work(spec, guard):
        return ort.InferenceSession(str(model_path), options, providers=providers)


@dataclass
class SessionRun:
    """Outputs of every batch, and where the session really ran them: nodes by provider as onnxruntime recorded
    them (empty where it kept no record)."""

    outputs: list[Feed]
    nodes: dict[str, int] = field(default_factory=dict)


def run_checked(
    model_path: Path, spec: SessionSpec, batches: Sequence[Feed], guard: DeviceGuard = NO_GUARD
) -> SessionRun:
    """Open ``model_path`` with ``spec``, note where its nodes run, run every batch, and drop the session inside
    the device guard (freeing its GPU memory is GPU work too). An OpenVINO session that took no node is refused
    (:func:`optimizers.openvino.check_placement`): it would be timed as OpenVINO while onnxruntime computes."""
    session = open_session(model_path, spec, guard)
    try:
        nodes = openvino.placement(session)
        if spec.engine == "openvino":
            openvino.check_placement(nodes)
        return SessionRun(run_batches(session, batches, spec, guard), nodes)
    finally:
        with device_work(spec, guard):
            del session


def outputs_of(
    model_path: Path, spec: SessionSpec, batches: Sequence[Feed], guard: DeviceGuard = NO_GUARD
) -> list[Feed]:
    """The outputs of :func:`run_checked`."""
    return run_checked(model_path, spec, batches, guard).outputs


def run_batches(
    session: Any, batches: Sequence[Feed], spec: SessionSpec | None = None, guard: DeviceGuard = NO_GUARD
) -> list[Feed]:
    """Outputs of every batch, by output name (each run inside ``guard`` when ``spec`` uses a GPU)."""
    names = [output.name for output in session.get_outputs()]
    results = []
    for feed in batches:
        with device_work(spec, guard) if spec is not None else contextlib.nullcontext():
            values = session.run(names, feed)
        results.append({name: np.asarray(value) for name, value in zip(names, values, strict=True)})
    return results
