"""The model memory budget (``--model-memory-budget``): which idle models to unload, least recently used first,
so that a load fits, and when a load can never fit.

The policy is a pure function over a snapshot of the resident models (:func:`plan_evictions`), so it is
tested without a server; :class:`MemoryBudget` applies it for the manager, one load at a time, holding the
bytes of loads in flight as reservations so that two concurrent loads cannot both count the same room.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.errors import LoadFailed, ServerUnavailable

log = logging.getLogger("optiserve.models")
MIB = 1024 * 1024
WAIT_STEP_S = 0.05
"""How often a load waiting for room looks again (only while it waits: requests finishing, residency ending)."""


class NeverFits(LoadFailed):
    """The load needs more than the budget minus what can never be evicted (pinned models): no wait helps."""


class NoRoomYet(ServerUnavailable):
    """The models that would have to go are in use or within their minimum residency: retry later."""


@dataclass(frozen=True)
class Resident:
    """One resident model as the policy sees it."""

    name: str
    bytes: int
    last_used: float
    loaded_at: float
    pinned: bool = False
    busy: bool = False
    """Requests queued, running or on their way to the queue; or a load or unload of it under way."""


def plan_evictions(
    residents: list[Resident],
    name: str,
    need: int,
    budget: int,
    *,
    reserved: int = 0,
    now: float,
    min_residency_s: float,
) -> list[str]:
    """The models to unload, least recently used first, so that ``need`` more bytes fit in ``budget``; [] when
    they fit already. Raises NeverFits when even unloading every evictable model would not be enough and
    waiting cannot change that, NoRoomYet when it could once busy or recently loaded models become evictable.
    Nothing is unloaded unless the whole plan fits: a load that fails disturbs nobody."""
    mib = _mib
    others = [r for r in residents if r.name != name]  # a reload's own old versions serve until it is done
    own = sum(r.bytes for r in residents if r.name == name)
    used = sum(r.bytes for r in others) + own + reserved
    if used + need <= budget:
        return []
    pinned = sum(r.bytes for r in others if r.pinned)
    if need + pinned + own > budget:
        raise NeverFits(
            f"model {name!r} needs {mib(need)} MiB; the memory budget is {mib(budget)} MiB"
            + (f", of which pinned models hold {mib(pinned)} MiB" if pinned else "")
            + (f" and its serving versions {mib(own)} MiB" if own else "")
        )
    evictable = sorted(
        (r for r in others if not r.pinned and not r.busy and now - r.loaded_at >= min_residency_s),
        key=lambda r: r.last_used,
    )
    chosen: list[str] = []
    for resident in evictable:
        if used + need <= budget:
            break
        chosen.append(resident.name)
        used -= resident.bytes
    if used + need > budget:
        held = [r.name for r in others if not r.pinned and r.name not in chosen]
        raise NoRoomYet(
            f"model {name!r} needs {mib(need)} MiB and the memory budget ({mib(budget)} MiB) is held by models in "
            f"use or loaded less than {min_residency_s:g}s ago ({', '.join(sorted(held)) or 'loads in flight'}); "
            "retry shortly",
            retry_after_s=1,
        )
    return chosen


def _mib(n: int) -> str:
    return f"{n / MIB:.1f}"


Snapshot = Callable[[], list[Resident]]
Evict = Callable[[str], Awaitable[bool]]


class MemoryBudget:
    """Makes room for loads within ``limit`` bytes (0: no budget; memory is still measured and reported)."""

    def __init__(self, limit: int, min_residency_s: float) -> None:
        self.limit = limit
        self.min_residency_s = min_residency_s
        self._reserved: dict[int, int] = {}
        self._lock = asyncio.Lock()
        self._known: dict[tuple[str, int, int], int] = {}
        self._tickets = itertools.count(1)

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    @property
    def reserved(self) -> int:
        """Bytes of loads in flight, not yet measured."""
        return sum(self._reserved.values())

    def known_cost(self, name: str, version: int, file_bytes: int) -> int | None:
        """What this version (with these files) measured when it was last loaded in this process."""
        return self._known.get((name, version, file_bytes))

    def remember(self, name: str, version: int, file_bytes: int, cost: int) -> None:
        self._known[(name, version, file_bytes)] = cost

    async def reserve(self, name: str, need: int, snapshot: Snapshot, evict: Evict, deadline: float) -> int:
        """Unload what the policy chooses until ``need`` fits, then hold it for this load; returns the ticket
        to :meth:`release` once the load is done (or failed). Waits, up to ``deadline`` (monotonic), while the
        models that would have to go are busy or recently loaded; then raises NoRoomYet (503, retry)."""
        ticket = next(self._tickets)
        await self._hold(ticket, name, need, snapshot, evict, deadline)
        return ticket

    async def adjust(
        self, ticket: int, name: str, measured: int, snapshot: Snapshot, evict: Evict, deadline: float
    ) -> None:
        """A load has measured what it really holds: make the ticket hold that instead of the estimate,
        unloading more idle models if it grew (waiting up to ``deadline`` as :meth:`reserve` does)."""
        await self._hold(ticket, name, measured, snapshot, evict, deadline)

    async def _hold(self, ticket: int, name: str, need: int, snapshot: Snapshot, evict: Evict, deadline: float) -> None:
        while True:
            async with self._lock:
                others = self.reserved - self._reserved.get(ticket, 0)  # an adjusted ticket's estimate does not count
                try:
                    victims = plan_evictions(
                        snapshot(),
                        name,
                        need,
                        self.limit,
                        reserved=others,
                        now=time.monotonic(),
                        min_residency_s=self.min_residency_s,
                    )
                except NoRoomYet:
                    if time.monotonic() >= deadline:
                        raise
                else:
                    evicted = [victim for victim in victims if await evict(victim)]
                    if len(evicted) == len(victims):
                        self._reserved[ticket] = need
                        return
                    # a victim turned busy: plan again with what is idle now
            await asyncio.sleep(WAIT_STEP_S)  # nothing can go yet: look again

    def release(self, ticket: int) -> None:
        self._reserved.pop(ticket, None)
