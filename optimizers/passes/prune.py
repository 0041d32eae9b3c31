"""Magnitude pruning of MatMul/Gemm/Conv weights, only when the model asks for it. Without fine-tuning it
costs accuracy, and dense kernels (every CPU provider) run zeros as fast as any other number: the only
speed-up is 2:4 sparsity on TensorRT's sparse tensor cores (Ampere and later). The report shows what was
measured; the guard decides, with INT8-like budgets unless the model sets its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from optimizers.passes.base import ModelPass, PassConfig, PassContext

PRUNED_OPS = ("MatMul", "Gemm", "Conv")


class PruneConfig(PassConfig):
    """Which weights, how many, in which pattern."""

    sparsity: float = 0.5
    pattern: Literal["unstructured", "2:4"] = "unstructured"
    min_elements: int = 64
    """Smaller tensors are left alone: they hold little and are often sensitive (first/last layers)."""


class PrunePass(ModelPass[PruneConfig]):
    """Zero the smallest-magnitude weights of each MatMul/Gemm/Conv."""

    name = "prune"
    family = "sparse"

    def configure(self, ctx: PassContext) -> PruneConfig:
        asked = ctx.options.prune
        if asked is None:
            return PruneConfig()
        return PruneConfig(sparsity=asked.sparsity, pattern=asked.pattern)

    def skip_reason(self, ctx: PassContext, config: PruneConfig) -> str | None:
        if ctx.options.prune is None:
            return "not asked for (optimize.prune)"
        if not ctx.info.has_float_weights:
            inside = f" in the main graph ({ctx.info.subgraph_note}, which pruning does not reach)"
            return "no MatMul/Gemm/Conv with constant float weights" + inside * bool(ctx.info.subgraph_weight_params)
        return None

    def apply(self, source: Path, target: Path, config: PruneConfig, ctx: PassContext) -> dict[str, Any]:
        model = onnx.load(str(source))
        pruned, skipped, zeros, total = prune_model(model, config)
        onnx.save(model, str(target))
        return {
            "pattern": config.pattern,
            "pruned_tensors": pruned,
            "skipped_tensors": skipped,
            "weight_sparsity": round(zeros / total, 4) if total else 0.0,
            "note": "zeros are stored densely: file size and dense-kernel speed do not change; "
            "without fine-tuning accuracy drops",
        }


def prune_model(model: onnx.ModelProto, config: PruneConfig) -> tuple[list[str], list[str], int, int]:
    """Prune in place; returns (pruned names, skipped names with reasons, zero count, weight count)."""
    initializers = {init.name: init for init in model.graph.initializer}
    pruned: list[str] = []
    skipped: list[str] = []
    zeros = total = 0
    for name, axis in _weights(model, initializers):
        if name in pruned:
            continue
        weights = numpy_helper.to_array(initializers[name])
        if weights.size < config.min_elements or weights.dtype.kind != "f":
            skipped.append(f"{name}: {weights.size} elements")
            continue
        if config.pattern == "2:4" and weights.shape[axis] % 4:
            skipped.append(f"{name}: input channels {weights.shape[axis]} not a multiple of 4")
            continue
        mask = two_four_mask(weights, axis) if config.pattern == "2:4" else magnitude_mask(weights, config.sparsity)
        result = np.where(mask, weights, 0).astype(weights.dtype)
        initializers[name].CopyFrom(numpy_helper.from_array(result, name))
        pruned.append(name)
        zeros += int(result.size - np.count_nonzero(result))
        total += result.size
    return pruned, skipped, zeros, total


def _weights(model: onnx.ModelProto, initializers: dict[str, onnx.TensorProto]) -> list[tuple[str, int]]:
    """(weight name, reduction axis) of each prunable node: the axis summed over, along which 2:4 groups run."""
    found = []
    for node in model.graph.node:
        if node.op_type not in PRUNED_OPS or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        rank = len(initializers[node.input[1]].dims)
        if rank < 2:
            continue
        if node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 1 if trans_b else 0
        else:  # MatMul [.., K, N] reduces over K; Conv [O, I, kh, kw] over I
            axis = 1 if node.op_type == "Conv" else rank - 2
        found.append((node.input[1], axis))
    return found


def magnitude_mask(weights: np.ndarray, sparsity: float) -> np.ndarray:
    """True for the weights kept: all but the ``sparsity`` fraction with the smallest magnitude."""
    count = round(weights.size * sparsity)
    if count == 0:
        return np.ones(weights.shape, dtype=bool)
    order = np.argsort(np.abs(weights), axis=None, kind="stable")
    mask = np.ones(weights.size, dtype=bool)
    mask[order[:count]] = False
    return mask.reshape(weights.shape)


def two_four_mask(weights: np.ndarray, axis: int) -> np.ndarray:
    """True for the 2 largest-magnitude weights of every 4 consecutive ones along ``axis``."""
    moved = np.moveaxis(np.abs(weights), axis, -1)
    groups = moved.reshape(*moved.shape[:-1], moved.shape[-1] // 4, 4)
    ranks = np.argsort(np.argsort(groups, axis=-1, kind="stable"), axis=-1, kind="stable")
    keep = (ranks >= 2).reshape(moved.shape)
    return np.moveaxis(keep, -1, axis)
