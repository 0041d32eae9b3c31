"""What the manager knows about one model name: its served versions, the states the repository index shows,
and its lock. Shared by the manager and the background optimizer, which both change it under that lock."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from server.models.version import ModelVersion


class ModelState(str, Enum):
    """Triton's model states, as the repository index reports them."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass
class VersionStatus:
    """The state the index reports for one version."""

    state: ModelState
    reason: str = ""


@dataclass
class ModelEntry:
    """Everything the manager knows about one model name."""

    name: str
    served: dict[int, ModelVersion] = field(default_factory=dict)
    status: dict[int, VersionStatus] = field(default_factory=dict)
    model_status: VersionStatus = field(default_factory=lambda: VersionStatus(ModelState.UNAVAILABLE))
    wanted: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    fingerprint: tuple[Any, ...] | None = None
    """The model folder as the last load attempt found it (poll mode compares against it)."""
    failed: tuple[Any, ...] | None = None
    """The folder's fingerprint when its last load failed: an on-demand request does not retry that load
    until the folder changes (a broken model must not be reloaded by every request)."""
    pinned: bool = False
    """Its config says never to unload it for the memory budget (and, with on-demand loading, to load it at
    start)."""
    loaded_at: float = 0.0
    last_used: float = 0.0
    """monotonic() times of its last load and of the last request that looked it up (the budget's LRU order)."""
    on_demand: asyncio.Task[None] | None = None
    """The on-demand load that concurrent first requests share."""
    loads_in_flight: int = 0
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    """Loads of this model begun and not ended, and an event set whenever none is left: an ensemble whose member
    is about to load (start-up loads every model at once) waits for that load instead of starting another."""
    awaiting_members: bool = False
    """An ensemble's load is loading its members: another ensemble must not wait for it (a cycle would hang)."""
