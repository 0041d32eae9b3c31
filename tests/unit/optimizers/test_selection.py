"""Selection: the measured-fastest survivor wins, a slower one never does, and the original stays unless beaten."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from optimizers import OptimizeOptions, Pipeline
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.runtime import Feed, SessionSpec
from optimizers.selection import select_fastest
from optimizers.timing import Latencies
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import fake_device


def test_fastest_eligible_candidate_wins() -> None:
    verdict = select_fastest({8: 10.0}, {"a": {8: 6.0}, "b": {8: 4.0}, "c": {8: 12.0}}, batch=8, min_gain=0.05)
    assert verdict.winner == "b"
    assert verdict.reasons["b"].startswith("fastest: 4.000 ms vs original 10.000 ms at batch 8 (2.50x)")
    assert "slower than b" in verdict.reasons["a"]
    assert "not faster than original" in verdict.reasons["c"]


def test_nothing_faster_keeps_the_original() -> None:
    verdict = select_fastest({8: 10.0}, {"a": {8: 10.2}, "b": {8: 9.8}}, batch=8, min_gain=0.05)
    assert verdict.winner is None  # b is 2% faster: within noise, not worth a swap


def test_decided_at_the_preferred_batch_size() -> None:
    latencies = {"small": {1: 0.5, 16: 20.0}, "big": {1: 2.0, 16: 8.0}}
    assert select_fastest({1: 1.0, 16: 16.0}, latencies, batch=16, min_gain=0.0).winner == "big"
    assert select_fastest({1: 1.0, 16: 16.0}, latencies, batch=1, min_gain=0.0).winner == "small"


def test_untimed_candidates_never_win() -> None:
    verdict = select_fastest({8: 10.0}, {"a": {}}, batch=8, min_gain=0.0)
    assert verdict.winner is None and "not timed" in verdict.reasons["a"]


class _Flaky:
    """The first round says the candidate is twice as fast; the confirmation round says it is not."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, label: str, model_path: Path, spec: SessionSpec, feeds: Mapping[int, Feed]) -> Latencies:
        self.seen.append(label)
        first_round = self.seen.count(label) == 1
        value = 5.0 if label == "int8_dynamic" and first_round else 10.0
        return {batch: value for batch in feeds}


def test_a_win_that_does_not_confirm_keeps_the_original(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    bench = _Flaky()
    pipeline = Pipeline(tmp_path / "cache", device=fake_device(), passes=[Int8DynamicPass()], benchmark=bench)
    result = pipeline.run(model, OptimizeOptions())
    step = result.report["steps"][0]
    assert result.report["selected"] == "original" and result.model_path == model
    assert step["status"] == "rejected" and "did not confirm" in step["reason"]
    assert bench.seen[:4] == ["original", "int8_dynamic", "original", "int8_dynamic"]
