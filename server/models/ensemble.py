"""Ensembles: Triton's ``platform: "ensemble"`` config, served like a model.

An ensemble has no model file (its version folder is empty); its ``ensemble_scheduling.step`` list wires the
inputs and outputs of member models together through named ensemble tensors. Each step runs as soon as the
tensors it maps in are ready (a DAG run with asyncio) and goes through its member's own
:meth:`ModelVersion.infer`, so member requests batch with the member's direct traffic. Members are looked up
per request, so a reloaded member is used at once; a member that is not ready makes the ensemble unready.

At load, every tensor's datatype and shape are checked against the members that read and write it (errors name
the step). A request's ``priority`` and ``timeout`` parameters go with each step to its member's batcher, as
Triton passes them to composing models. An output asked for as top-k classes takes its labels from the
``label_filename`` of the member output that produces it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from server.errors import InternalError, LoadFailed, ServerError, failure_reason
from server.models.batching import Batcher
from server.models.stats import ModelStats
from server.models.version import ModelVersion, scheduling_parameters
from server.protocol import classification, datatypes
from server.protocol.inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
)
from server.protocol.validation import TensorSpec, check_requested_outputs, prepare_inputs
from server.repository.config import LoadedConfig, ModelConfig, check_batch_sizes, named_copy, tensor_specs

ENSEMBLE = "ensemble"
Tensors = dict[str, np.ndarray]
Lookup = Callable[[str, str], ModelVersion]
"""The manager's ``get(name, version)``: the member version that serves a step now."""
PASSED_PARAMETERS = ("priority", "timeout")
"""Request parameters each step's member request carries (Triton's scheduling parameters)."""


@dataclass(frozen=True)
class Step:
    """One ``ensemble_scheduling.step``: ``inputs`` maps member input -> ensemble tensor, ``outputs`` member
    output -> ensemble tensor."""

    index: int
    model_name: str
    model_version: str
    inputs: dict[str, str]
    outputs: dict[str, str]

    @property
    def label(self) -> str:
        return f"step {self.index} (model {self.model_name!r})"


@dataclass(frozen=True)
class MemberTensors:
    """The input and output names of a member model."""

    inputs: frozenset[str]
    outputs: frozenset[str]


def is_ensemble(config: ModelConfig) -> bool:
    return bool(config.platform == ENSEMBLE)


def parse_steps(name: str, config: ModelConfig) -> list[Step]:
    """The steps of an ensemble config, structurally checked (no member yet)."""
    raw = list(config.ensemble_scheduling.step)
    if not raw:
        raise LoadFailed(f"ensemble {name!r}: ensemble_scheduling has no step")
    steps: list[Step] = []
    for index, step in enumerate(raw):
        label = f"step {index} (model {step.model_name!r})"
        if not step.model_name:
            raise LoadFailed(f"ensemble {name!r}: step {index} has no model_name")
        if step.model_name == name:
            raise LoadFailed(f"ensemble {name!r}: {label} names the ensemble itself")
        if step.model_version < -1:
            raise LoadFailed(f"ensemble {name!r}: {label}: model_version must be -1 (latest) or a version")
        version = "" if step.model_version <= 0 else str(step.model_version)
        steps.append(Step(index, step.model_name, version, dict(step.input_map), dict(step.output_map)))
    return steps


def check_plan(name: str, config: ModelConfig, steps: list[Step], members: dict[str, MemberTensors]) -> None:
    """Check the wiring: members exist, map keys are the members' tensor names, every step input is an
    ensemble input or another step's output, each tensor is produced once, every ensemble output is produced,
    and the steps form no cycle. Errors name the step."""
    prefix = f"ensemble {name!r}"
    inputs = {t.name for t in config.input}
    outputs = {t.name for t in config.output}
    if not outputs:
        raise LoadFailed(f"{prefix}: the config lists no output")
    producer: dict[str, Step] = {}
    for step in steps:
        member = members.get(step.model_name)
        if member is None:
            raise LoadFailed(f"{prefix}: {step.label}: the model is not in the repository")
        _check_step(prefix, step, member, inputs, producer)
    for step in steps:
        for tensor in step.inputs.values():
            if tensor not in inputs and tensor not in producer:
                raise LoadFailed(
                    f"{prefix}: {step.label}: input {tensor!r} is neither an ensemble input nor any step's output"
                )
    for tensor in sorted(outputs - set(producer)):
        raise LoadFailed(f"{prefix}: ensemble output {tensor!r} is not produced by any step")
    _check_acyclic(prefix, steps, producer)


