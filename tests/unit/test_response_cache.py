"""server.models.response_cache: exact keys, LRU eviction at the size limit, no entries across versions,
thread safety, and ModelVersion.infer answering hits without the queue or the backend."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import numpy as np
import pytest

from server.metrics import ServerMetrics
from server.models.batching import Batcher
from server.models.response_cache import ResponseCache, next_generation
from server.models.stats import ModelStats
from server.models.version import ModelVersion
from server.protocol import datatypes
from server.protocol.inference import InferenceRequest, InputTensor, RequestedOutput
from server.protocol.validation import TensorSpec
from server.repository.config import ModelConfig

FP32 = datatypes.BY_NAME["FP32"]


def _inputs(array: np.ndarray, name: str = "x") -> list[InputTensor]:
    return [InputTensor(name, datatypes.of_array(array), array)]


def _key(
    gen: int, array: np.ndarray, outputs: list[RequestedOutput] | None = None, names: tuple[str, ...] = ("y",)
) -> bytes:
    return ResponseCache.key(gen, "m", 1, _inputs(array), outputs or [], list(names))


def test_key_is_exact_over_bytes_shape_type_and_name() -> None:
    gen = next_generation()
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert _key(gen, x) == _key(gen, x.copy())
    assert _key(gen, x) == _key(gen, np.asfortranarray(x))  # layout is not content
    changed = x.copy()
    changed[1, 2] = np.nextafter(changed[1, 2], np.float32(100))
    others = [
        _key(gen, changed),
        _key(gen, x.reshape(3, 2)),
        _key(gen, x.reshape(6)),
        _key(gen, x.astype(np.float64)),
        _key(gen, x.view(np.int32)),  # same bytes, another type
        ResponseCache.key(gen, "m", 1, _inputs(x, "other"), [], ["y"]),
        ResponseCache.key(gen, "n", 1, _inputs(x), [], ["y"]),
        ResponseCache.key(gen, "m", 2, _inputs(x), [], ["y"]),
        _key(next_generation(), x),
    ]
    keys = {_key(gen, x), *others}
    assert len(keys) == len(others) + 1


def test_key_of_bytes_tensors_is_length_prefixed() -> None:
    gen = next_generation()
    a = np.array([b"ab", b"c"], dtype=object)
    b = np.array([b"a", b"bc"], dtype=object)
    assert _key(gen, a) != _key(gen, b)
    assert _key(gen, a) == _key(gen, np.array([b"ab", b"c"], dtype=object))


def test_requested_outputs_and_their_parameters_make_different_keys() -> None:
    gen = next_generation()
    x = np.ones((2, 3), np.float32)
    keys = {
        _key(gen, x, names=("y",)),
        _key(gen, x, names=("z",)),
        _key(gen, x, names=("y", "z")),
        _key(gen, x, names=("z", "y")),
        _key(gen, x, [RequestedOutput("y")], names=("y",)),
        _key(gen, x, [RequestedOutput("y", classification=2)], names=("y",)),
        _key(gen, x, [RequestedOutput("y", binary=True)], names=("y",)),
    }
    assert len(keys) == 7


def test_hit_returns_a_private_read_only_copy() -> None:
    cache = ResponseCache(1 << 20)
    gen = next_generation()
    out = np.arange(4, dtype=np.float32)
    key = _key(gen, out)
    assert cache.get(key) is None
    assert cache.put(gen, key, [("y", "FP32", out)])
    out[:] = -1  # the caller's array changes after the insert
    (stored,) = cache.get(key) or ()
    assert stored.name == "y" and stored.datatype == "FP32"
    np.testing.assert_array_equal(stored.array, np.arange(4, dtype=np.float32))
    with pytest.raises(ValueError):
        stored.array[0] = 7


def test_lru_eviction_at_the_size_limit() -> None:
    entry = 32 + 400  # key + 100 float32
    cache = ResponseCache(3 * entry)
    gen = next_generation()
    keys = [_key(gen, np.full(1, i, np.float32)) for i in range(4)]
    for key in keys[:3]:
        assert cache.put(gen, key, [("y", "FP32", np.zeros(100, np.float32))])
    assert cache.size_bytes == 3 * entry and cache.entries == 3
    assert cache.get(keys[0]) is not None  # now the most recently used
    cache.put(gen, keys[3], [("y", "FP32", np.zeros(100, np.float32))])
    assert cache.get(keys[1]) is None  # the least recently used went
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    assert cache.size_bytes == 3 * entry
    # An entry larger than the whole cache is not stored and evicts nothing.
    assert not cache.put(gen, _key(gen, np.ones(1, np.float32)), [("y", "FP32", np.zeros(1000, np.float32))])
    assert cache.entries == 3
    assert _families(cache) == {
        "optiserve_response_cache_size_bytes": 3 * entry,
        "optiserve_response_cache_used_bytes": 3 * entry,
        "optiserve_response_cache_entries": 3,
        "optiserve_response_cache_evictions_total": 1,
    }
    cache.drop(gen)  # a closing version's entries go, and are not evictions
    assert _families(cache)["optiserve_response_cache_entries"] == 0
    assert _families(cache)["optiserve_response_cache_evictions_total"] == 1
    assert ResponseCache(0).metric_families() == []  # off: no series at all


def _families(cache: ResponseCache) -> dict[str, float]:
    return {sample.name: sample.value for family in cache.metric_families() for sample in family.samples}


def test_drop_forgets_a_version_and_refuses_its_late_inserts() -> None:
    cache = ResponseCache(1 << 20)
    old, new = next_generation(), next_generation()
    x = np.ones(3, np.float32)
    cache.put(old, _key(old, x), [("y", "FP32", x)])
    cache.put(new, _key(new, x), [("y", "FP32", x * 2)])
    assert cache.drop(old) == 1
    assert cache.get(_key(old, x)) is None and cache.get(_key(new, x)) is not None
    assert not cache.put(old, _key(old, x), [("y", "FP32", x)])  # a request that finished after the close
    assert cache.entries == 1


def test_zero_size_is_off_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    cache = ResponseCache(0)
    with caplog.at_level(logging.WARNING, logger="optiserve.models"):
        assert cache.for_model("a", True) is None
        assert cache.for_model("b", True) is None
    assert sum("response cache is off" in r.getMessage() for r in caplog.records) == 1
    assert ResponseCache(10).for_model("a", False) is None
    on = ResponseCache(10)
    assert on.for_model("a", True) is on


def test_concurrent_threads_keep_the_size_consistent() -> None:
    cache = ResponseCache(20 * (32 + 40))
    gen = next_generation()

    def work(seed: int) -> None:
        for i in range(300):
            key = _key(gen, np.full(1, (seed * 7 + i) % 50, np.float32))
            if cache.get(key) is None:
                cache.put(gen, key, [("y", "FP32", np.zeros(10, np.float32))])
            if i % 97 == 0:
                cache.drop(next_generation())

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert cache.entries <= 20 and cache.size_bytes == cache.entries * (32 + 40)


class CountingRunner:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.calls += 1
        x = tensors["x"]
        return {"y": x * 2, "z": x + 1}


def _version(cache: ResponseCache | None, runner: CountingRunner, metrics: ServerMetrics | None = None) -> ModelVersion:
    config = ModelConfig(name="m", max_batch_size=0)
    config.response_cache.enable = True
    stats = ModelStats(metrics.for_version("m", "1") if metrics else None)
    batcher = Batcher("m:1", [runner], max_batch_size=0, max_queue_size=0, stats=stats)
    batcher.start()
    specs_in = [TensorSpec("x", FP32, (-1,))]
    specs_out = [TensorSpec("y", FP32, (-1,)), TensorSpec("z", FP32, (-1,))]
    served = cache.for_model("m", True) if cache is not None else None
    return ModelVersion("m", 1, config, specs_in, specs_out, [], batcher, stats, response_cache=served)


def _request(x: np.ndarray, outputs: list[str] | None = None) -> InferenceRequest:
    return InferenceRequest("m", "", _inputs(x), [RequestedOutput(n) for n in outputs or []])


def test_infer_hit_skips_the_backend_and_returns_the_same_outputs() -> None:
    cache, runner, metrics = ResponseCache(1 << 20), CountingRunner(), ServerMetrics()
    version = _version(cache, runner, metrics)
    x = np.array([1.0, 2.5, -3.0], np.float32)

    async def scenario() -> list[Any]:
        first = await version.infer(_request(x))
        second = await version.infer(_request(x.copy()))
        only_z = await version.infer(_request(x, ["z"]))
        return [first, second, only_z]

    try:
        first, second, only_z = asyncio.run(scenario())
    finally:
        version.close(1)
    assert runner.calls == 2  # the repeat was a hit; asking for other outputs was not
    assert [o.name for o in first.outputs] == [o.name for o in second.outputs] == ["y", "z"]
    for a, b in zip(first.outputs, second.outputs, strict=True):
        assert a.datatype == b.datatype
        np.testing.assert_array_equal(a.array, b.array)
    assert [o.name for o in only_z.outputs] == ["z"]
    stats = version.stats.to_json("m", "1")["inference_stats"]
    assert stats["cache_hit"]["count"] == 1 and stats["cache_miss"]["count"] == 2
    assert version.stats.execution_count == 2
    reg = metrics.registry
    assert reg.get_sample_value("optiserve_response_cache_hits_total", {"model": "m", "version": "1"}) == 1
    assert reg.get_sample_value("optiserve_response_cache_misses_total", {"model": "m", "version": "1"}) == 2
    labels = {"model": "m", "version": "1"}
    hit_s = reg.get_sample_value("optiserve_response_cache_hit_duration_seconds_total", labels)
    miss_s = reg.get_sample_value("optiserve_response_cache_miss_duration_seconds_total", labels)
    assert hit_s == pytest.approx(stats["cache_hit"]["ns"] * 1e-9) and hit_s > 0
    assert miss_s == pytest.approx(stats["cache_miss"]["ns"] * 1e-9) and miss_s > 0
    assert cache.entries == 0  # closing the version dropped its entries


def test_a_new_version_object_never_serves_the_old_ones_entries() -> None:
    cache = ResponseCache(1 << 20)
    old_runner, new_runner = CountingRunner(), CountingRunner()
    old, new = _version(cache, old_runner), _version(cache, new_runner)
    x = np.ones(2, np.float32)
    try:
        asyncio.run(old.infer(_request(x)))
        asyncio.run(new.infer(_request(x)))
    finally:
        old.close(1)
        new.close(1)
    assert old_runner.calls == new_runner.calls == 1


def test_concurrent_requests_on_the_event_loop() -> None:
    cache, runner = ResponseCache(1 << 20), CountingRunner()
    version = _version(cache, runner)
    arrays = [np.full(3, i % 5, np.float32) for i in range(40)]

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(version.infer(_request(a)) for a in arrays))

    try:
        responses = asyncio.run(scenario())
        again = asyncio.run(scenario())
    finally:
        version.close(1)
    for a, first, second in zip(arrays, responses, again, strict=True):
        np.testing.assert_array_equal(first.outputs[0].array, a * 2)
        np.testing.assert_array_equal(second.outputs[0].array, a * 2)
    assert runner.calls <= 40  # the second round is all hits
    hits = version.stats.cache_hit.count
    assert hits >= 40 and hits + version.stats.cache_miss.count == 80


def test_no_cache_when_the_server_gives_it_no_room() -> None:
    runner = CountingRunner()
    version = _version(ResponseCache(0), runner)
    x = np.ones(2, np.float32)
    try:
        asyncio.run(version.infer(_request(x)))
        asyncio.run(version.infer(_request(x)))
    finally:
        version.close(1)
    assert runner.calls == 2 and version.stats.cache_miss.count == 0
