"""Triton's model_warmup (server.models.warmup, server.repository.config.check_warmup): entries checked when
the config is parsed and completed, naming the field; zero, random and file data in Triton's shapes; count
repeats; every instance runs every entry; a failing entry fails the load naming it; without model_warmup one
default batch of zeros runs (dynamic dims searched when 1 does not run), and its failure only warns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.backends.base import Backend, Tensors
from server.backends.onnxruntime import OnnxRuntimeBackend, SessionConfig
from server.errors import LoadFailed, ServerError
from server.models.warmup import DEFAULT_SIZES, default_sample, warm_up, warmup_samples
from server.repository.config import (
    MAX_WARMUP_COUNT,
    MAX_WARMUP_ELEMENTS,
    LoadedConfig,
    ModelConfig,
    complete_config,
    parse_config,
)
from server.repository.layout import Repository
from tests.models import fixtures

MLP_INPUT = {"name": "x", "data_type": "TYPE_FP32", "dims": [8]}


def _entry(**inputs: dict[str, Any]) -> dict[str, Any]:
    return {"name": "sample", "batch_size": 2, "inputs": inputs}


def _value(**fields: Any) -> dict[str, Any]:
    return {"data_type": "TYPE_FP32", "dims": [8], **fields}


def _parse(data: dict[str, Any]) -> LoadedConfig:
    return parse_config(json.dumps(data), "json")


def _completed(data: dict[str, Any], model: Any = None) -> ModelConfig:
    loaded = _parse(data)
    return complete_config(loaded, "m", model if model is not None else fixtures.float_mlp(), 8)


class Recorder(Backend):
    """A fake instance that records every run (and fails when told to)."""

    def __init__(self, name: str, fail: bool = False) -> None:
        super().__init__(name)
        self.runs: list[Tensors] = []
        self.attempts = 0
        self.fail = fail
        self.load()

    def load_impl(self) -> None:
        return None

    def infer_impl(self, inputs: Tensors) -> Tensors:
        self.attempts += 1
        if self.fail:
            raise RuntimeError("kernel exploded")
        self.runs.append(inputs)
        return {}

    def unload_impl(self) -> None:
        return None


@pytest.fixture
def repo(tmp_path: Path) -> tuple[Repository, Path]:
    model_dir = tmp_path / "m"
    (model_dir / "warmup").mkdir(parents=True)
    return Repository(tmp_path), model_dir


# ---- checks at parse and completion, naming the field ---------------------------------------------------------
BAD = [
    ({"input": [MLP_INPUT], "model_warmup": [_entry(z=_value(zero_data=True))]}, r"inputs\['z'\]: not an input"),
    ({"input": [MLP_INPUT], "model_warmup": [_entry(x=_value(data_type="TYPE_INT64", zero_data=True))]}, "data_type"),
    (
        {"max_batch_size": 1, "model_warmup": [_entry(x=_value(zero_data=True))]},
        r"model_warmup\[0\] \('sample'\).batch",
    ),
    ({"model_warmup": [_entry(x=_value())]}, "exactly one of zero_data, random_data or input_data_file"),
    ({"model_warmup": [_entry(x={"dims": [8], "zero_data": True})]}, r"inputs\['x'\].data_type: missing"),
    ({"model_warmup": [{**_entry(x=_value(zero_data=True)), "count": MAX_WARMUP_COUNT + 1}]}, r"\.count"),
    ({"model_warmup": [_entry(x=_value(dims=[-1], zero_data=True))]}, r"inputs\['x'\].dims"),
    ({"input": [MLP_INPUT], "model_warmup": [_entry(x=_value(dims=[4], zero_data=True))]}, "do not fit"),
    ({"input": [MLP_INPUT], "model_warmup": [_entry(x=_value(dims=[8, 1], zero_data=True))]}, "do not fit"),
    ({"model_warmup": [{"name": "empty", "batch_size": 1}]}, r"\('empty'\).inputs: no inputs"),
    (
        {"model_warmup": [_entry(x=_value(dims=[MAX_WARMUP_ELEMENTS // 2 + 1], zero_data=True))]},
        f"more than {MAX_WARMUP_ELEMENTS} elements",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_entries_fail_the_parse_naming_the_field(data: dict[str, Any], message: str) -> None:
    with pytest.raises(LoadFailed, match=message):
        _parse(data)


def test_a_pbtxt_config_parses_with_warmup() -> None:
    text = """
max_batch_size: 4
model_warmup [ { name: "w" batch_size: 4 count: 3
  inputs { key: "x" value: { data_type: TYPE_FP32 dims: [ 8 ] random_data: true } } } ]