def _check_step(prefix: str, step: Step, member: MemberTensors, inputs: set[str], producer: dict[str, Step]) -> None:
    """One step's maps against its member's tensor names; records the tensors it produces."""
    for key in step.inputs:
        if key not in member.inputs:
            raise LoadFailed(f"{prefix}: {step.label}: input_map key {key!r} is not an input of the model")
    for key in sorted(member.inputs - set(step.inputs)):
        raise LoadFailed(f"{prefix}: {step.label}: the model's input {key!r} is not in input_map")
    for key, tensor in step.outputs.items():
        if key not in member.outputs:
            raise LoadFailed(f"{prefix}: {step.label}: output_map key {key!r} is not an output of the model")
        if tensor in inputs:
            raise LoadFailed(f"{prefix}: {step.label}: output_map writes the ensemble input {tensor!r}")
        if tensor in producer:
            raise LoadFailed(f"{prefix}: {step.label}: tensor {tensor!r} is also produced by {producer[tensor].label}")
        producer[tensor] = step


def _check_acyclic(prefix: str, steps: list[Step], producer: dict[str, Step]) -> None:
    state: dict[int, int] = {}  # 1: on the path, 2: done

    def visit(step: Step) -> None:
        state[step.index] = 1
        for tensor in step.inputs.values():
            before = producer.get(tensor)
            if before is None:
                continue
            if state.get(before.index) == 1:
                raise LoadFailed(f"{prefix}: {step.label}: its input {tensor!r} depends on its own output (a cycle)")
            if before.index not in state:
                visit(before)
        state[step.index] = 2

    for step in steps:
        if step.index not in state:
            visit(step)


@dataclass(frozen=True)
class Signature:
    """What one tensor holds, as the config declares it: datatype and full shape (batch dim included as -1
    for a model with ``max_batch_size`` > 0); ``where`` says who declares it, for errors."""

    datatype: str
    shape: tuple[int, ...]
    where: str

    @classmethod
    def of(cls, spec: TensorSpec, max_batch_size: int, where: str) -> Signature:
        shape = ((-1,) if max_batch_size > 0 else ()) + tuple(spec.dims)
        return cls(spec.datatype.name, shape, where)

    def fits(self, other: Signature) -> bool:
        """Same datatype, same rank, and every dim equal where both are known (-1 is any size)."""
        if self.datatype != other.datatype or len(self.shape) != len(other.shape):
            return False
        return all(a == b or a < 0 or b < 0 for a, b in zip(self.shape, other.shape, strict=True))

    def __str__(self) -> str:
        return f"{self.datatype} {list(self.shape)} ({self.where})"


@dataclass(frozen=True)
class MemberSignature:
    """The declared inputs and outputs of a member model version."""

    inputs: dict[str, TensorSpec]
    outputs: dict[str, TensorSpec]
    max_batch_size: int

    @classmethod
    def of(cls, member: ModelVersion) -> MemberSignature:
        return cls({t.name: t for t in member.inputs}, {t.name: t for t in member.outputs}, member.max_batch_size)


