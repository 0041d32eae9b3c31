"""One build per cache key across servers sharing a cache folder: the build lock makes a second run wait and
read the first one's result (counted as ``waited``), and a holder killed mid-build releases the lock."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from optimizers import OptimizeOptions, Pipeline, PipelineResult
from optimizers.cache import Cache
from optimizers.reference import TRAFFIC_SUFFIX
from optimizers.runtime import Feed, SessionSpec
from optimizers.timing import Latencies
from tests.unit.optimizers import models
from tests.unit.optimizers.conftest import FakeBenchmark, fake_device

FAST_INT8 = {"original": 10.0, "int8_dynamic": 5.0}
HOLD = """
import sys, time
from optimizers.cache import Cache
from optimizers.reference import TRAFFIC_SUFFIX
with Cache(sys.argv[1]).build_lock(sys.argv[2]):
    print("locked", flush=True)
    time.sleep(120)
"""


class HeldBenchmark(FakeBenchmark):
    """Blocks its first timing until released, so a second server can try the same key meanwhile."""

    def __init__(self) -> None:
        super().__init__(FAST_INT8)
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, label: str, model_path: Path, spec: SessionSpec, feeds: Mapping[int, Feed]) -> Latencies:
        self.started.set()
        assert self.release.wait(60), "the test never released the first build"
        return super().__call__(label, model_path, spec, feeds)


@dataclass
class Race:
    """Two servers' runs of one model on one cache, the second started while the first held its build."""

    first_server: Pipeline
    second_server: Pipeline
    second_bench: FakeBenchmark
    built: PipelineResult
    reused: PipelineResult


def _race(tmp_path: Path, model: Path, first_options: OptimizeOptions, second_options: OptimizeOptions) -> Race:
    """The first server's run is held at its first timing until the second is seen waiting for the first's
    lock; then both finish."""
    held = HeldBenchmark()
    first_server = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=held)
    second_bench = FakeBenchmark(FAST_INT8)
    second_server = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=second_bench)
    results: dict[str, PipelineResult] = {}
    waiting = threading.Event()

    def first() -> None:
        results["first"] = first_server.run(model, first_options)

    def second() -> None:
        results["second"] = second_server.run(
            model, second_options, lambda step: waiting.set() if "waiting" in step else None
        )

    builder = threading.Thread(target=first)
    builder.start()
    assert held.started.wait(60)
    follower = threading.Thread(target=second)
    follower.start()
    assert waiting.wait(30), "the second server did not wait for the first one's lock"
    held.release.set()
    builder.join(60)
    follower.join(60)
    return Race(first_server, second_server, second_bench, results["first"], results["second"])


def test_a_second_server_waits_for_the_first_build_and_reuses_it(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    options = OptimizeOptions(time_budget_s=0.05)
    race = _race(tmp_path, model, options, options)
    first_server, second_server, second_bench = race.first_server, race.second_server, race.second_bench

    built, reused = race.built, race.reused
    assert built.report["cache"] == "miss" and not built.report["cache_hit"]
    assert reused.report["cache"] == "waited" and reused.report["cache_hit"]
    assert reused.model_path == built.model_path
    assert reused.report["selected"] == built.report["selected"] == "int8_dynamic"
    assert second_bench.calls == []  # the optimizer ran once for the two
    assert first_server.cache_counts() == {"hit": 0, "miss": 1, "waited": 0}
    assert second_server.cache_counts() == {"hit": 0, "miss": 0, "waited": 1}
    assert not list((tmp_path / "cache" / "results").glob("*.lock"))  # the holder leaves no lock file behind

    third = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark(FAST_INT8))
    assert third.run(model, options).report["cache"] == "hit"
    assert third.lookup(model, options) is not None
    assert third.cache_counts() == {"hit": 2, "miss": 0, "waited": 0}


def test_a_holder_killed_mid_build_releases_the_lock(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(cache.root), "k1"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        blocked = threading.Event()
        acquired: list[bool] = []

        def take() -> None:
            with cache.build_lock("k1", on_wait=blocked.set) as waited:
                acquired.append(waited)

        taker = threading.Thread(target=take)
        taker.start()
        assert blocked.wait(10), "the lock was free while another process held it"
        assert acquired == []
        holder.send_signal(signal.SIGKILL)
        taker.join(10)
        assert acquired == [True]
    finally:
        holder.kill()
        holder.wait()


def test_locks_of_different_keys_do_not_wait(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    with cache.build_lock("a") as first, cache.build_lock("b") as second:
        assert (first, second) == (False, False)
    with cache.build_lock("a") as again:  # released and unlinked: taken at once
        assert again is False


def _traffic(tmp_path: Path, server: str, rows: slice) -> OptimizeOptions:
    """Options of a run on one server's own sample of its requests (a file only that server has)."""
    path = tmp_path / server / f"digits-1-{server}{TRAFFIC_SUFFIX}"
    path.parent.mkdir()
    np.savez(path, x=models.trained_digits().x_test[rows])
    return OptimizeOptions(time_budget_s=0.05, samples_path=path)


def test_traffic_runs_of_two_servers_optimize_once(tmp_path: Path) -> None:
    """Each server samples its own traffic, so their own keys differ; they meet on the key without the sample."""
    model = models.save(models.trained_digits().model, tmp_path / "m")
    first_options, second_options = _traffic(tmp_path, "a", slice(0, 40)), _traffic(tmp_path, "b", slice(40, 80))
    race = _race(tmp_path, model, first_options, second_options)

    assert race.built.report["cache"] == "miss" and race.built.report["reference"]["source"] == "traffic"
    assert race.reused.report["cache"] == "waited" and race.second_bench.calls == []
    assert race.reused.model_path == race.built.model_path
    # A later load without a sample (a restart, a new replica) finds it before READY.
    assert race.second_server.lookup(model, OptimizeOptions(time_budget_s=0.05)) is not None


def test_traffic_run_does_not_take_a_result_checked_on_generated_inputs(tmp_path: Path) -> None:
    model = models.save(models.trained_digits().model, tmp_path / "m")
    generated = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=FakeBenchmark(FAST_INT8))
    assert generated.run(model, OptimizeOptions(time_budget_s=0.05)).report["reference"]["source"] == "random"
    bench = FakeBenchmark(FAST_INT8)
    on_traffic = Pipeline(tmp_path / "cache", device=fake_device(), benchmark=bench)
    result = on_traffic.run(model, _traffic(tmp_path, "a", slice(0, 40)))
    assert result.report["cache"] == "miss" and result.report["reference"]["source"] == "traffic" and bench.calls
