"""The protocol-neutral request and response that both edges decode into and encode from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server.protocol.datatypes import DataType
from server.protocol.shared_memory import SharedMemoryRef


@dataclass
class InputTensor:
    """One decoded input: the array already has the request's shape and datatype."""

    name: str
    datatype: DataType
    array: np.ndarray


@dataclass
class RequestedOutput:
    """An output the client asked for; ``binary`` is the HTTP binary-data choice (None = default);
    ``classification`` is the top k asked for with Triton's classification extension (0 = the tensor);
    ``shared_memory`` is where to write it instead of the response body (the shared-memory extension)."""

    name: str
    binary: bool | None = None
    classification: int = 0
    shared_memory: SharedMemoryRef | None = None


@dataclass
class InferenceRequest:
    """A decoded inference request for one model (version empty = the latest ready one)."""

    model_name: str
    model_version: str
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] = field(default_factory=list)
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputTensor:
    """One result tensor, before encoding."""

    name: str
    datatype: DataType
    array: np.ndarray


@dataclass
class InferenceResponse:
    """The result of one request."""

    model_name: str
    model_version: str
    outputs: list[OutputTensor]
    id: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