def check_types(name: str, config: ModelConfig, steps: list[Step], members: dict[int, MemberSignature]) -> None:
    """Every ensemble tensor's datatype and shape agree between whoever writes it (an ensemble input, a step's
    member output) and whoever reads it (a step's member input, an ensemble output). Errors name the step."""
    prefix = f"ensemble {name!r}"
    batch = int(config.max_batch_size)
    written: dict[str, Signature] = {
        t.name: Signature.of(t, batch, "ensemble input") for t in tensor_specs(config, inputs=True)
    }
    for step in steps:
        member = members[step.index]
        for key, tensor in step.outputs.items():
            written[tensor] = Signature.of(member.outputs[key], member.max_batch_size, f"{step.label} output {key!r}")
    for step in steps:
        member = members[step.index]
        for key, tensor in step.inputs.items():
            wanted = Signature.of(member.inputs[key], member.max_batch_size, "the model's input")
            if tensor in written and not written[tensor].fits(wanted):
                raise LoadFailed(
                    f"{prefix}: {step.label}: input {key!r} takes {wanted}, but tensor {tensor!r} is {written[tensor]}"
                )
    for spec in tensor_specs(config, inputs=False):
        declared = Signature.of(spec, batch, "ensemble output")
        if spec.name in written and not written[spec.name].fits(declared):
            raise LoadFailed(
                f"{prefix}: ensemble output {spec.name!r} is declared {declared}, but is {written[spec.name]}"
            )


StepRunner = Callable[[Step, Tensors], Awaitable[Tensors]]


async def execute(steps: list[Step], inputs: Tensors, run: StepRunner) -> Tensors:
    """Run every step as soon as its input tensors exist; returns every tensor (inputs and step outputs).
    The first failing step cancels the others and its error is raised."""
    loop = asyncio.get_running_loop()
    ready: dict[str, asyncio.Future[np.ndarray]] = {}
    for step in steps:
        for tensor in step.outputs.values():
            ready[tensor] = loop.create_future()
    for tensor, array in inputs.items():
        future = ready.setdefault(tensor, loop.create_future())
        future.set_result(array)

    async def one(step: Step) -> None:
        needed = {key: await ready[tensor] for key, tensor in step.inputs.items()}
        produced = await run(step, needed)
        for key, tensor in step.outputs.items():
            ready[tensor].set_result(produced[key])

    tasks = [asyncio.ensure_future(one(step)) for step in steps]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        for future in ready.values():
            future.cancel()  # no "exception never retrieved" for tensors nobody read
    return {tensor: future.result() for tensor, future in ready.items()}


