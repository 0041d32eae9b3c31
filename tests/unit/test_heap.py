"""server.heap: the heap is frozen out of full collections when the served versions change, and garbage made of
frozen objects (an unloaded model's cycles) is still collected at the next change."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from server.heap import HeapKeeper, settle

pytestmark = pytest.mark.unit


class Node:
    """Half of a reference cycle: only the cycle collector frees it."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    gc.unfreeze()


def cycle() -> weakref.ref[Node]:
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


def test_settle_freezes_what_is_alive() -> None:
    kept = [Node() for _ in range(10)]
    settle()
    assert gc.get_freeze_count() >= len(kept)


def test_a_frozen_cycle_waits_for_the_next_change_then_goes() -> None:
    served = {"versions": ("m", 1)}
    keeper = HeapKeeper(lambda: served["versions"])
    garbage = cycle()
    assert keeper.check()  # the first check settles: the cycle is garbage already and is collected
    assert garbage() is None

    alive = Node()
    alive.other = Node()
    alive.other.other = alive
    frozen = weakref.ref(alive)
    settle()  # frozen while alive (a loaded model's objects) ...
    del alive  # ... then unloaded: cyclic garbage in the frozen generation
    gc.collect()
    assert frozen() is not None  # a full collection does not see it
    assert not keeper.check()  # nothing served changed: nothing done
    served["versions"] = ("m", 2)
    assert keeper.check()
    assert frozen() is None  # the change unfroze and collected it


def test_run_stops_with_the_server_and_leaves_nothing_frozen() -> None:
    changes = iter([1, 1, 2])
    keeper = HeapKeeper(lambda: next(changes, 2), period_s=0.01)

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.ensure_future(keeper.run(stop))
        for _ in range(1000):  # each settle is a full collection of this test process: give it time
            if keeper.settled == 2:
                break
            await asyncio.sleep(0.01)
        assert keeper.settled == 2 and gc.get_freeze_count() > 0
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert gc.get_freeze_count() == 0
