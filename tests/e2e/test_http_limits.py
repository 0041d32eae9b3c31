"""HTTP request headers are bounded on the real server: in size (431, ``--max-header-bytes``) and in time (408 or a
close, ``--header-timeout-s``), without breaking keep-alive or pipelining. Raw sockets, since clients refuse to
send such requests."""

from __future__ import annotations

import http.client
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerProcess
from tests.models import fixtures

LIMIT = 4096
TIMEOUT_S = 1.0
SLACK_S = 3.0  # two loaded cores: generous, and still far below any keep-alive or client timeout
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def bounded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("repo")
    fixtures.write_model(repo, "mlp", fixtures.float_mlp())
    server = ServerProcess(repo, "--max-header-bytes", str(LIMIT), "--header-timeout-s", str(TIMEOUT_S)).start()
    yield server
    server.stop()


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.http_port), timeout=10)


def _response(sock: socket.socket) -> http.client.HTTPResponse:
    response = http.client.HTTPResponse(sock)
    response.begin()
    response.read()
    return response


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (anything it sends first is read and dropped)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sock], [], [], left)[0]:
            try:
                if not sock.recv(65536):
                    return True
            except ConnectionResetError:
                return True
    return False


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


GET = b"GET /v2/health/live HTTP/1.1\r\nHost: test\r\n"
OVERSIZED = [
    pytest.param(GET + b"X-Big: " + b"a" * (2 * LIMIT) + b"\r\n\r\n", id="one-long-header"),
    pytest.param(GET + b"".join(b"X-H%d: 0123456789\r\n" % i for i in range(LIMIT // 10)) + b"\r\n", id="many-headers"),
    pytest.param(b"GET /v2/health/live?" + b"q" * (2 * LIMIT) + b" HTTP/1.1\r\nHost: test\r\n\r\n", id="long-url"),
    pytest.param(GET + b"X-Never-Ends: " + b"a" * (4 * LIMIT), id="unterminated-header"),
]


@pytest.mark.parametrize("request_bytes", OVERSIZED)
def test_oversized_headers_get_431_and_a_close(bounded: ServerProcess, request_bytes: bytes) -> None:
    with _connect(bounded) as sock:
        sock.sendall(request_bytes)
        response = _response(sock)
        assert response.status == 431
        assert response.getheader("connection") == "close"
        assert _closed_within(sock, SLACK_S)
    assert bounded.is_live()


def test_oversized_headers_sent_in_pieces_get_431_before_they_end(bounded: ServerProcess) -> None:
    """Counted while they arrive: a header that never ends is refused once it passes the limit."""
    with _connect(bounded) as sock:
        sock.sendall(GET + b"X-Slowly-Huge: ")
        refused = False
        for _ in range(4 * LIMIT // 512):
            try:
                sock.sendall(b"a" * 512)
            except OSError:
                break
            if select.select([sock], [], [], 0.01)[0]:
                refused = True
                break
        assert refused or select.select([sock], [], [], SLACK_S)[0], "no answer to an oversized header"
        assert _response(sock).status == 431


def test_headers_within_the_limit_are_served(bounded: ServerProcess) -> None:
    request = GET + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 100) for i in range(20)) + b"\r\n"  # ~2.4 KiB
    with _connect(bounded) as sock:
        sock.sendall(request)
        assert _response(sock).status == 200


def test_a_huge_header_is_refused_fast_without_growing_the_server(server: ServerProcess) -> None:
    """Default settings: a 32 MiB header used to be accepted into memory (+50 MiB RSS)."""
    assert server.proc is not None
    baseline = _rss_bytes(server.proc.pid)
    peak = baseline
    sending = threading.Event()
    sending.set()

    def sample() -> None:
        nonlocal peak
        while sending.is_set():
            peak = max(peak, _rss_bytes(server.proc.pid))  # type: ignore[union-attr]
            time.sleep(0.005)

    def send(sock: socket.socket) -> None:
        try:
            sock.sendall(GET + b"X-Huge: ")
            for _ in range(32):
                sock.sendall(b"a" * MIB)
        except OSError:
            pass  # refused and closed: what we want

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    with _connect(server) as sock:
        sender = threading.Thread(target=send, args=(sock,), daemon=True)
        sender.start()
        response = _response(sock)
        elapsed = time.monotonic() - started
        sender.join(10)
        sending.clear()
        sampler.join(10)
    assert response.status == 431
    assert elapsed < SLACK_S
    assert peak - baseline < 16 * MIB, f"server RSS grew by {(peak - baseline) / MIB:.1f} MiB"
    assert server.is_live()


def test_headers_trickling_in_are_cut_off_at_the_timeout(bounded: ServerProcess) -> None:
    """Slowloris: a byte every quarter second keeps the connection busy but never ends the headers."""
    with _connect(bounded) as sock:
        started = time.monotonic()
        sock.sendall(GET)
        answered = False
        while time.monotonic() - started < TIMEOUT_S + SLACK_S:
            try:
                sock.sendall(b"X")
            except OSError:
                break
            if select.select([sock], [], [], 0.25)[0]:
                answered = True
                break
        elapsed = time.monotonic() - started
        assert answered, "the server never answered a request whose headers never end"
        assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + SLACK_S
        assert _response(sock).status == 408
        assert _closed_within(sock, SLACK_S)


def test_a_connection_that_sends_nothing_is_closed(bounded: ServerProcess) -> None:
    with _connect(bounded) as sock:
        started = time.monotonic()
        assert _closed_within(sock, TIMEOUT_S + SLACK_S)
        assert time.monotonic() - started >= TIMEOUT_S * 0.8


def test_blank_lines_after_a_response_do_not_hold_the_connection(bounded: ServerProcess) -> None:
    """llhttp skips blank lines between requests without starting one: they must not keep a connection."""
    with _connect(bounded) as sock:
        sock.sendall(GET + b"\r\n")
        assert _response(sock).status == 200
        started = time.monotonic()
        closed = False
        while not closed and time.monotonic() - started < TIMEOUT_S + SLACK_S:
            try:
                sock.sendall(b"\r\n")
            except OSError:
                closed = True
                break
            closed = _closed_within(sock, 0.25)
        assert closed


def test_keep_alive_idle_longer_than_the_header_timeout_is_kept(bounded: ServerProcess) -> None:
    """Idle time between requests is keep-alive's business, not the header timeout's."""
    conn = http.client.HTTPConnection("127.0.0.1", bounded.http_port, timeout=10)
    try:
        conn.request("GET", "/v2/health/live")
        assert conn.getresponse().read() and conn.sock is not None
        sock = conn.sock
        time.sleep(TIMEOUT_S * 1.5)
        conn.request("GET", "/v2/health/ready")
        assert conn.getresponse().status == 200
        assert conn.sock is sock
    finally:
        conn.close()


def test_slow_headers_within_the_timeout_are_served(bounded: ServerProcess) -> None:
    with _connect(bounded) as sock:
        for piece in (b"GET /v2/health/live HTTP/1.1\r\n", b"Host: test\r\n", b"X-A: 1\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(TIMEOUT_S / 8)
        assert _response(sock).status == 200


def test_pipelined_requests_are_all_served(bounded: ServerProcess) -> None:
    body = b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1,2,3,4,5,6,7,8]}]}'
    post = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with _connect(bounded) as sock:
        sock.sendall(GET + b"\r\n" + post + GET + b"\r\n" + post)
        assert _statuses(sock, 4) == [200, 200, 200, 200]


