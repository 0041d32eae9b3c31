"""The memory budget's policy (least recently used first, pinning, in-use protection, minimum residency, a model
larger than the budget), its reservations under concurrent loads, the budget setting, and the measurement."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from server.models.budget import MIB, MemoryBudget, NeverFits, NoRoomYet, Resident, plan_evictions
from server.models.memory import charge, estimate, measure_resident
from server.models.residency import is_pinned
from server.repository.config import parse_config
from server.settings import parse_budget

NOW = 1000.0


def resident(name: str, mib: int, last_used: float, **flags: bool) -> Resident:
    return Resident(name, mib * MIB, last_used=last_used, loaded_at=0.0, **flags)


def plan(residents: list[Resident], need_mib: int, budget_mib: int = 10, **kwargs: float) -> list[str]:
    return plan_evictions(
        residents,
        "new",
        need_mib * MIB,
        budget_mib * MIB,
        now=NOW,
        min_residency_s=kwargs.pop("min_residency_s", 0.0),
        reserved=int(kwargs.pop("reserved_mib", 0) * MIB),
    )


def test_nothing_is_evicted_when_the_load_fits() -> None:
    assert plan([resident("a", 4, 1), resident("b", 4, 2)], 2) == []


def test_least_recently_used_goes_first_and_only_as_many_as_needed() -> None:
    models = [resident("a", 3, last_used=30), resident("b", 3, last_used=10), resident("c", 3, last_used=20)]
    assert plan(models, 3) == ["b"]
    assert plan(models, 6) == ["b", "c"]


def test_pinned_and_busy_models_are_never_evicted() -> None:
    models = [
        resident("pinned", 3, last_used=1, pinned=True),
        resident("busy", 3, last_used=2, busy=True),
        resident("idle", 3, last_used=3),
    ]
    assert plan(models, 3) == ["idle"]


def test_recently_loaded_models_are_kept_for_their_minimum_residency() -> None:
    young = Resident("young", 6 * MIB, last_used=1, loaded_at=NOW - 1)
    old = Resident("old", 3 * MIB, last_used=5, loaded_at=NOW - 100)
    assert plan([young, old], 4, min_residency_s=10) == ["old"]
    with pytest.raises(NoRoomYet, match="young"):  # would need the young one too: wait, evict nothing
        plan([young, old], 8, min_residency_s=10)


def test_a_model_larger_than_the_budget_never_fits_and_nothing_is_evicted() -> None:
    with pytest.raises(NeverFits, match=r"needs 11\.0 MiB; the memory budget is 10\.0 MiB"):
        plan([resident("a", 2, 1)], 11)
    with pytest.raises(NeverFits, match=r"pinned models hold 6\.0 MiB"):
        plan([resident("p", 6, 1, pinned=True), resident("a", 1, 2)], 5)


def test_busy_models_make_the_load_wait_not_fail() -> None:
    with pytest.raises(NoRoomYet) as raised:
        plan([resident("a", 8, 1, busy=True)], 4)
    assert raised.value.retry_after_s == 1


def test_a_reload_counts_its_serving_versions_but_never_evicts_itself() -> None:
    serving = Resident("new", 4 * MIB, last_used=1, loaded_at=0)
    assert plan([serving, resident("b", 4, 5)], 4) == ["b"]
    with pytest.raises(NeverFits, match=r"its serving versions 4\.0 MiB"):
        plan([serving], 7)


def test_loads_in_flight_count_through_their_reservations() -> None:
    assert plan([resident("a", 4, 1)], 4, reserved_mib=4) == ["a"]


class Loaded:
    """Resident models for MemoryBudget: ``snapshot`` lists them, ``evict`` removes one and records it."""

    def __init__(self, *models: Resident) -> None:
        self.models = {model.name: model for model in models}
        self.evicted: list[str] = []

    def snapshot(self) -> list[Resident]:
        return list(self.models.values())

    async def evict(self, name: str) -> bool:
        self.evicted.append(name)
        del self.models[name]
        return True


def test_reservations_keep_concurrent_loads_within_the_budget() -> None:
    async def scenario() -> tuple[list[str], float]:
        budget = MemoryBudget(10 * MIB, min_residency_s=0)
        loaded = Loaded(resident("a", 4, 1), resident("b", 4, 2))
        deadline = time.monotonic() + 5
        first = await budget.reserve("x", 4 * MIB, loaded.snapshot, loaded.evict, deadline)
        second = await budget.reserve("y", 4 * MIB, loaded.snapshot, loaded.evict, deadline)
        held = budget.reserved / MIB
        budget.release(first)
        budget.release(second)
        assert budget.reserved == 0
        return loaded.evicted, held

    evicted, held = asyncio.run(scenario())
    assert evicted == ["a", "b"] and held == 8


def test_a_load_waits_for_room_until_its_deadline() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(10 * MIB, min_residency_s=0)
        busy = [resident("a", 8, 1, busy=True)]

        async def evict(name: str) -> bool:
            raise AssertionError("nothing may be evicted")

        started = time.monotonic()
        with pytest.raises(NoRoomYet):
            await budget.reserve("x", 4 * MIB, lambda: busy, evict, started + 0.2)
        assert 0.2 <= time.monotonic() - started < 2

    asyncio.run(scenario())


def test_a_measured_cost_above_the_estimate_makes_more_room() -> None:
    async def scenario() -> list[str]:
        budget = MemoryBudget(10 * MIB, min_residency_s=0)
        loaded = Loaded(resident("a", 3, 1), resident("b", 3, 2))
        deadline = time.monotonic() + 5
        ticket = await budget.reserve("x", 4 * MIB, loaded.snapshot, loaded.evict, deadline)
        assert loaded.evicted == []
        await budget.adjust(ticket, "x", 6 * MIB, loaded.snapshot, loaded.evict, deadline)
        assert budget.reserved == 6 * MIB
        return loaded.evicted

    assert asyncio.run(scenario()) == ["a"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [("", 0), ("0", 0), ("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000), ("1073741824", 1 << 30)],
)
def test_budget_setting(text: str, expected: int) -> None:
    assert parse_budget(text) == expected


def test_budget_as_a_fraction_of_the_memory_limit() -> None:
    assert parse_budget("0.25", limit=8 * MIB) == 2 * MIB


@pytest.mark.parametrize("text", ["lots", "-1", "2.5", "0MiB", "1.5"])
def test_malformed_budget_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="give bytes"):
        parse_budget(text, limit=MIB)


def test_pinned_is_read_from_the_config_parameters() -> None:
    pinned = parse_config('parameters { key: "pinned" value { string_value: "true" } }', "pbtxt").config
    other = parse_config('parameters { key: "pinned" value { string_value: "no" } }', "pbtxt").config
    assert is_pinned(pinned) and not is_pinned(other)


def test_measurement_sees_memory_kept_by_the_block() -> None:
    with measure_resident() as measured:
        kept = np.ones(16 * MIB, dtype=np.uint8)  # touched: resident
    assert measured.bytes >= 15 * MIB
    assert kept.sum() == 16 * MIB


def test_estimate_and_charge() -> None:
    assert estimate(MIB, instances=2) == 2 * (2 * MIB + MIB)
    assert charge(measured=0, file_bytes=MIB) == MIB  # never below the weights
    assert charge(measured=3 * MIB, file_bytes=MIB) == 3 * MIB