"""
    loaded = parse_config(text, "pbtxt")
    assert loaded.config.model_warmup[0].count == 3


def test_completion_checks_against_the_graph() -> None:
    with pytest.raises(LoadFailed, match=r"inputs\['x'\].data_type: TYPE_INT64 does not match"):
        _completed({"model_warmup": [_entry(x=_value(data_type="TYPE_INT64", zero_data=True))]})
    with pytest.raises(LoadFailed, match=r"batch_size: 2 must be 1 \(max_batch_size 0: no batch dimension\)"):
        _completed({"max_batch_size": 0, "model_warmup": [_entry(x=_value(dims=[3, 8], zero_data=True))]})
    with pytest.raises(LoadFailed, match=r"inputs: the model's inputs \['b'\] have no warmup data"):
        _completed({"model_warmup": [_entry(a=_value(dims=[3], zero_data=True))]}, fixtures.multi_io())
    with pytest.raises(LoadFailed, match=r"batch_size: 9 is outside 1..max_batch_size \(8\)"):
        _completed({"model_warmup": [{**_entry(x=_value(zero_data=True)), "batch_size": 9}]})


# ---- data ------------------------------------------------------------------------------------------------------
def test_zero_random_and_file_data_in_triton_shapes(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    sample = np.arange(8, dtype=np.float32)
    (model_dir / "warmup" / "x.bin").write_bytes(sample.tobytes() + b"extra bytes are ignored")
    config = _completed(
        {
            "model_warmup": [
                _entry(x=_value(zero_data=True)),
                {"name": "rand", "batch_size": 3, "inputs": {"x": _value(random_data=True)}},
                {"name": "file", "batch_size": 1, "count": 2, "inputs": {"x": _value(input_data_file="x.bin")}},
            ]
        }
    )
    zero, rand, file = warmup_samples(config, model_dir, repository)
    assert zero.inputs["x"].shape == (2, 8) and not zero.inputs["x"].any() and zero.count == 1
    assert rand.inputs["x"].shape == (3, 8) and rand.inputs["x"].dtype == np.float32
    assert ((rand.inputs["x"] >= 0) & (rand.inputs["x"] < 1)).all()
    assert np.array_equal(rand.inputs["x"][0], rand.inputs["x"][2])  # batch_size copies of one sample
    np.testing.assert_array_equal(file.inputs["x"], sample[np.newaxis])
    assert file.count == 2


def test_bytes_elements_from_a_file(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    data = b"".join(len(s).to_bytes(4, "little") + s for s in (b"hello", b""))
    (model_dir / "warmup" / "text.bin").write_bytes(data)
    value = {"data_type": "TYPE_STRING", "dims": [2], "input_data_file": "text.bin"}
    config = _completed({"model_warmup": [_entry(text=value)]}, fixtures.strings())
    (sample,) = warmup_samples(config, model_dir, repository)
    assert sample.inputs["text"].tolist() == [[b"hello", b""]] * 2
    (model_dir / "warmup" / "text.bin").write_bytes(data[:-1])
    with pytest.raises(LoadFailed, match=r"text.bin\): ends inside element 1"):
        warmup_samples(config, model_dir, repository)


def test_a_short_file_fails_naming_the_entry_and_the_file(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    (model_dir / "warmup" / "x.bin").write_bytes(b"\0" * 31)
    config = _completed({"model_warmup": [_entry(x=_value(input_data_file="x.bin"))]})
    with pytest.raises(
        LoadFailed,
        match=r"model_warmup\[0\] \('sample'\).inputs\['x'\].input_data_file: "
        r"warmup/x.bin has 31 bytes, one sample of FP32 \[8\] needs 32",
    ):
        warm_up([Recorder("m:1#0")], config, model_dir, repository)
    (model_dir / "warmup" / "x.bin").unlink()
    with pytest.raises(LoadFailed, match=r"warmup/x\.bin is not a file"):
        warm_up([Recorder("m:1#0")], config, model_dir, repository)


def test_a_data_file_linking_out_of_the_repository_is_refused(repo: tuple[Repository, Path], tmp_path: Path) -> None:
    repository, model_dir = repo
    outside = tmp_path.parent / f"{tmp_path.name}-outside.bin"
    outside.write_bytes(b"\0" * 32)
    (model_dir / "warmup" / "x.bin").symlink_to(outside)
    config = _completed({"model_warmup": [_entry(x=_value(input_data_file="x.bin"))]})
    with pytest.raises(ServerError, match="outside the model repository"):
        warm_up([Recorder("m:1#0")], config, model_dir, repository)


# ---- running ---------------------------------------------------------------------------------------------------
def test_every_instance_runs_every_entry_count_times(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    config = _completed(
        {
            "model_warmup": [
                {**_entry(x=_value(zero_data=True)), "count": 3},
                {"name": "one", "batch_size": 8, "inputs": {"x": _value(random_data=True)}},
            ]
        }
    )
    backends = [Recorder(f"m:1#{i}") for i in range(3)]
    report = warm_up(backends, config, model_dir, repository)
    for backend in backends:
        assert [run["x"].shape for run in backend.runs] == [(2, 8)] * 3 + [(8, 8)]
    assert report["source"] == "model_warmup" and report["duration_s"] >= 0
    assert [(e["name"], e["batch_size"], e["count"], e["instances"]) for e in report["entries"]] == [
        ("sample", 2, 3, 3),
        ("one", 8, 1, 3),
    ]
    json.dumps(report)


def test_a_failing_entry_fails_the_load_naming_it(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    config = _completed({"model_warmup": [_entry(x=_value(zero_data=True))]})
    with pytest.raises(
        LoadFailed,
        match=r"model 'm' version 3: model_warmup\[0\] \('sample'\) failed on instance "
        r"m:3#1: kernel exploded",
    ):
        warm_up(
            [Recorder("m:3#0"), Recorder("m:3#1", fail=True)],
            config,
            model_dir,
            repository,
            label="model 'm' version 3",
        )


def test_without_model_warmup_one_default_batch_of_zeros_runs(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    config = _completed({}, fixtures.dynamic_seq())  # tokens [batch, -1]
    backends = [Recorder("m:1#0"), Recorder("m:1#1")]
    report = warm_up(backends, config, model_dir, repository)
    for backend in backends:
        (run,) = backend.runs
        assert run["tokens"].shape == (1, 1) and not run["tokens"].any()
    assert report["source"] == "default" and report["entries"][0]["instances"] == 2 and "skipped" not in report
    assert default_sample(_completed({"max_batch_size": 0}, fixtures.no_batch())).inputs["x"].shape == (2, 3)


def test_a_failing_default_warmup_only_warns(repo: tuple[Repository, Path], caplog: pytest.LogCaptureFixture) -> None:
    repository, model_dir = repo
    report = warm_up([Recorder("m:1#0", fail=True)], _completed({}), model_dir, repository)
    assert report["source"] == "default" and report["entries"] == []
    assert "kernel exploded" in report["skipped"]
    assert "default warmup skipped" in caplog.text
    assert "no inputs" in warm_up([Recorder("m:1#0")], ModelConfig(), model_dir, repository)["skipped"]


def test_the_default_warmup_searches_dynamic_dims_that_run(
    repo: tuple[Repository, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A YOLO-shaped detector runs only with height and width multiples of 32: dims as 1 (and 8) fail in a neck
    Concat, so the default warmup goes on to 32 on the first instance, then warms the other with it. The failed
    tries print nothing: onnxruntime's own error line for them would look like a broken load on stderr."""
    from tests.unit.optimizers import models

    repository, model_dir = repo
    detector = models.yolo_detector()
    path = fixtures.write_model(tmp_path, "d", detector) / "model.onnx"
    backends: list[Backend] = [OnnxRuntimeBackend(f"d:1#{i}", path, SessionConfig()) for i in range(2)]
    for backend in backends:
        backend.load()
    try:
        config = _completed({}, detector)
        assert [int(d) for d in config.input[0].dims] == [3, -1, -1]
        report = warm_up(backends, config, model_dir, repository)
        (entry,) = report["entries"]
        assert "skipped" not in report and entry["instances"] == 2
        assert entry["name"] == "default, dynamic dims=32" and DEFAULT_SIZES[:3] == (1, 8, 32)
        assert "[E:onnxruntime" not in capfd.readouterr().err
    finally:
        for backend in backends:
            backend.unload()


