"""CUDA graphs for GPU instances on onnxruntime's CUDA provider (Triton's ``optimization { cuda { graphs } }``).

A captured graph replays a whole run with one launch, which removes the per-kernel launch cost that
dominates small batches. onnxruntime's CUDA provider (``enable_cuda_graph``) captures one graph per shape and
has three rules: every node runs on the CUDA provider, inputs and outputs are bound to device buffers whose
addresses never change, and each shape has its own graph, chosen per run by the ``gpu_graph_id`` run option
(onnxruntime >= 1.18). So every captured batch size gets its own device buffers and binding, captured at load.
A batch is padded with zero rows up to the smallest captured size that fits and its outputs are cut back:
padding is as safe as dynamic batching itself, which already assumes that the rows of a batch do not interact.
A run no graph fits (a larger batch, another dtype) runs without one (``gpu_graph_id`` -1).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto

from server.backends.base import Tensors
from server.backends.pinned import PinnedHost, as_array
from server.protocol.datatypes import BY_ONNX_TYPE

log = logging.getLogger("optiserve.gpu")
GRAPH_ID = "gpu_graph_id"
NO_GRAPH = "-1"
WARMUP_RUNS = 3
"""Runs per graph at load: onnxruntime runs a shape normally before it captures it, then replays."""


class GraphsUnsupported(Exception):
    """The model cannot run as CUDA graphs (the message says why)."""


@dataclass(frozen=True)
class _Tensor:
    name: str
    dims: tuple[int, ...]
    """Without the batch dimension for a batched model."""
    dtype: np.dtype[Any]


@dataclass
class _Graph:
    rows: int | None
    """The batch size it was captured for; None for a model without a batch dimension."""
    binding: Any
    run_options: Any
    device_inputs: dict[str, Any]


class CudaGraphs:
    """One instance's captured graphs, keyed by batch size. onnxruntime keeps captured graphs per thread, so
    capture and every replay must happen on the same thread: the instance's worker thread."""

    def __init__(
        self,
        session: Any,
        ort: Any,
        device_id: int,
        sizes: tuple[int, ...],
        host: PinnedHost | None,
        device_type: str = "cuda",
    ):
        """``device_type`` is where the bound buffers live: "cuda", or "cpu" to exercise the bookkeeping with
        the real onnxruntime API on a machine without a GPU (no graph is captured there)."""
        self._session = session
        self._ort = ort
        self._device_id = device_id
        self._device_type = device_type
        self._batched = bool(sizes)
        self._inputs = [_static(v, batched=self._batched, kind="input") for v in session.get_inputs()]
        self._outputs = [_static(v, batched=self._batched, kind="output") for v in session.get_outputs()]
        self._graphs: dict[int | None, _Graph] = {}
        for rows in sorted(set(sizes)) if sizes else [None]:
            self._graphs[rows] = self._prepare(rows)
        largest = max(sizes, default=1)
        self._padding = {
            t.name: _host_block(host, largest * math.prod(t.dims) * t.dtype.itemsize) for t in self._inputs
        }
        """One host block per input (pinned when possible) that padded batches of every size are assembled in:
        runs are serial, so the graphs can share it."""
        self.sizes = tuple(r for r in self._graphs if r is not None)
        """The captured batch sizes, smallest first (empty for an unbatched model's single graph)."""

    @classmethod
    def capture(
        cls,
        session: Any,
        ort: Any,
        device_id: int,
        sizes: tuple[int, ...],
        host: PinnedHost | None,
        device_type: str = "cuda",
    ) -> CudaGraphs:
        """Prepare and capture every graph now, on the calling thread (the one that will replay them), so that a
        model that cannot be captured fails before it serves. Hold ``CUDA_CAPTURE`` exclusively around this."""
        graphs = cls(session, ort, device_id, sizes, host, device_type)
        for graph in graphs._graphs.values():
            for _ in range(WARMUP_RUNS):
                session.run_with_iobinding(graph.binding, graph.run_options)
        return graphs

    def _prepare(self, rows: int | None) -> _Graph:
        def shape(tensor: _Tensor) -> tuple[int, ...]:
            return tensor.dims if rows is None else (rows, *tensor.dims)

        ort = self._ort
        binding = self._session.io_binding()
        device_inputs = {}
        for tensor in self._inputs:
            zeros = np.zeros(shape(tensor), tensor.dtype)
            value = ort.OrtValue.ortvalue_from_numpy(zeros, self._device_type, self._device_id)
            binding.bind_ortvalue_input(tensor.name, value)
            device_inputs[tensor.name] = value
        for tensor in self._outputs:
            value = ort.OrtValue.ortvalue_from_shape_and_type(
                shape(tensor), tensor.dtype.type, self._device_type, self._device_id
            )
            binding.bind_ortvalue_output(tensor.name, value)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry(GRAPH_ID, str(len(self._graphs) + 1))  # 0 is onnxruntime's default id
        return _Graph(rows, binding, run_options, device_inputs)

    def run(self, feed: Tensors) -> list[np.ndarray] | None:
        """The outputs in the session's order, or None when no captured graph fits this feed."""
        graph = self._fitting(feed)
        if graph is None:
            return None
        rows = None if graph.rows is None else int(next(iter(feed.values())).shape[0])
        for name, array in feed.items():
            if graph.rows is None or rows == graph.rows:
                graph.device_inputs[name].update_inplace(np.ascontiguousarray(array))
            else:
                staged = as_array(self._padding[name], (graph.rows, *array.shape[1:]), array.dtype)
                staged[:rows] = array
                staged[rows:] = 0
                graph.device_inputs[name].update_inplace(staged)
        self._session.run_with_iobinding(graph.binding, graph.run_options)
        outputs = list(graph.binding.copy_outputs_to_cpu())
        return outputs if rows is None or rows == graph.rows else [o[:rows] for o in outputs]

    def _fitting(self, feed: Tensors) -> _Graph | None:
        """The graph for this feed: same inputs, dtypes and sample shapes, the smallest batch size that fits."""
        if set(feed) != {t.name for t in self._inputs}:
            return None
        rows: int | None = None
        for tensor in self._inputs:
            array = feed[tensor.name]
            sample = array.shape[1:] if self._batched else array.shape
            if array.dtype != tensor.dtype or tuple(sample) != tensor.dims:
                return None
            if self._batched:
                if rows is not None and array.shape[0] != rows:
                    return None
                rows = int(array.shape[0])
        if not self._batched:
            return self._graphs[None]
        size = next((s for s in self.sizes if rows is not None and s >= rows), None)
        return None if size is None else self._graphs[size]


