"""server.http.fast.InferFastPath in front of FastAPI: an unexpected error on a fall-through route is answered
with the 500 error body and stays there; it does not reach uvicorn, which would drop the keep-alive connection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import MutableMapping
from typing import Any

import orjson
import pytest
from fastapi import FastAPI

from server.auth import AccessPolicy
from server.http.app import _install_error_handlers
from server.http.fast import InferFastPath
from server.protocol import tensors
from server.settings import Settings


def _fast_path(app: Any) -> InferFastPath:
    settings = Settings()
    limits = tensors.Limits(settings.max_tensor_elements, settings.max_tensor_rank, settings.max_inputs)
    return InferFastPath(app, None, settings.max_request_bytes, limits, AccessPolicy.from_settings(settings))  # type: ignore[arg-type]


async def _get(app: Any, path: str) -> list[MutableMapping[str, Any]]:
    sent: list[MutableMapping[str, Any]] = []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def test_an_unexpected_error_is_answered_500_and_kept_from_the_server(caplog: pytest.LogCaptureFixture) -> None:
    app = FastAPI()
    _install_error_handlers(app)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("a bug")

    with caplog.at_level(logging.ERROR, logger="optiserve.http"):
        sent = asyncio.run(_get(_fast_path(app), "/boom"))  # raising here is what made uvicorn drop the connection
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 500
    assert orjson.loads(sent[1]["body"]) == {"error": "internal error: RuntimeError: a bug"}
    assert "internal error answered with 500: GET /boom" in caplog.text


def test_an_error_before_any_answer_still_reaches_the_server() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("nothing was sent")

    with pytest.raises(RuntimeError, match="nothing was sent"):
        asyncio.run(_get(_fast_path(broken), "/v2/health/live"))