def test_only_dynamic_dims_are_searched(repo: tuple[Repository, Path]) -> None:
    repository, model_dir = repo
    fixed = Recorder("m:1#0", fail=True)
    report = warm_up([fixed], _completed({}), model_dir, repository)  # the MLP: x [batch, 8], nothing to search
    assert "kernel exploded" in report["skipped"] and fixed.attempts == 1
    dynamic = Recorder("m:1#0", fail=True)
    report = warm_up([dynamic], _completed({}, fixtures.dynamic_seq()), model_dir, repository)  # tokens [batch, -1]
    assert "kernel exploded" in report["skipped"] and dynamic.attempts == len(DEFAULT_SIZES)


def test_real_sessions_warm_up(repo: tuple[Repository, Path], tmp_path: Path) -> None:
    repository, model_dir = repo
    path = fixtures.write_model(tmp_path, "m", fixtures.float_mlp()) / "model.onnx"
    backends: list[Backend] = [OnnxRuntimeBackend(f"m:1#{i}", path, SessionConfig()) for i in range(2)]
    for backend in backends:
        backend.load()
    try:
        (model_dir / "warmup" / "x.bin").write_bytes(np.ones(8, np.float32).tobytes())
        config = _completed({"model_warmup": [_entry(x=_value(input_data_file="x.bin"))]})
        assert warm_up(backends, config, model_dir, repository)["entries"][0]["instances"] == 2
        narrow = fixtures.write_model(tmp_path, "n", fixtures.float_mlp(features=4)) / "model.onnx"
        backends.append(OnnxRuntimeBackend("m:1#2", narrow, SessionConfig()))
        backends[-1].load()  # a session that takes 4 features, not the config's 8: onnxruntime refuses the run
        with pytest.raises(LoadFailed, match=r"model_warmup\[0\] \('sample'\) failed on instance m:1#2"):
            warm_up(backends, config, model_dir, repository)
    finally:
        for backend in backends:
            backend.unload()
