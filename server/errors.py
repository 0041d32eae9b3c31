"""One error vocabulary for the whole server, and the one table that maps it to HTTP and gRPC.

Every failure a client can see is raised as a subclass of :class:`ServerError`; the HTTP and gRPC edges
translate it with :data:`ERROR_TABLE` and nothing else, so the two protocols cannot drift apart.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc


class ServerError(Exception):
    """Base of every client-visible error. ``message`` should name the field or object at fault."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidInput(ServerError):
    """The request is malformed or does not match the model (bad name, datatype, shape, JSON...)."""


class ModelNotFound(ServerError):
    """No such model, or no such version of it, is loaded."""


class ModelNotReady(ServerError):
    """The model exists but is still loading or failed to load; retrying later may help."""


class ServerUnavailable(ServerError):
    """The server is overloaded (queue full) or shutting down; retry after ``retry_after_s``."""


class DeadlineExceeded(ServerError):
    """The request waited in the queue longer than its timeout."""


class PayloadTooLarge(ServerError):
    """A body, message, tensor or upload exceeds a configured limit."""


class Unauthenticated(ServerError):
    """Credentials are required and were not given."""


class PermissionDenied(ServerError):
    """Credentials were given but do not allow this operation."""


class UnsupportedMediaType(ServerError):
    """The uploaded file is not in a format the server accepts (for example a pickle)."""


class LoadFailed(ServerError):
    """Loading a model failed (bad config, bad model file); the message carries the reason."""


class InternalError(ServerError):
    """An unexpected failure inside the server or the runtime."""


@dataclass(frozen=True)
class WireStatus:
    """How one error class appears on each protocol."""

    http_status: int
    grpc_code: grpc.StatusCode


ERROR_TABLE: dict[type[ServerError], WireStatus] = {
    InvalidInput: WireStatus(400, grpc.StatusCode.INVALID_ARGUMENT),
    LoadFailed: WireStatus(400, grpc.StatusCode.INVALID_ARGUMENT),
    Unauthenticated: WireStatus(401, grpc.StatusCode.UNAUTHENTICATED),
    PermissionDenied: WireStatus(403, grpc.StatusCode.PERMISSION_DENIED),
    ModelNotFound: WireStatus(404, grpc.StatusCode.NOT_FOUND),
    PayloadTooLarge: WireStatus(413, grpc.StatusCode.RESOURCE_EXHAUSTED),
    UnsupportedMediaType: WireStatus(415, grpc.StatusCode.INVALID_ARGUMENT),
    InternalError: WireStatus(500, grpc.StatusCode.INTERNAL),
    ModelNotReady: WireStatus(503, grpc.StatusCode.UNAVAILABLE),
    ServerUnavailable: WireStatus(503, grpc.StatusCode.UNAVAILABLE),
    DeadlineExceeded: WireStatus(503, grpc.StatusCode.DEADLINE_EXCEEDED),
}


def wire_status(error: ServerError) -> WireStatus:
    """Look up the wire status of ``error``, walking its class hierarchy; unknown classes are internal."""
    for cls in type(error).__mro__:
        status = ERROR_TABLE.get(cls)  # type: ignore[arg-type]
        if status is not None:
            return status
    return ERROR_TABLE[InternalError]


def all_error_classes() -> list[type[ServerError]]:
    """Every concrete error class, so a test can walk them all."""
    return list(ServerError.__subclasses__())


class ClientGone(Exception):
    """The client disconnected before its response was ready (counted as ``canceled``)."""


REASON_BY_HTTP_STATUS = {
    400: "invalid",
    404: "not_found",
    413: "invalid",
    415: "invalid",
    500: "backend",
    503: "rejected",
}


def failure_reason(exc: BaseException) -> str:
    """The metrics ``reason`` of a failed request (one of server.metrics.FAILURE_REASONS)."""
    if isinstance(exc, (asyncio.CancelledError, ClientGone)):
        return "canceled"
    if not isinstance(exc, ServerError):
        return "backend"  # a bug or a runtime failure: the edges answer 500
    return REASON_BY_HTTP_STATUS.get(wire_status(exc).http_status, "other")
