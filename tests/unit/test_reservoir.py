"""The request-sample reservoir: bounded by count and bytes, uniform over everything offered, rows split along
the batch dim and copied; the traffic policy's opt-outs and its bounded wait; the file the optimizer reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from optimizers import OptimizeOptions, OptionsError
from optimizers.modelinfo import analyze
from optimizers.reference import build_reference
from server.models.loader import PendingOptimization
from server.models.reservoir import Reservoir, ReservoirLimits, unsupported, write_samples
from server.models.traffic import TrafficSampling
from server.protocol.datatypes import BY_NAME
from server.protocol.validation import TensorSpec
from server.repository.config import ModelConfig
from server.settings import Settings
from tests.models import fixtures

FP32_X = [TensorSpec("x", BY_NAME["FP32"], (8,))]


def _rows(start: int, count: int, features: int = 8) -> np.ndarray:
    """Rows whose every value is the row's index, so a kept row tells which one it was."""
    return np.repeat(np.arange(start, start + count, dtype=np.float32)[:, None], features, axis=1)


def _feed(reservoir: Reservoir, total: int, batch: int = 4) -> None:
    for start in range(0, total, batch):
        rows = _rows(start, min(batch, total - start))
        reservoir.offer({"x": rows}, len(rows))


def test_keeps_at_most_max_samples_of_everything_offered() -> None:
    reservoir = Reservoir(["x"], True, ReservoirLimits(max_samples=50, max_bytes=1 << 20), seed=1)
    _feed(reservoir, 1000)
    assert (reservoir.count, reservoir.seen, reservoir.capacity) == (50, 1000, 50)
    kept = reservoir.take()["x"]
    assert kept.shape == (50, 8)
    indices = kept[:, 0].astype(int)
    assert len(set(indices)) == 50 and indices.max() < 1000
    assert all((kept[i] == indices[i]).all() for i in range(50))  # whole rows, never mixed


def test_the_byte_cap_lowers_the_count_and_an_oversized_sample_keeps_nothing() -> None:
    row_bytes = 8 * 4
    capped = Reservoir(["x"], True, ReservoirLimits(max_samples=256, max_bytes=10 * row_bytes + 5), seed=0)
    _feed(capped, 100)
    assert capped.capacity == 10 and capped.count == 10 and capped.nbytes == 10 * row_bytes
    tiny = Reservoir(["x"], True, ReservoirLimits(max_samples=256, max_bytes=row_bytes - 1), seed=0)
    _feed(tiny, 20)
    assert tiny.count == 0 and "over the" in tiny.reason and tiny.take() == {}


