"""Ensemble config validation (errors name the step), tensor types checked against the members at load, the
DAG executor, and what a request carries to the members (priority, timeout) and back (labels), with
recording members."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from google.protobuf import text_format

from server.errors import InvalidInput, LoadFailed
from server.models.ensemble import (
    EnsembleVersion,
    MemberTensors,
    Step,
    build_ensemble,
    check_plan,
    execute,
    parse_steps,
)
from server.models.stats import ModelStats
from server.protocol import datatypes
from server.protocol.inference import (
    InferenceRequest,
    InferenceResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
)
from server.protocol.validation import TensorSpec
from server.repository.config import ModelConfig, parse_config

CHAIN_AND_BRANCH = """
platform: "ensemble"
max_batch_size: 8
input [ { name: "IN" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] }, { name: "B" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling {
  step [
    { model_name: "pre" model_version: -1 input_map { key: "x" value: "IN" } output_map { key: "y" value: "mid" } },
    { model_name: "left" model_version: -1 input_map { key: "x" value: "mid" } output_map { key: "y" value: "A" } },
    { model_name: "right" model_version: 1 input_map { key: "x" value: "mid" } output_map { key: "y" value: "B" } }
  ]
}
"""
MEMBERS = {n: MemberTensors(frozenset({"x"}), frozenset({"y"})) for n in ("pre", "left", "right")}


def config(text: str = CHAIN_AND_BRANCH) -> ModelConfig:
    return text_format.Parse(text, ModelConfig())


def check(cfg: ModelConfig, members: dict[str, MemberTensors] = MEMBERS) -> None:
    check_plan("ens", cfg, parse_steps("ens", cfg), members)


def test_valid_plan_passes_and_versions_parse() -> None:
    cfg = config()
    check(cfg)
    steps = parse_steps("ens", cfg)
    assert [s.model_version for s in steps] == ["", "", "1"]


def test_missing_member_names_the_step() -> None:
    with pytest.raises(LoadFailed, match=r"step 1 \(model 'left'\): the model is not in the repository"):
        check(config(), {k: v for k, v in MEMBERS.items() if k != "left"})


def test_bad_input_map_key_names_the_step() -> None:
    cfg = config(
        CHAIN_AND_BRANCH.replace(
            'input_map { key: "x" value: "mid" } output_map { key: "y" value: "A" }',
            'input_map { key: "z" value: "mid" } output_map { key: "y" value: "A" }',
        )
    )
    with pytest.raises(LoadFailed, match=r"step 1 \(model 'left'\): input_map key 'z' is not an input"):
        check(cfg)


def test_bad_output_map_key_names_the_step() -> None:
    cfg = config(CHAIN_AND_BRANCH.replace('output_map { key: "y" value: "B" }', 'output_map { key: "w" value: "B" }'))
    with pytest.raises(LoadFailed, match=r"step 2 \(model 'right'\): output_map key 'w' is not an output"):
        check(cfg)


def test_unknown_ensemble_tensor_and_unproduced_output() -> None:
    cfg = config(CHAIN_AND_BRANCH.replace('key: "x" value: "IN"', 'key: "x" value: "NOPE"'))
    with pytest.raises(LoadFailed, match=r"step 0 \(model 'pre'\): input 'NOPE' is neither"):
        check(cfg)
    cfg = config(CHAIN_AND_BRANCH.replace('value: "B"', 'value: "C"'))
    with pytest.raises(LoadFailed, match="ensemble output 'B' is not produced"):
        check(cfg)


def test_cycle_is_refused() -> None:
    cyclic = CHAIN_AND_BRANCH.replace('key: "x" value: "IN"', 'key: "x" value: "loop"').replace(
        'input_map { key: "x" value: "mid" } output_map { key: "y" value: "A" }',
        'input_map { key: "x" value: "mid" } output_map { key: "y" value: "loop" }',
    )
    cyclic = cyclic.replace('output [ { name: "A" data_type: TYPE_FP32 dims: [ 4 ] }, ', "output [ ")
    with pytest.raises(LoadFailed, match="a cycle"):
        check(config(cyclic))


def test_self_reference_is_refused() -> None:
    with pytest.raises(LoadFailed, match="names the ensemble itself"):
        parse_steps("pre", config())


def steps() -> list[Step]:
    cfg = config()
    return parse_steps("ens", cfg)


def test_executor_runs_the_dag_and_branches_concurrently() -> None:
    running: set[str] = set()
    overlap: list[set[str]] = []
    factor = {"pre": 2.0, "left": 3.0, "right": 5.0}

    async def run(step: Step, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        running.add(step.model_name)
        await asyncio.sleep(0.01)
        overlap.append(set(running))
        running.discard(step.model_name)
        return {"y": tensors["x"] * factor[step.model_name]}

    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    out = asyncio.run(execute(steps(), {"IN": x}, run))
    np.testing.assert_array_equal(out["A"], x * 6)
    np.testing.assert_array_equal(out["B"], x * 10)
    assert {"left", "right"} in overlap  # the two branches ran at the same time


def test_executor_failure_cancels_the_rest_and_propagates() -> None:
    cancelled: list[str] = []

    async def run(step: Step, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if step.model_name == "left":
            raise InvalidInput("boom")
        try:
            await asyncio.sleep(0 if step.model_name == "pre" else 5)
        except asyncio.CancelledError:
            cancelled.append(step.model_name)
            raise
        return {"y": tensors["x"]}

    with pytest.raises(InvalidInput, match="boom"):
        asyncio.run(execute(steps(), {"IN": np.zeros((1, 4), np.float32)}, run))
    assert cancelled == ["right"]


# ---- types at load, parameters and labels at run time (members: real specs, a recording infer) -------------
class Member:
    """A member version as the ensemble sees it: declared tensors, labels, statistics and ``infer``; records
    the requests it gets and answers ``y = 2 * x`` (scores for classification)."""

    def __init__(self, name: str, dims: tuple[int, ...] = (4,), datatype: str = "FP32", batch: int = 8) -> None:
        self.name, self.version = name, 1
        self.inputs = [TensorSpec("x", datatypes.BY_NAME[datatype], dims)]
        self.outputs = [TensorSpec("y", datatypes.BY_NAME["FP32"], dims)]
        self.max_batch_size = batch
        self.labels = {"y": (b"a", b"b", b"c", b"d")}
        self.stats = ModelStats()
        self.requests: list[InferenceRequest] = []

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        self.requests.append(request)
        array = request.inputs[0].array * 2
        return InferenceResponse(self.name, "1", [OutputTensor("y", datatypes.of_array(array), array)])


def build(members: dict[str, Member], text: str = CHAIN_AND_BRANCH) -> EnsembleVersion:
    loaded = parse_config(text, "pbtxt")
    names = {n: MemberTensors(frozenset({"x"}), frozenset({"y"})) for n in members}
    return build_ensemble("ens", 1, loaded, names, lambda name, version: members[name])  # type: ignore[arg-type,return-value]


def test_matching_types_load() -> None:
    build({n: Member(n) for n in ("pre", "left", "right")})


def test_a_datatype_mismatch_names_the_step() -> None:
    members = {n: Member(n) for n in ("pre", "left", "right")}
    members["left"] = Member("left", datatype="INT64")
    with pytest.raises(LoadFailed, match=r"step 1 \(model 'left'\): input 'x' takes INT64 \[-1, 4\].*'mid' is FP32"):
        build(members)


def test_a_shape_mismatch_names_the_step_and_unbatched_members_fit_batched_tensors() -> None:
    members = {n: Member(n) for n in ("pre", "left", "right")}
    members["right"] = Member("right", dims=(5,))
    with pytest.raises(LoadFailed, match=r"step 2 \(model 'right'\): input 'x' takes FP32 \[-1, 5\]"):
        build(members)
    members["right"] = Member("right", dims=(-1, 4), batch=0)  # [-1, 4] without a batch dim: the same tensor
    build(members)


def test_an_ensemble_output_that_disagrees_with_its_producer_is_refused() -> None:
    text = CHAIN_AND_BRANCH.replace('{ name: "B" data_type: TYPE_FP32', '{ name: "B" data_type: TYPE_FP16')
    with pytest.raises(LoadFailed, match="ensemble output 'B' is declared FP16"):
        build({n: Member(n) for n in ("pre", "left", "right")}, text)


def test_priority_and_timeout_reach_every_member_and_labels_come_from_the_producer() -> None:
    members = {n: Member(n) for n in ("pre", "left", "right")}
    ensemble = build(members)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = InferenceRequest(
        "ens",
        "",
        [InputTensor("IN", datatypes.BY_NAME["FP32"], x)],
        [RequestedOutput("A", classification=2), RequestedOutput("B")],
        parameters={"priority": 2, "timeout": 5000, "binary_data_output": True},
    )
    response = asyncio.run(ensemble.infer(request))
    for member in members.values():
        assert [r.parameters for r in member.requests] == [{"priority": 2, "timeout": 5000}]
    outputs = {o.name: o.array for o in response.outputs}
    np.testing.assert_array_equal(outputs["B"], x * 4)
    assert outputs["A"].tolist() == [[b"12.000000:3:d", b"8.000000:2:c"], [b"28.000000:3:d", b"24.000000:2:c"]]
    assert ensemble.stats.to_json("ens", "1")["inference_stats"]["queue"]["count"] == 1


def test_a_bad_priority_is_the_clients_error_before_any_step() -> None:
    members = {n: Member(n) for n in ("pre", "left", "right")}
    request = InferenceRequest(
        "ens",
        "",
        [InputTensor("IN", datatypes.BY_NAME["FP32"], np.zeros((1, 4), np.float32))],
        parameters={"priority": -1},
    )
    with pytest.raises(InvalidInput, match=r"parameters\.priority"):
        asyncio.run(build(members).infer(request))
    assert not any(member.requests for member in members.values())
