"""server.http.protocol.OneWriteResponse: a response's head leaves with its body in one write, and nothing is
held back longer than the loop's current iteration or past a close."""

from __future__ import annotations

import asyncio
from typing import Any

from server.http.protocol import OneWriteResponse


class RecordingTransport:
    """The calls a transport got, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        self.calls.append(("write", data))

    def writelines(self, parts: Any) -> None:
        self.calls.append(("writelines", list(parts)))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def is_closing(self) -> bool:
        return self.closing

    def get_extra_info(self, name: str) -> str:
        return f"extra:{name}"


def _in_a_loop(scenario: Any) -> None:
    asyncio.run(scenario())


def _writer() -> tuple[RecordingTransport, OneWriteResponse]:
    """A recording transport and the response writer in front of it, on the running loop."""
    transport = RecordingTransport()
    return transport, OneWriteResponse(transport, asyncio.get_running_loop())  # type: ignore[arg-type]


def test_the_head_and_the_body_leave_in_one_call() -> None:
    async def scenario() -> None:
        transport, writer = _writer()
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        assert transport.calls == []  # held for the body
        writer.write(b"{}")
        assert transport.calls == [("writelines", [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n", b"{}"])]
        writer.write(b"more")  # later writes (a streamed body) pass straight through
        await asyncio.sleep(0)
        assert transport.calls[1:] == [("write", b"more")]

    _in_a_loop(scenario)


def test_a_head_without_a_body_in_the_same_iteration_is_flushed_at_its_end() -> None:
    async def scenario() -> None:
        transport, writer = _writer()
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0)
        assert transport.calls == [("write", b"HTTP/1.1 100 Continue\r\n\r\n")]
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")  # passes straight: only the first write waits
        assert transport.calls[1:] == [("write", b"HTTP/1.1 200 OK\r\n\r\n")]

    _in_a_loop(scenario)


def test_a_close_sends_what_is_held_first_and_other_calls_reach_the_transport() -> None:
    async def scenario() -> None:
        transport, writer = _writer()
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        writer.close()
        assert transport.calls == [("write", b"HTTP/1.1 204 No Content\r\n\r\n"), ("close", None)]
        await asyncio.sleep(0)  # the end-of-iteration flush finds nothing left
        assert len(transport.calls) == 2
        assert writer.is_closing() is True
        assert writer.get_extra_info("peername") == "extra:peername"

    _in_a_loop(scenario)