def test_sampling_is_uniform_over_the_whole_stream() -> None:
    """Over many seeds every tenth of a 1000-row stream is kept about as often (10% each): early rows are not
    favoured (the reservoir filled with them) and late ones not either."""
    counts = np.zeros(10)
    for seed in range(200):
        reservoir = Reservoir(["x"], True, ReservoirLimits(max_samples=100, max_bytes=1 << 20), seed=seed)
        _feed(reservoir, 1000, batch=7)
        counts += np.bincount(reservoir.take()["x"][:, 0].astype(int) // 100, minlength=10)
    shares = counts / counts.sum()
    assert counts.sum() == 200 * 100
    assert np.abs(shares - 0.1).max() < 0.01, shares


def test_while_filling_every_row_is_kept() -> None:
    reservoir = Reservoir(["x"], True, ReservoirLimits(max_samples=64, max_bytes=1 << 20), seed=0)
    _feed(reservoir, 30, batch=4)
    assert sorted(reservoir.take()["x"][:, 0].astype(int)) == list(range(30))


def test_unbatched_requests_are_one_sample_each_and_other_shapes_are_skipped() -> None:
    reservoir = Reservoir(["a", "b"], False, ReservoirLimits(max_samples=10, max_bytes=1 << 20), seed=0)
    for i in range(3):
        reservoir.offer({"a": np.full((2, 3), i, np.float32), "b": np.full((5,), i, np.int64)}, 1)
    reservoir.offer({"a": np.zeros((4, 3), np.float32), "b": np.zeros((5,), np.int64)}, 1)  # another shape
    assert (reservoir.count, reservoir.seen, reservoir.skipped) == (3, 3, 1)
    arrays = reservoir.take()
    assert arrays["a"].shape == (3, 2, 3) and arrays["b"].shape == (3, 5) and arrays["b"].dtype == np.int64


def test_rows_are_copies_and_take_ends_sampling() -> None:
    reservoir = Reservoir(["x"], True, ReservoirLimits(max_samples=4, max_bytes=1 << 20), seed=0)
    body = _rows(0, 2)
    reservoir.offer({"x": body}, 2)
    body[:] = -1  # the request's buffer is reused after it is answered
    assert reservoir.take()["x"].min() == 0
    reservoir.offer({"x": _rows(0, 2)}, 2)
    assert reservoir.count == 0 and reservoir.skipped == 2


def test_only_numeric_inputs_are_sampled() -> None:
    assert unsupported(FP32_X) is None
    text = [*FP32_X, TensorSpec("text", BY_NAME["BYTES"], (1,))]
    assert unsupported(text) == "input 'text' is BYTES: only fixed-size numeric inputs are sampled"
    assert unsupported([TensorSpec("h", BY_NAME["BF16"], (4,))]) is not None


def test_the_samples_file_is_the_optimizers_traffic_reference(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(fixtures.float_mlp().SerializeToString())
    reservoir = Reservoir(["x"], True, ReservoirLimits(max_samples=20, max_bytes=1 << 20), seed=0)
    _feed(reservoir, 50)
    path = write_samples(reservoir.take(), tmp_path / "traffic", "mlp-1-abc")
    assert path.name == "mlp-1-abc.traffic.npz" and not list(path.parent.glob("*.tmp"))
    reference = build_reference(analyze(model), path, 32, batch_dim=True)
    assert reference.summary()["source"] == "traffic" and reference.count == 20
    assert reference.summary()["note"] == "20 samples of the version's real requests"
    assert sum(len(batch["x"]) for batch in reference.batches) == 20


def test_unbatched_samples_reach_the_optimizer_one_whole_input_each(tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(fixtures.no_batch().SerializeToString())
    reservoir = Reservoir(["x"], False, ReservoirLimits(max_samples=8, max_bytes=1 << 20), seed=0)
    for i in range(5):
        reservoir.offer({"x": np.full((2, 3), i, np.float32)}, 1)
    reference = build_reference(analyze(model), write_samples(reservoir.take(), tmp_path, "nb-1-x"), 32, False)
    assert reference.source == "traffic" and reference.count == 5
    assert [batch["x"].shape for batch in reference.batches] == [(2, 3)] * 5


def test_optimize_block_opt_out_is_validated() -> None:
    assert OptimizeOptions.from_config_dict({"from_traffic": False}).from_traffic is False
    assert OptimizeOptions.from_config_dict(None).from_traffic is True
    with pytest.raises(OptionsError, match=r"optimize\.from_traffic"):
        OptimizeOptions.from_config_dict({"from_traffic": "sometimes"})
    assert "from_traffic" not in OptimizeOptions().cache_dict()  # keys of results cached before it stay valid
    assert OptimizeOptions(from_traffic=False).cache_dict()["from_traffic"] is False  # never a traffic result


def _version(tmp_path: Path, specs: list[TensorSpec] | None = None, **options: Any) -> tuple[Any, Any]:
    """A served version and its pending optimization, as far as the traffic policy looks at them."""
    model = tmp_path / "1" / "model.onnx"
    model.parent.mkdir(parents=True, exist_ok=True)
    model.write_bytes(fixtures.float_mlp().SerializeToString())
    served = SimpleNamespace(name="mlp", version=1, inputs=specs or FP32_X, max_batch_size=8, reservoir=None)
    return served, PendingOptimization("mlp", 1, model, OptimizeOptions(**options), ModelConfig(), [])


def _settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(cache_dir=tmp_path / "cache", **values)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("server_off", "off for every model (--no-optimize-from-traffic)"),
        ("model_off", "off for this model (optimize.from_traffic: false)"),
        ("user_samples", "the user's samples file beside the model is the reference"),
        ("bytes_input", "input 'text' is BYTES: only fixed-size numeric inputs are sampled"),
    ],
)
def test_opt_outs_leave_the_version_unsampled(tmp_path: Path, case: str, reason: str) -> None:
    specs = [TensorSpec("text", BY_NAME["BYTES"], (1,))] if case == "bytes_input" else None
    served, source = _version(tmp_path, specs, from_traffic=case != "model_off")
    if case == "user_samples":
        np.savez(source.model_path.parent / "samples.npz", x=_rows(0, 4))
    sampling = TrafficSampling(_settings(tmp_path, optimize_from_traffic=case != "server_off"))
    sampling.attach(served, source)
    assert served.reservoir is None
    samples = asyncio.run(sampling.collect(served, source, 0.0, lambda _step: None))
    assert samples.path is None and samples.facts == {"used": False, "reason": reason}


def test_collect_waits_for_the_minimum_then_writes_the_file_until_discarded(tmp_path: Path) -> None:
    served, source = _version(tmp_path)
    sampling = TrafficSampling(_settings(tmp_path, optimize_traffic_min_samples=12))
    sampling.attach(served, source)
    assert served.reservoir is not None
    steps: list[str] = []

    async def scenario() -> Any:
        waiting = asyncio.create_task(sampling.collect(served, source, time.monotonic() + 30, steps.append))
        for start in range(0, 16, 4):  # requests arrive while the optimizer waits
            await asyncio.sleep(0.15)
            if served.reservoir is not None:  # as ModelVersion.infer offers them
                served.reservoir.offer({"x": _rows(start, 4)}, 4)
        return await waiting

    samples = asyncio.run(scenario())
    assert served.reservoir is None  # sampling stopped
    assert samples.facts["used"] is True and samples.facts["samples"] >= 12
    assert steps[0] == "waiting for request samples (0/12)"
    assert samples.path is not None and samples.path.parent == tmp_path / "cache" / "traffic"
    with np.load(samples.path) as data:
        assert data["x"].shape == (samples.facts["samples"], 8)
    pending = samples.source_for(source)
    assert pending.options.samples_path == samples.path and pending.options.precision == source.options.precision
    samples.discard()
    assert not list((tmp_path / "cache" / "traffic").iterdir())


def test_too_few_samples_by_the_deadline_fall_back_to_generated_inputs(tmp_path: Path) -> None:
    served, source = _version(tmp_path)
    sampling = TrafficSampling(_settings(tmp_path, optimize_traffic_min_samples=32, optimize_traffic_wait_s=0.3))
    sampling.attach(served, source)
    served.reservoir.offer({"x": _rows(0, 5)}, 5)

    async def scenario() -> Any:
        return await sampling.collect(served, source, time.monotonic() + 0.3, lambda _s: None)

    samples = asyncio.run(scenario())
    assert samples.path is None and samples.facts["used"] is False and samples.facts["samples"] == 5
    assert samples.facts["reason"] == (
        "5 of 32 request samples within 0.3 s (--optimize-traffic-wait-s): generated inputs instead"
    )


def test_a_cache_folder_that_cannot_be_written_falls_back_to_generated_inputs(tmp_path: Path) -> None:
    served, source = _version(tmp_path)
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    sampling = TrafficSampling(_settings(tmp_path, optimize_traffic_min_samples=4))
    sampling.attach(served, source)
    served.reservoir.offer({"x": _rows(0, 4)}, 4)
    samples = asyncio.run(sampling.collect(served, source, time.monotonic() + 5, lambda _s: None))
    assert samples.path is None and samples.facts["used"] is False and samples.facts["samples"] == 4
    assert samples.facts["reason"].startswith(f"not written to {tmp_path / 'cache' / 'traffic'}: ")
