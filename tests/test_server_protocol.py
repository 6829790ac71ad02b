"""HeaderDeadlineProtocol behind a response still being sent: a pipelined request's refusal waits for it.

`serve`-level behaviour (408, 431, stray bytes) is tested against the real command in tests/test_serve.py; here
uvicorn runs in-process with the protocol, so a route can hold its response open while the next request arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.server_protocol import (
    MAX_HEADER_BYTES,
    HeaderDeadlineProtocol,
    HeadWithBodyTransport,
    worker_settings,
)
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


def held_route(release: threading.Event) -> Route:
    """Return a /held route whose response sends 'a', waits for `release`, then sends 'b'."""

    async def held(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"a"
            await asyncio.to_thread(release.wait, 10)
            yield b"b"

        return StreamingResponse(body(), media_type="text/plain")

    return Route("/held", held)


def held_response_app(release: threading.Event) -> Starlette:
    """Build an app with only the /held route."""
    return Starlette(routes=[held_route(release)])


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


# --- the response head leaves with the first body bytes -----------------------------------------------------


class WriteRecorder:
    """The connection's real transport, with every write (and writelines, joined) recorded before it is sent."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport = transport
        self._writes = writes

    def write(self, data: bytes) -> None:
        """Record `data`, then send it."""
        self._writes.append(bytes(data))
        self._transport.write(data)

    def writelines(self, chunks: Iterable[bytes]) -> None:
        """Record the chunks as one write (one send), then send them."""
        chunks = list(chunks)
        self._writes.append(b"".join(chunks))
        self._transport.writelines(chunks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def recording_protocol(writes: list[bytes]) -> type[HeaderDeadlineProtocol]:
    """Return `serve`'s protocol with its connections' writes recorded in `writes`."""

    class Recording(HeaderDeadlineProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(WriteRecorder(transport, writes))  # type: ignore[arg-type]

    return Recording


def head_test_app(release: threading.Event) -> Starlette:
    """Build an app with a short answer, a held stream, a failure after the head and a body echo."""

    async def short(request: Request) -> Response:
        return Response(b"short answer", media_type="text/plain")

    async def failing(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            no_chunks: tuple[bytes, ...] = ()
            for chunk in no_chunks:  # none: the generator fails before its first chunk
                yield chunk
            raise RuntimeError("failed after the head")

        return StreamingResponse(body(), media_type="text/plain")

    async def echo(request: Request) -> Response:
        return Response(await request.body(), media_type="text/plain")

    async def empty(request: Request) -> Response:
        return Response(status_code=204)

    return Starlette(
        routes=[
            Route("/short", short, methods=["GET", "HEAD"]),
            held_route(release),
            Route("/failing", failing),
            Route("/echo", echo, methods=["POST"]),
            Route("/empty", empty, methods=["DELETE"]),
        ]
    )


@contextlib.contextmanager
def recorded_connection() -> Iterator[tuple[threading.Event, list[bytes], socket.socket]]:
    """Serve `head_test_app` under a recording protocol; yield the release event, the writes and a connection."""
    release, writes = threading.Event(), list[bytes]()
    protocol = recording_protocol(writes)
    with (
        serve(head_test_app(release), lifespan="off", ws="none", http=protocol) as server,
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock,
    ):
        yield release, writes, sock


def read_response(sock: socket.socket, end: bytes) -> bytes:
    """Return what the server sends until the received bytes end with `end`."""
    received = b""
    while not received.endswith(end):
        chunk = sock.recv(65536)
        assert chunk, f"closed early after {received!r}"
        received += chunk
    return received


def test_a_short_answer_is_sent_head_and_body_in_one_write(header_timeout: None) -> None:
    with recorded_connection() as (_, writes, sock):
        sock.sendall(b"GET /short HTTP/1.1\r\nHost: gateway\r\n\r\n")
        response = read_response(sock, b"short answer")
        sock.sendall(b"GET /short HTTP/1.1\r\nHost: gateway\r\n\r\n")  # the next cycle on the same connection
        second = read_response(sock, b"short answer")
    assert response.startswith(b"HTTP/1.1 200 "), response
    assert writes == [response, second]


def test_a_streamed_answer_sends_its_head_with_the_first_chunk_and_each_later_chunk_at_once(
    header_timeout: None,
) -> None:
    with recorded_connection() as (release, writes, sock):
        sock.sendall(b"GET /held HTTP/1.1\r\nHost: gateway\r\n\r\n")
        first = read_response(sock, b"1\r\na\r\n")  # received while the second chunk is still held back
        assert writes == [first]
        assert first.startswith(b"HTTP/1.1 200 ") and b"transfer-encoding: chunked" in first
        release.set()
        rest = read_response(sock, b"0\r\n\r\n")
    assert b"".join(writes[1:]) == rest
    assert rest.startswith(b"1\r\nb\r\n")


def test_an_answer_without_content_is_sent_whole_in_one_write(header_timeout: None) -> None:
    with recorded_connection() as (_, writes, sock):
        sock.sendall(b"DELETE /empty HTTP/1.1\r\nHost: gateway\r\n\r\n")
        response = read_response(sock, b"\r\n\r\n")
        sock.sendall(b"GET /short HTTP/1.1\r\nHost: gateway\r\n\r\n")  # nothing of the 204 was left behind
        after = read_response(sock, b"short answer")
    assert response.startswith(b"HTTP/1.1 204 "), response
    assert after.startswith(b"HTTP/1.1 200 ")
    assert writes == [response, after]


def test_a_head_answer_is_sent_although_no_body_follows(header_timeout: None) -> None:
    with recorded_connection() as (_, writes, sock):
        sock.sendall(b"HEAD /short HTTP/1.1\r\nHost: gateway\r\n\r\n")
        response = read_response(sock, b"\r\n\r\n")
        sock.sendall(b"GET /short HTTP/1.1\r\nHost: gateway\r\n\r\n")  # the HEAD answer was whole
        after = read_response(sock, b"short answer")
    assert response.startswith(b"HTTP/1.1 200 ") and b"content-length: 12" in response
    assert after.startswith(b"HTTP/1.1 200 ")
    assert writes == [response, after]


def test_a_100_continue_is_sent_before_the_request_body_is_read(header_timeout: None) -> None:
    with recorded_connection() as (_, writes, sock):
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: gateway\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        )
        interim = read_response(sock, b"\r\n\r\n")  # never comes if it were held for the response
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"hello")
        response = read_response(sock, b"hello")
    assert response.startswith(b"HTTP/1.1 200 ")
    # Such a response is written as uvicorn writes it (head, then body): its connection's first write is no head.
    assert writes[0] == interim
    assert b"".join(writes[1:]) == response


def test_a_failure_after_the_head_sends_the_head_then_closes(header_timeout: None) -> None:
    with recorded_connection() as (_, writes, sock):
        sock.sendall(b"GET /failing HTTP/1.1\r\nHost: gateway\r\n\r\n")
        received = read_until_closed(sock)
    # As uvicorn alone does: what the app sent is not dropped, and the missing end tells the client it failed.
    assert received.startswith(b"HTTP/1.1 200 ") and received.endswith(b"\r\n\r\n"), received
    assert writes == [received]


def test_the_head_holding_transport_joins_only_the_head_to_what_follows() -> None:
    sent: list[tuple[str, bytes]] = []

    class Sink(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            sent.append(("write", bytes(data)))

        def close(self) -> None:
            sent.append(("close", b""))

        def is_closing(self) -> bool:
            return False

    held = HeadWithBodyTransport(Sink(extra={"peername": ("127.0.0.1", 50000)}))
    assert held.get_extra_info("peername") == ("127.0.0.1", 50000)
    held.write(b"head")
    assert sent == []
    held.write(b"body1")
    held.write(b"body2")
    held.close()
    assert sent == [("write", b"headbody1"), ("write", b"body2"), ("close", b"")]
    assert not held.is_closing()

    sent.clear()
    unanswered = HeadWithBodyTransport(Sink())
    unanswered.write(b"head")
    unanswered.close()
    assert sent == [("write", b"head"), ("close", b"")]
