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
