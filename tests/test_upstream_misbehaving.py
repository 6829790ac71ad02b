"""The upstream client against upstreams that break HTTP or JSON rules, over real loopback sockets.

Raw asyncio servers stand in for what the emulator cannot do on purpose: hang up before the status line,
send a response nobody asked for, trickle bytes, inflate a small gzip body into a huge one, or send JSON
that Python's parser accepts and JSON forbids.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from service.errors import UpstreamError
from tests.test_upstream import harness, outcomes

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
PAGE = b'{"conversations":[],"has_more":false}'


def json_response(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> bytes:
    """Return a complete keep-alive HTTP/1.1 JSON response."""
    head = b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" % (status, len(body))
    return head + extra + b"\r\n" + body


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """Read one request head (and its Content-Length body, if any); return the head."""
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    if match:
        await reader.readexactly(int(match.group(1)))
    return head


@contextlib.asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[str]:
    """Run `handler` for every connection to a loopback server; yield the server's base URL."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await handler(reader, writer)
        writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


def answering(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> Handler:
    """Return a handler answering every request on a connection with the same JSON response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(json_response(body, status=status, extra=extra))
            await writer.drain()

    return handler


# --- JSON that Python accepts and JSON forbids ------------------------------------------------------------


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
async def test_non_finite_numbers_are_a_malformed_response(constant: bytes) -> None:
    # json.loads accepts them; the gateway could not render them again (a 500 at the route).
    body = b'{"conversation_id":"conv_1","metadata":{"call_duration_secs":%s}}' % constant
    async with raw_upstream(answering(body)) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.get_conversation("conv_1")
    assert outcomes(h, "get") == ["malformed"]


async def test_deeply_nested_json_is_a_malformed_response() -> None:
    body = b'{"conversation_id":"conv_1","analysis":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    async with raw_upstream(answering(body)) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):  # not a RecursionError
            await h.client.get_conversation("conv_1")
    assert outcomes(h, "get") == ["malformed"]


async def test_a_reason_phrase_that_is_not_utf8_is_ignored() -> None:
    # RFC 9112 allows obs-text (bytes 0x80-0xFF) in a reason phrase.
    async with raw_upstream(answering(PAGE, status=b"200 D\xe9j\xe0 vu")) as url, harness(url) as h:
        page = await h.client.list_conversations([])
    assert page == {"conversations": [], "has_more": False}


async def test_a_json_answer_echoing_the_api_key_is_refused() -> None:
    # An upstream (or a debugging intermediary) that echoes request headers into a 2xx body: the list route
    # passes unknown fields through, so the key would reach the caller.
    async def echo_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            echoed = json.dumps({"conversations": [], "has_more": False, "debug": head.decode()})
            writer.write(json_response(echoed.encode()))
            await writer.drain()

    async with raw_upstream(echo_headers) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.list_conversations([])
    assert outcomes(h, "list") == ["malformed"]


# --- a hang-up before the status line: the outcome is unknown ---------------------------------------------


def hanging_up_first(requests: list[bytes], *, answer: bytes) -> Handler:
    """Return a handler that records each request line, hangs up on the first request, answers the rest."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            requests.append((await read_request(reader)).split(b"\r\n", 1)[0])
            if len(requests) == 1:
                return  # the request may have been acted on; no status line ever comes
            writer.write(json_response(answer))
            await writer.drain()

    return handler


async def test_a_delete_is_sent_once_when_upstream_hangs_up_before_answering() -> None:
    # DESIGN 6: no retry on POST/DELETE. aiohttp re-sent it on its own; the second DELETE then found the
    # conversation gone and the caller was told 404 although upstream had deleted it.
    requests: list[bytes] = []
    async with raw_upstream(hanging_up_first(requests, answer=b"{}")) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="upstream connection failed"):
            await h.client.delete_conversation("conv_1")
    assert requests == [b"DELETE /v1/convai/conversations/conv_1 HTTP/1.1"]
    assert outcomes(h, "delete") == ["transport_error"]


async def test_a_get_is_retried_within_its_budget_when_upstream_hangs_up_before_answering() -> None:
    requests: list[bytes] = []
    async with raw_upstream(hanging_up_first(requests, answer=PAGE)) as url, harness(url) as h:
        assert await h.client.list_conversations([]) == {"conversations": [], "has_more": False}
    assert len(requests) == 2
    assert outcomes(h, "list") == ["transport_error", "ok"]
    assert len(h.sleeps) == 1  # one jittered back-off, as for any retried GET


async def test_no_retry_beyond_the_configured_count_on_a_hang_up() -> None:
    requests: list[bytes] = []
    async with raw_upstream(hanging_up_first(requests, answer=PAGE)) as url, harness(url, max_retries=0) as h:
        with pytest.raises(UpstreamError, match="upstream connection failed"):
            await h.client.list_conversations([])
    assert len(requests) == 1