@dataclass
class EnsembleVersion(ModelVersion):
    """A served ensemble version: DataPlane uses it like a :class:`ModelVersion` (infer, config, inputs,
    outputs, stats); its batcher has no worker (the members batch)."""

    steps: list[Step] = field(default_factory=list)
    lookup: Lookup | None = None

    def members(self) -> dict[int, ModelVersion]:
        """The member version of each step now; the error of a member that does not serve names the step."""
        assert self.lookup is not None
        found: dict[int, ModelVersion] = {}
        for step in self.steps:
            try:
                found[step.index] = self.lookup(step.model_name, step.model_version)
            except ServerError as exc:
                raise type(exc)(
                    f"ensemble {self.name!r} {step.label}: {exc.message}", retry_after_s=exc.retry_after_s
                ) from exc
        return found

    def members_ready(self) -> bool:
        try:
            self.members()
        except ServerError:
            return False
        return True

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        prepared = prepare_inputs(request, self.inputs, self.max_batch_size)
        names = check_requested_outputs(request, self.outputs)
        top = self._classifications(request)
        scheduling_parameters(request.parameters)  # a bad priority or timeout is the client's error, not a step's
        members = self.members()

        async def run(step: Step, tensors: Tensors) -> Tensors:
            return await self._run_step(step, members[step.index], tensors, request)

        started = time.monotonic_ns()
        tensors = await execute(self.steps, prepared.tensors, run)
        # One execution per request, as Triton counts an ensemble's: its members' queues hold the waiting, so
        # the ensemble's own queue time is 0 and its compute is the wall time of its steps. (perf_analyzer finds
        # the version it measures by the queue count that grew.)
        self.stats.record_execution(prepared.samples, [0], 0, time.monotonic_ns() - started, 0)
        labels = self._member_labels(members) if top else {}
        outputs = [self._ensemble_output(n, tensors[n], top.get(n, 0), labels) for n in names]
        return InferenceResponse(self.name, str(self.version), outputs, id=request.id)

    def _member_labels(self, members: dict[int, ModelVersion]) -> dict[str, tuple[bytes, ...]]:
        """Each ensemble tensor's labels: those of the member output that produces it (its label_filename)."""
        labels: dict[str, tuple[bytes, ...]] = {}
        for step in self.steps:
            member = members[step.index]
            for key, tensor in step.outputs.items():
                if key in member.labels:
                    labels[tensor] = member.labels[key]
        return labels

    def _ensemble_output(
        self, name: str, array: np.ndarray, k: int, labels: dict[str, tuple[bytes, ...]]
    ) -> OutputTensor:
        """One result tensor, or its top ``k`` classes (labelled by the member that produced it)."""
        if k:
            classification.check_classifiable(name, datatypes.of_array(array))
            array = classification.top_k(array, k, batched=self.max_batch_size > 0, labels=labels.get(name, ()))
        return OutputTensor(name, datatypes.of_array(array), array)

    async def _run_step(self, step: Step, member: ModelVersion, tensors: Tensors, request: InferenceRequest) -> Tensors:
        sub = InferenceRequest(
            member.name,
            str(member.version),
            [InputTensor(key, datatypes.of_array(array), array) for key, array in tensors.items()],
            [RequestedOutput(key) for key in step.outputs],
            id=request.id,
            parameters={key: request.parameters[key] for key in PASSED_PARAMETERS if key in request.parameters},
        )
        started = time.monotonic_ns()
        try:
            response = await member.infer(sub)
        except BaseException as exc:
            member.stats.record_request(False, time.monotonic_ns() - started, failure_reason(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
            message = exc.message if isinstance(exc, ServerError) else str(exc)
            where = f"ensemble {self.name!r} {step.label}: {message}"
            if isinstance(exc, ServerError):
                raise type(exc)(where, retry_after_s=exc.retry_after_s) from exc
            raise InternalError(where) from exc
        member.stats.record_request(True, time.monotonic_ns() - started)
        return {output.name: output.array for output in response.outputs}


def build_ensemble(
    name: str,
    version: int,
    loaded: LoadedConfig,
    members: dict[str, MemberTensors],
    lookup: Lookup,
    stats: ModelStats | None = None,
) -> EnsembleVersion:
    """A served ensemble version from its checked config; LoadFailed names what is wrong."""
    config = named_copy(loaded, name)
    if not config.input:
        raise LoadFailed(f"ensemble {name!r}: the config lists no input")
    check_batch_sizes(config)
    steps = parse_steps(name, config)
    check_plan(name, config, steps, members)
    check_types(name, config, steps, _signatures(name, steps, lookup))
    stats = stats or ModelStats()
    batcher = Batcher(name, [], max_batch_size=int(config.max_batch_size), max_queue_size=0, stats=stats)
    return EnsembleVersion(
        name=name,
        version=version,
        config=config,
        inputs=tensor_specs(config, inputs=True),
        outputs=tensor_specs(config, inputs=False),
        backends=[],
        batcher=batcher,
        stats=stats,
        report=_report(steps),
        steps=steps,
        lookup=lookup,
    )


def _signatures(name: str, steps: list[Step], lookup: Lookup) -> dict[int, MemberSignature]:
    """Each step's member signature, from the version that serves it now (loaded before the ensemble)."""
    found: dict[int, MemberSignature] = {}
    for step in steps:
        try:
            found[step.index] = MemberSignature.of(lookup(step.model_name, step.model_version))
        except ServerError as exc:
            raise LoadFailed(f"ensemble {name!r}: {step.label}: {exc.message}") from exc
    return found


def _report(steps: list[Step]) -> dict[str, object]:
    """The ensemble's optimization report: nothing of its own to optimize; ``members`` names each step's model,
    whose own report (``/v2/models/<member>/optimization``) says what the optimizer did with it."""
    members = [{"step": s.index, "model": s.model_name, "version": s.model_version or "latest"} for s in steps]
    summary = "an ensemble: each member is optimized on its own; see the members' reports"
    return {
        "platform": ENSEMBLE,
        "steps": [],
        "members": members,
        "selected": "original",
        "summary": summary,
        "phase": "original",
        "step": "",
    }
