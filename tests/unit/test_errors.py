"""server.errors: every error class maps to a sane HTTP status and gRPC code, and the HTTP error body."""

from __future__ import annotations

import grpc
import orjson
import pytest

from server import errors
from server.errors import ERROR_TABLE, ServerError
from server.http.responses import error_response


def _walk(cls: type[ServerError]) -> list[type[ServerError]]:
    found: list[type[ServerError]] = []
    for sub in cls.__subclasses__():
        if sub.__module__ == errors.__name__:
            found.append(sub)
            found.extend(_walk(sub))
    return found


def test_all_error_classes_lists_every_subclass() -> None:
    classes = errors.all_error_classes()
    assert set(_walk(ServerError)) <= set(classes)
    assert len(classes) >= 11
    assert ServerError not in classes


@pytest.mark.parametrize("cls", errors.all_error_classes(), ids=lambda cls: cls.__name__)
def test_every_error_class_has_a_sane_wire_status(cls: type[ServerError]) -> None:
    assert cls in ERROR_TABLE, f"{cls.__name__} has no ERROR_TABLE entry"
    status = ERROR_TABLE[cls]
    assert 400 <= status.http_status <= 599
    assert isinstance(status.grpc_code, grpc.StatusCode)
    assert status.grpc_code is not grpc.StatusCode.OK
    # a client's fault must not look like a server failure on gRPC, and vice versa
    if status.http_status < 500:
        assert status.grpc_code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE)
    else:
        assert status.grpc_code not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert errors.wire_status(cls("boom")) is status


@pytest.mark.parametrize(
    ("cls", "http", "code"),
    [
        (errors.ModelNotFound, 404, grpc.StatusCode.NOT_FOUND),
        (errors.PayloadTooLarge, 413, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.ServerUnavailable, 503, grpc.StatusCode.UNAVAILABLE),
        (errors.InvalidInput, 400, grpc.StatusCode.INVALID_ARGUMENT),
        (errors.Unauthenticated, 401, grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied, 403, grpc.StatusCode.PERMISSION_DENIED),
        (errors.InternalError, 500, grpc.StatusCode.INTERNAL),
        (errors.ModelNotReady, 503, grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_explicit_mappings(cls: type[ServerError], http: int, code: grpc.StatusCode) -> None:
    status = errors.wire_status(cls("x"))
    assert (status.http_status, status.grpc_code) == (http, code)


def test_wire_status_walks_the_class_hierarchy() -> None:
    class VersionNotFound(errors.ModelNotFound):
        pass

    assert errors.wire_status(VersionNotFound("v")) is ERROR_TABLE[errors.ModelNotFound]
    assert errors.wire_status(ServerError("bare")) is ERROR_TABLE[errors.InternalError]


def test_error_carries_message_and_retry_after() -> None:
    error = errors.ServerUnavailable("queue full", retry_after_s=2.0)
    assert (error.message, str(error), error.retry_after_s) == ("queue full", "queue full", 2.0)
    assert errors.InvalidInput("x").retry_after_s is None


def test_error_response_body_and_status() -> None:
    response = error_response(errors.ModelNotFound("model 'x' is not in the repository"))
    assert response.status_code == 404
    assert orjson.loads(response.body) == {"error": "model 'x' is not in the repository"}
    assert response.media_type == "application/json"
    assert "retry-after" not in response.headers


@pytest.mark.parametrize(("seconds", "header"), [(1, "1"), (2.5, "3"), (0.2, "1"), (0, "1"), (30, "30")])
def test_error_response_retry_after(seconds: float, header: str) -> None:
    response = error_response(errors.ServerUnavailable("queue is full", retry_after_s=seconds))
    assert response.status_code == 503
    assert response.headers["retry-after"] == header
    assert orjson.loads(response.body) == {"error": "queue is full"}


@pytest.mark.parametrize("cls", errors.all_error_classes(), ids=lambda cls: cls.__name__)
def test_error_response_for_every_class(cls: type[ServerError]) -> None:
    response = error_response(cls("m\u00e9ssage"))
    assert response.status_code == ERROR_TABLE[cls].http_status
    assert orjson.loads(response.body) == {"error": "m\u00e9ssage"}
