"""Every HTTP reply the server writes: JSON replies and the one error encoding, as Starlette responses for the
FastAPI routes and as raw ASGI messages for the inference endpoint (server/http/fast.py)."""

from __future__ import annotations

import math
from typing import Any

from starlette.responses import Response
from starlette.types import Send

from server.errors import ServerError, wire_status
from server.http.codec import dumps

JSON = "application/json"


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A JSON reply encoded with orjson."""
    return Response(dumps(value), status_code=status, media_type=JSON, headers=headers)


def error_response(error: ServerError) -> Response:
    """The protocol's error body ``{"error": ...}`` with the status from the one error table."""
    headers = {}
    if error.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return json_response({"error": error.message}, wire_status(error).http_status, headers)


async def send_inference_reply(send: Send, content: bytes, header_length: int | None) -> None:
    """A 200 inference reply: JSON, or (``header_length`` given) a JSON header followed by binary tensors."""
    headers = [(b"content-length", str(len(content)).encode())]
    if header_length is None:
        headers.append((b"content-type", b"application/json"))
    else:
        headers.append((b"content-type", b"application/octet-stream"))
        headers.append((b"inference-header-content-length", str(header_length).encode()))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def send_error(send: Send, error: ServerError) -> None:
    """:func:`error_response` written as raw ASGI messages."""
    response = error_response(error)
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
