"""The HTTP inference endpoint: a bare ASGI app in front of FastAPI.

Profiling the MLP at concurrency 16 showed FastAPI/Starlette's middleware stack, routing and dependency
solving taking about two thirds of the event loop's time per request, more than our own decode, batching
and encode. ``POST .../infer`` is therefore answered here, and only here: FastAPI holds a docs-only entry for
it (so /docs documents it) that never serves. Everything else falls through to FastAPI unchanged; replies and
errors are written by server/http/responses.py for both.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import ASGIApp, Message, Receive, Send
from starlette.types import Scope as ASGIScope

from server.auth import AccessPolicy, Scope
from server.dataplane import DataPlane
from server.errors import ClientGone, InternalError, ServerError
from server.http.body import read_body
from server.http.codec import decode_request, encode_response
from server.http.responses import send_error, send_inference_reply
from server.protocol import tensors
from server.protocol.shared_memory import SharedMemoryRegistry
from server.tracing import CURRENT, Tracer

log = logging.getLogger("optiserve.http")
T = TypeVar("T")

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferFastPath:
    """ASGI middleware: serves inference requests itself (the only handler for them), passes everything else
    to ``app``."""

    def __init__(
        self,
        app: ASGIApp,
        dataplane: DataPlane,
        max_body: int,
        limits: tensors.Limits,
        access: AccessPolicy,
        regions: SharedMemoryRegistry | None = None,
        tracer: Tracer | None = None,
    ):
        self.app = app
        self.tracer = tracer or Tracer()
        self.regions = regions
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

        async def tracking_send(message: Message) -> None:
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
        if not self.tracer.enabled:
            await self._serve(model, version, headers, scope, receive, send)
            return
        trace = self.tracer.start("http", model, version, headers)
        token = CURRENT.set(trace)
        error: BaseException | None = None
        try:
            error = await self._serve(model, version, headers, scope, receive, send)
        finally:
            CURRENT.reset(token)
            trace.finish(error)

    async def _serve(
        self, model: str, version: str, headers: dict[str, str], scope: ASGIScope, receive: Receive, send: Send
    ) -> BaseException | None:
        """Answer one inference request; the error it was answered with, if any (for its span)."""
        try:
            if self.guarded:
                client = scope.get("client")
                self.access.check(Scope.INFERENCE, headers.get("authorization"), client[0] if client else None)
            with self.dataplane.inference(model, version) as call:
                body = await read_body(receive, headers, self.max_body)
                length = headers.get("inference-header-content-length")
                request = decode_request(body, length, model, version, self.limits, self.regions)
                response = await unless_disconnected(receive, call.infer(request))
                content, header_length = encode_response(response, request, self.regions)
        except ClientGone as exc:
            return exc  # nobody is listening; the queued work was dropped
        except ServerError as exc:
            await send_error(send, exc)
            return exc
        except Exception as exc:  # never leak a traceback, never kill the connection without an answer
            await send_error(send, InternalError(f"internal error: {type(exc).__name__}: {exc}"))
            return exc
        await send_inference_reply(send, content, header_length)
        return None


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
