"""HeaderDeadlineProtocol behind a response still being sent: a pipelined request's refusal waits for it.

`serve`-level behaviour (408, 431, stray bytes) is tested against the real command in tests/test_serve.py; here
uvicorn runs in-process with the protocol, so a route can hold its response open while the next request arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.server_protocol import MAX_HEADER_BYTES, HeaderDeadlineProtocol, worker_settings
from tests.observability.support import AccessLogWaiter, access_log_records
from tests.support.servers import serve


@pytest.fixture
def header_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give the protocol a settings environment (it reads REQUEST_HEADER_TIMEOUT_SECONDS from there)."""
    monkeypatch.setenv("ELEVENLABS_API_KEY", "xi-protocol-test-key")
    monkeypatch.setenv("ALLOWED_AGENT_IDS", "agent_demo")
    monkeypatch.setenv("JWT_HS256_SECRET", "s" * 40)
    monkeypatch.setenv("REQUEST_HEADER_TIMEOUT_SECONDS", "1")
    worker_settings.cache_clear()
    yield
    worker_settings.cache_clear()


def held_response_app(release: threading.Event) -> Starlette:
    """Build an app whose /held response sends 'a', waits for `release`, then sends 'b'."""

    async def held(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            await asyncio.to_thread(release.wait, 10)
            yield b"b"

        return StreamingResponse(body(), media_type="text/plain")

    return Starlette(routes=[Route("/held", held)])


def assert_logged_once(waiter: AccessLogWaiter, refusal: bytes, status: int, method: str) -> None:
    """Check that `refusal` has exactly one access record, carrying its request id, status and method."""
    [request_id] = [
        line.split(b":", 1)[1].strip().decode()
        for line in refusal.partition(b"\r\n\r\n")[0].split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    ]
    [record] = [record for record in waiter.records if getattr(record, "request_id", None) == request_id]
    assert (getattr(record, "route", None), getattr(record, "status", None)) == ("unmatched", status)
    assert getattr(record, "method", None) == method


def read_until_closed(sock: socket.socket) -> bytes:
    """Return everything received until the server closes the connection."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@contextlib.contextmanager
def held_connection() -> Iterator[tuple[threading.Event, AccessLogWaiter, socket.socket]]:
    """Serve an app whose /held response waits for the event; yield the event, the access log and a connection."""
    release = threading.Event()
    with (
        access_log_records() as waiter,
        serve(held_response_app(release), lifespan="off", ws="none", http=HeaderDeadlineProtocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        yield release, waiter, sock


@pytest.mark.parametrize(
    ("pipelined", "status"),
    [
        (b"GET /next HTTP/1.1\r\nX-Pad: " + b"p" * (MAX_HEADER_BYTES + 1024), b"431"),  # too large
        (b"GET /next HTTP/1.1\r\nHost: gat", b"408"),  # too slow (the deadline is 1 s here)
    ],
    ids=["431", "408"],
)
def test_refusal_of_a_pipelined_request_waits_for_the_response_in_progress(
    header_timeout: None, pipelined: bytes, status: bytes
) -> None:
    with held_connection() as (release, waiter, sock):
        sock.sendall(b"GET /held HTTP/1.1\r\nHost: gateway\r\n\r\n" + pipelined)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 "), first
        if status == b"408":
            # The header deadline passes while the response is held; nothing may be written into it.
            sock.settimeout(1.5)
            with pytest.raises(TimeoutError):
                sock.recv(65536)
            sock.settimeout(10)
        # Held back, the refusal is not logged yet: its line comes with its bytes, once.
        assert waiter.records == []
        release.set()
        rest = read_until_closed(sock)
    response, _, refusal = (first + rest).partition(b"0\r\n\r\n")  # the end of the chunked 200
    assert response.endswith(b"1\r\nb\r\n"), response
    assert refusal.startswith(b"HTTP/1.1 " + status + b" "), refusal[:80]
    assert_logged_once(waiter, refusal, int(status), "GET")


def test_an_unparsable_pipelined_request_is_refused_after_the_response_in_progress(
    header_timeout: None,
) -> None:
    # Its 400 was written at once: before the valid request's response, which was then never sent.
    with held_connection() as (release, waiter, sock):
        sock.sendall(b"GET /held HTTP/1.1\r\nHost: gateway\r\n\r\nGARBAGE\r\n\r\n")
        first = sock.recv(65536)
        release.set()
        rest = read_until_closed(sock)
    assert first.startswith(b"HTTP/1.1 200 "), first[:80]
    response, _, refusal = (first + rest).partition(b"0\r\n\r\n")  # the end of the chunked 200
    assert response.endswith(b"1\r\nb\r\n"), response
    assert refusal.startswith(b"HTTP/1.1 400 "), refusal[:80]
    assert b"application/problem+json" in refusal
    assert_logged_once(waiter, refusal, 400, "OTHER")  # the request line never got as far as a method
