"""Optimization passes, one per file. Model passes turn a model into a new one; ``compile`` picks how the
selected model is run (threads, providers, TensorRT options)."""

from __future__ import annotations

from typing import Any

from optimizers.passes.base import ModelPass, PassConfig, PassContext
from optimizers.passes.fp16 import Fp16Pass
from optimizers.passes.graph_opt import GraphOptPass
from optimizers.passes.int8_dynamic import Int8DynamicPass
from optimizers.passes.int8_static import Int8StaticPass
from optimizers.passes.prune import PrunePass


def default_passes() -> list[ModelPass[Any]]:
    """The candidates, in report order: lossless first, then lossy by family."""
    return [GraphOptPass(), Int8DynamicPass(), Int8StaticPass(), Fp16Pass(), PrunePass()]


__all__ = ["ModelPass", "PassConfig", "PassContext", "default_passes"]