def _host_block(host: PinnedHost | None, nbytes: int) -> np.ndarray:
    """``nbytes`` of pinned memory, or of ordinary memory when none can be pinned."""
    block = host.allocate(nbytes) if host is not None else None
    return np.empty(max(1, nbytes), np.uint8) if block is None else block


def _numeric_dtype(ort_type: str) -> np.dtype[Any] | None:
    """The numpy dtype of an onnxruntime type string such as ``tensor(float16)`` (via the project's datatype
    table); None for strings and anything a device buffer cannot hold."""
    name = ort_type.removeprefix("tensor(").removesuffix(")").upper()
    try:
        datatype = BY_ONNX_TYPE.get(TensorProto.DataType.Value(name))
    except ValueError:  # not a tensor type name (a sequence, a map)
        return None
    if datatype is None or datatype.numpy.hasobject or datatype.name == "BF16":
        return None
    return datatype.numpy


def _static(value: Any, *, batched: bool, kind: str) -> _Tensor:
    """A session input or output with fixed dims (after the batch dimension, for a batched model)."""
    dtype = _numeric_dtype(value.type)
    if dtype is None:
        raise GraphsUnsupported(f"{kind} {value.name!r} is {value.type}, which cannot live in a CUDA graph's buffers")
    dims = list(value.shape)[1:] if batched else list(value.shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise GraphsUnsupported(
            f"{kind} {value.name!r} has shape {list(value.shape)}: CUDA graphs need fixed dims"
            + (" after the batch dimension" if batched else "")
        )
    return _Tensor(value.name, tuple(int(d) for d in dims), dtype)
