"""Reading a request body at the ASGI level, with the size limits, for every HTTP handler that takes one."""

from __future__ import annotations

from starlette.types import Receive

from server.errors import ClientGone, PayloadTooLarge
from server.http.codec import decompress
from server.protocol.numbers import is_ascii_uint


async def read_body(receive: Receive, headers: dict[str, str], limit: int) -> bytes:
    """The whole request body, refused (413) past ``limit`` before or after decompression. ``headers`` are
    keyed in lower case."""
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