def _statuses(sock: socket.socket, count: int) -> list[int]:
    """The statuses of the next ``count`` responses on ``sock`` (one buffer: they may arrive together)."""
    data, statuses = b"", list[int]()
    while len(statuses) < count:
        end = data.find(b"\r\n\r\n")
        head = data[:end].lower().split(b"\r\n") if end >= 0 else []
        length = next((int(line.split(b":")[1]) for line in head if line.startswith(b"content-length:")), 0)
        if end >= 0 and len(data) >= end + 4 + length:
            statuses.append(int(head[0].split()[1]))
            data = data[end + 4 + length :]
            continue
        chunk = sock.recv(65536)
        assert chunk, f"closed after {statuses}"
        data += chunk
    return statuses


def test_a_client_that_expects_100_continue_gets_it_and_then_its_answer(bounded: ServerProcess) -> None:
    """The interim response is the first write of the request's cycle, which server/http/protocol.py holds for a
    body: it must still leave at once (the client waits for it before sending its body)."""
    body = b'{"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1,2,3,4,5,6,7,8]}]}'
    head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: test\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n"
    with _connect(bounded) as sock:
        sock.sendall(head % len(body))
        assert select.select([sock], [], [], 5)[0], "no 100 Continue within 5 s"
        interim = sock.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n"), interim
        sock.sendall(body)
        rest = interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
        if rest:  # the server may have sent more already; it is the final answer's start
            pytest.fail(f"an answer before the body was sent: {rest!r}")
        response = _response(sock)
        assert response.status == 200
