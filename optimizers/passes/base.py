"""The pass interface. A model pass is pure: it reads ``source`` and writes a new model to ``target`` (never
in place), configured by a static pydantic model that, with the input's hash, keys its cache entry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel, ConfigDict

from optimizers.accuracy import Family
from optimizers.device import DeviceInfo
from optimizers.modelinfo import ModelInfo
from optimizers.options import OptimizeOptions
from optimizers.runtime import NO_GUARD, DeviceGuard, Feed


class PassConfig(BaseModel):
    """Base of every pass's config: frozen and strict about unknown fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)


ConfigT = TypeVar("ConfigT", bound=PassConfig)


@dataclass(frozen=True)
class PassContext:
    """What a pass may look at: the machine, the options, the model summary and the calibration inputs
    (the reference set's batches); and the host's guard, for a pass that opens a GPU session."""

    device: DeviceInfo
    options: OptimizeOptions
    info: ModelInfo
    calibration: Sequence[Feed]
    guard: DeviceGuard = NO_GUARD


class ModelPass(ABC, Generic[ConfigT]):
    """Model in, new model out. Subclasses set ``name`` and ``family`` and implement the three hooks."""

    name: ClassVar[str]
    family: ClassVar[Family]
    uses_calibration: ClassVar[bool] = False
    """Whether the output depends on the reference inputs (then they are part of the cache key)."""

    @abstractmethod
    def configure(self, ctx: PassContext) -> ConfigT:
        """The static config for this run, derived from the options and the device."""

    def skip_reason(self, ctx: PassContext, config: ConfigT) -> str | None:
        """Why this pass does not apply here (None: it does)."""
        return None

    @abstractmethod
    def apply(self, source: Path, target: Path, config: ConfigT, ctx: PassContext) -> dict[str, Any]:
        """Write the optimized model to ``target``; return JSON-able details for the report."""
