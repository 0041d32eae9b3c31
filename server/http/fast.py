"""The inference hot path as a bare ASGI app in front of FastAPI.

Profiling the MLP at concurrency 16 showed FastAPI/Starlette's middleware stack, routing and dependency
solving taking about two thirds of the event loop's time per request, more than our own decode, batching
and encode. ``POST .../infer`` is therefore answered here directly, with the same codec, access policy and
error table as the FastAPI route (which stays registered so /docs documents it). Everything else falls
through to FastAPI unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, TypeVar

from server import tensors
from server.auth import AccessPolicy, Scope
from server.dataplane import ClientGone, DataPlane
from server.errors import InternalError, PayloadTooLarge, ServerError
from server.http.codec import decode_request, decompress, encode_response
from server.numbers import is_ascii_uint

log = logging.getLogger("optiserve.http")
ASGIScope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[ASGIScope, Receive, Send], Awaitable[None]]
T = TypeVar("T")
__all__ = ["ClientGone", "InferFastPath", "read_body", "unless_disconnected"]

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferFastPath:
    """ASGI middleware: serves inference requests itself, passes everything else to ``app``."""

    def __init__(self, app: ASGIApp, dataplane: DataPlane, max_body: int, limits: tensors.Limits, access: AccessPolicy):
        self.app = app
        self.dataplane = dataplane
        self.max_body = max_body
        self.limits = limits
        self.access = access
        self.guarded = access.guards(Scope.INFERENCE)

    async def __call__(self, scope: ASGIScope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await self._infer(match.group(1), match.group(2) or "", scope, receive, send)
                return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        answered = False

        async def tracking_send(message: MutableMapping[str, Any]) -> None:
            nonlocal answered
            await send(message)
            answered = message["type"] == "http.response.body" and not message.get("more_body", False)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if not answered:
                raise
            # Starlette answers an unexpected error with the 500 error body and then raises it again, and uvicorn
            # would drop the keep-alive connection for it. The answer is out: log the error, keep the connection.
            log.exception("internal error answered with 500: %s %s", scope.get("method"), scope.get("path"))

    async def _infer(self, model: str, version: str, scope: ASGIScope, receive: Receive, send: Send) -> None:
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        try:
            if self.guarded:
                client = scope.get("client")
                self.access.check(Scope.INFERENCE, headers.get("authorization"), client[0] if client else None)
            with self.dataplane.inference(model, version) as call:
                body = await read_body(receive, headers, self.max_body)
                length = headers.get("inference-header-content-length")
                request = decode_request(body, length, model, version, self.limits)
                response = await unless_disconnected(receive, call.infer(request))
                content, header_length = encode_response(response, request)
        except ClientGone:
            return  # nobody is listening; the queued work was dropped
        except ServerError as exc:
            await _send_error(send, exc)
            return
        except Exception as exc:  # never leak a traceback, never kill the connection without an answer
            await _send_error(send, InternalError(f"internal error: {type(exc).__name__}: {exc}"))
            return
        await _send(send, 200, content, header_length)


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, refused (413) past ``limit`` before or after decompression."""
    declared = headers.get("content-length")
    if declared is not None and is_ascii_uint(declared) and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone("client disconnected while sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return decompress(body, headers.get("content-encoding", ""), limit)


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work`` in this task; a watcher cancels it if the client disconnects first, so a queued
    request is dropped instead of computed for nobody. One extra task per request, no polling."""
    current = asyncio.current_task()
    gone = asyncio.Event()

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        gone.set()
        if current is not None:
            current.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        return await work
    except asyncio.CancelledError:
        if gone.is_set():
            if current is not None and hasattr(current, "uncancel"):
                current.uncancel()
            raise ClientGone("client disconnected before its response was ready") from None
        raise
    finally:
        watcher.cancel()


async def _send(send: Send, status: int, content: bytes, header_length: int | None) -> None:
    headers = [(b"content-length", str(len(content)).encode())]
    if header_length is None:
        headers.append((b"content-type", b"application/json"))
    else:
        headers.append((b"content-type", b"application/octet-stream"))
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def _send_error(send: Send, error: ServerError) -> None:
    from server.http.app import error_response  # the one error encoding, shared with FastAPI's handlers

    response = error_response(error)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
