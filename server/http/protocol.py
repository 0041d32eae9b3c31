"""uvicorn's httptools protocol with the two bounds on request headers that neither uvicorn nor httptools has.

- **Size.** httptools keeps a header's name and value in memory until the header ends, with no limit, so one
  32 MiB header was accepted (+50 MiB RSS) before ``max_request_bytes`` (a body limit) could apply. Here the
  request line plus headers may take ``max_header_bytes``: 431 beyond, and the connection closes. The bytes of
  headers still arriving are counted per read, so memory stays within the limit plus one socket read.
- **Time.** uvicorn's keep-alive timeout covers only idle time after a response, so a client sending a header
  byte a second, or nothing at all after connecting, held its connection forever. Here a request line and
  headers must be complete ``header_timeout_s`` after their first byte (after connecting, for a connection's
  first request): 408 beyond (a silent close when nothing was sent), and the connection closes.

It also writes each response's status line and headers together with its body (:class:`OneWriteResponse`).

uvicorn[standard] always brings httptools, and the server picks it explicitly (server/app.py); h11, the
pure-Python alternative, is several times slower on the inference path.
"""

from __future__ import annotations

import asyncio
import logging
from http import HTTPStatus
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from server.http.codec import dumps

log = logging.getLogger("optiserve.http")
LINGER_S = 1.0
"""How long a refused connection is still read (and its bytes dropped) before it is closed."""


class BoundedHeadersProtocol(HttpToolsProtocol):  # type: ignore[misc]
    """HttpToolsProtocol that refuses oversized headers (431) and closes connections whose headers are too
    slow (408). Use :func:`bounded_headers_protocol` to set the bounds."""

    max_header_bytes = 64 * 1024
    header_timeout_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_message = False  # between a message's first byte and its end
        self._in_headers = False  # between a message's first byte and the end of its headers
        self._messages_begun = 0
        self._header_bytes = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._refusal: tuple[int, str] | None = None

    # ---- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refusal is not None:
            return
        begun, idle = self._messages_begun, not self._in_message
        super().data_received(data)
        if self.transport.is_closing():
            self._cancel_header_timer()
            return
        if self._refusal is None and self._in_headers:
            if self._messages_begun == begun:  # the whole read belongs to the headers still arriving
                self._header_bytes += len(data)
            elif idle and self._messages_begun == begun + 1:  # they began with this read
                self._header_bytes = len(data)
            # else they began after another message ended inside this read: that share goes uncounted (at most
            # one read), and the next read counts in full.
            if self._header_bytes > self.max_header_bytes:
                self._refusal = (431, self._too_large())
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif not self._in_message and self._header_timer is None and self._answered():
            self._arm_header_timer()  # bytes that begin no message (blank lines) count as headers' time too

    # ---- httptools parser callbacks ---------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_message = self._in_headers = True
        self._messages_begun += 1
        self._header_bytes = 0
        if self._header_timer is None:  # armed already when this is a connection's first request
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        if self._refusal is not None:
            return
        self._in_headers = False
        self._cancel_header_timer()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_header_bytes:  # all of them arrived within one read: not counted in data_received
            self._refusal = (431, self._too_large())
            return  # no request cycle is started; data_received answers and closes
        super().on_headers_complete()
        if self.cycle is not None:
            self.cycle.transport = cast(asyncio.Transport, OneWriteResponse(self.transport, self.loop))  # duck-typed

    def on_body(self, body: bytes) -> None:
        if self._refusal is None:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refusal is None:
            super().on_message_complete()
            self._in_message = self._in_headers = False

    # ---- helpers ----------------------------------------------------------------------------------
    def _too_large(self) -> str:
        return f"request line and headers exceed the limit of {self.max_header_bytes} bytes (max_header_bytes)"

    def _answered(self) -> bool:
        """No response of an earlier request is still being written on this connection."""
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self._in_message and not self._in_headers):
            return
        if not self._answered():
            self.cycle.keep_alive = False  # an earlier request is still being answered: close after it
            return
        if self._in_headers:
            self._refuse(408, f"request headers were not complete within {self.header_timeout_s:g} s")
        else:
            self.transport.close()  # connected (or kept alive) and sent nothing

    def _refuse(self, status: int, message: str) -> None:
        """Answer ``status`` with the protocol's error body and close, unless another response is being
        written on this connection (then only close). The close lingers: what the client still sends is read
        and dropped for up to LINGER_S, since closing with unread bytes resets the connection and the client's
        kernel may then discard the answer before the client reads it."""
        self._refusal = (status, message)  # from now on data_received drops everything
        self._cancel_header_timer()
        log.warning("%s %s", status, message)
        if self._answered():
            body = dumps({"error": message})
            head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode("ascii")]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head.append(
                b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
            )
            self.transport.write(b"".join(head) + body)
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer, then FIN; reading goes on until the client closes
                self._header_timer = self.loop.call_later(LINGER_S, self.transport.close)
                return
        self.transport.close()


class OneWriteResponse:
    """One request cycle's view of its connection: the response's first write (its status line and headers) waits
    for the next, its body, and both leave in one ``writelines``. uvicorn writes them apart, which costs two send
    calls and two TCP segments per small response (on loopback each send took ~35-60 µs of the event loop at c=1,
    the kernel delivering to the client inside it). A held write is flushed before a close and at the end of the
    loop's current iteration, so nothing waits for a body that comes later (a streamed response) or never."""

    __slots__ = ("_first", "_held", "_loop", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._first = True
        self._held: bytes | None = None

    def write(self, data: bytes) -> None:
        if self._first:
            self._first = False
            self._held = data
            self._loop.call_soon(self._flush)
        elif self._held is not None:
            held, self._held = self._held, None
            self._transport.writelines((held, data))
        else:
            self._transport.write(data)

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def bounded_headers_protocol(max_header_bytes: int, header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to hand uvicorn (``uvicorn.Config(http=...)``), with these bounds."""
    return type(
        "BoundedHeadersProtocol",
        (BoundedHeadersProtocol,),
        {"max_header_bytes": max_header_bytes, "header_timeout_s": header_timeout_s},
    )
