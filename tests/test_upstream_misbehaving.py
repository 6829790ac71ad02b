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
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.errors import AudioStreamsBusy, UpstreamError, UpstreamTimeout
from service.upstream import MAX_JSON_BODY_BYTES, AiohttpUpstreamTransport, UnreadableBody, parse_json
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

    connections: set[asyncio.Task[None]] = set()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        try:
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                await handler(reader, writer)
        finally:
            writer.close()
            connections.discard(task)

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        # Handlers still serving a kept-alive connection end here, not when the loop is gone.
        for task in list(connections):
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await server.wait_closed()


def answering(body: bytes, *, status: bytes = b"200 OK", extra: bytes = b"") -> Handler:
    """Return a handler answering every request on a connection with the same JSON response."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(json_response(body, status=status, extra=extra))
            await writer.drain()

    return handler


# --- JSON that Python accepts and JSON forbids ------------------------------------------------------------


@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"123456789e999"])
async def test_non_finite_numbers_are_a_malformed_response(number: bytes) -> None:
    # json.loads accepts the constants and reads numbers beyond a double as infinities; the gateway could
    # not render them again (a 500 at the route).
    body = b'{"conversation_id":"conv_1","metadata":{"call_duration_secs":%s}}' % number
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


async def test_a_body_that_is_not_utf8_is_a_malformed_response() -> None:
    # RFC 8259: JSON between systems is UTF-8.
    body = b'{"conversations":[],"has_more":false,"note":"caf\xe9"}'
    async with raw_upstream(answering(body)) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.list_conversations([])


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


async def test_an_answer_echoing_the_api_key_set_after_the_first_call_is_refused() -> None:
    # The client prepares its request headers once and again when they change: the echo check must look for the
    # key the request went out with, not the one the client was built with.
    seen: list[bytes] = []

    async def echo_headers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            seen.append(head)
            echoed = json.dumps({"conversations": [], "has_more": False, "debug": head.decode()})
            writer.write(json_response(echoed.encode()))
            await writer.drain()

    rotated = "xi-rotated-key-6d2f0b8e"
    async with raw_upstream(echo_headers) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.list_conversations([])
        h.http.headers["xi-api-key"] = rotated
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.list_conversations([])
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.send_feedback(
                "conv_1", "like"
            )  # a request with a body: its own copy of the headers
    assert outcomes(h, "list") == ["malformed", "malformed"]
    assert outcomes(h, "feedback") == ["malformed"]
    assert [rotated.encode() in head for head in seen] == [False, True, True]


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


async def test_a_body_cut_short_is_a_bad_gateway() -> None:
    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"conv'
        )
        await writer.drain()  # then the hang-up

    async with raw_upstream(cut_short) as url, harness(url) as h:
        with pytest.raises(UpstreamError) as caught:
            await h.client.list_conversations([])
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert outcomes(h, "list") == ["transport_error"]


# --- bodies: bounded once decoded, decoded only when they can be ------------------------------------------


def gzip_bytes(data: bytes) -> bytes:
    """Compress `data` as a gzip member."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return compressor.compress(data) + compressor.flush()


async def test_a_gzip_body_inflating_past_the_limit_is_refused() -> None:
    # 64 MiB of whitespace is valid JSON; compressed, it is ~64 KB.
    bomb = gzip_bytes(PAGE[:-1] + b" " * (64 << 20) + PAGE[-1:])
    assert len(bomb) < MAX_JSON_BODY_BYTES // 100
    async with raw_upstream(answering(bomb, extra=b"Content-Encoding: gzip\r\n")) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response") as caught:
            await h.client.list_conversations([])
    assert isinstance(caught.value.__cause__, UnreadableBody)
    assert outcomes(h, "list") == ["malformed"]


@pytest.mark.parametrize("coding", [b"gzip", b"deflate"])
async def test_a_compressed_body_within_the_limit_is_decoded(coding: bytes) -> None:
    body = gzip_bytes(PAGE) if coding == b"gzip" else zlib.compress(PAGE)
    async with raw_upstream(answering(body, extra=b"Content-Encoding: " + coding + b"\r\n")) as url:
        async with harness(url) as h:
            assert await h.client.list_conversations([]) == {"conversations": [], "has_more": False}


@pytest.mark.parametrize(
    ("coding", "body"), [(b"gzip", b"not gzip at all"), (b"br", PAGE), (b"gzip", gzip_bytes(PAGE)[:-12])]
)
async def test_a_body_that_does_not_decode_is_a_malformed_response(coding: bytes, body: bytes) -> None:
    # Garbage, a coding never asked for, a gzip member cut short: 502, not a 500 (httpx.DecodingError).
    async with raw_upstream(answering(body, extra=b"Content-Encoding: " + coding + b"\r\n")) as url:
        async with harness(url) as h:
            with pytest.raises(UpstreamError, match="malformed upstream response"):
                await h.client.list_conversations([])


async def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives() -> None:
    sent = 0

    async def endless_chunks(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = b" " * 65536
        while True:  # until the client hangs up
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
            sent += len(chunk)

    async with raw_upstream(endless_chunks) as url, harness(url) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response"):
            await h.client.list_conversations([])
    assert MAX_JSON_BODY_BYTES <= sent < 4 * MAX_JSON_BODY_BYTES


# --- time: a whole answer within connect + read ------------------------------------------------------------


async def test_an_upstream_trickling_its_answer_is_a_timeout() -> None:
    # Each byte comes well within the read timeout (per socket read); the whole answer would take ~4 s.
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        answer = json_response(PAGE + b" " * 300)
        for index in range(len(answer)):
            writer.write(answer[index : index + 1])
            await writer.drain()
            await asyncio.sleep(0.01)  # the upstream's pace, the behaviour under test

    async with raw_upstream(trickle) as url, harness(url, read_timeout=0.3, connect_timeout=0.2) as h:
        with pytest.raises(UpstreamTimeout, match="did not answer in time"):
            await h.client.list_conversations([])
    assert outcomes(h, "list") == ["timeout"]


# --- audio: listeners that never finish -----------------------------------------------------------------


async def test_open_audio_streams_are_capped_and_leave_connections_for_other_calls() -> None:
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_request(reader)
            if b"/audio " in head:
                # A long recording whose listener has paused: the stream stays open until the gateway leaves.
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: audio/mpeg\r\nContent-Length: 1000000\r\n\r\nID3"
                )
                await writer.drain()
                await reader.read()
                return
            writer.write(json_response(b'{"token":"t"}'))
            await writer.drain()

    # A pool of 3 connections and at most 2 audio streams: a JSON call always finds a connection.
    limits = httpx.Limits(max_connections=3)
    async with raw_upstream(upstream) as url, harness(url, max_audio_streams=2, limits=limits) as h:
        async with contextlib.AsyncExitStack() as streams:
            for _ in range(2):
                await streams.enter_async_context(h.client.stream_audio("conv_long"))
            with pytest.raises(AudioStreamsBusy) as caught:
                await streams.enter_async_context(h.client.stream_audio("conv_long"))
            assert (caught.value.status, caught.value.headers) == (503, {"Retry-After": "5"})
            assert await h.client.get_webrtc_token("agent_demo", participant_name="u") == {"token": "t"}
        # Closed streams give their places back.
        async with h.client.stream_audio("conv_long") as audio:
            assert audio.content_type == "audio/mpeg"
    assert outcomes(h, "audio") == ["ok", "ok", "ok"]  # the refused one never reached upstream


# --- a response nobody asked for ---------------------------------------------------------------------------


def pooled_connection_has_unread_bytes(transport: AiohttpUpstreamTransport) -> bool:
    """Tell whether an idle pooled connection has received bytes (read from aiohttp's pool)."""
    session = transport.session
    assert session is not None
    pool = session.connector._conns  # type: ignore[union-attr]
    return any(protocol.should_close for connections in pool.values() for protocol, _ in connections)


async def test_a_response_arriving_on_an_idle_connection_never_answers_a_later_request() -> None:
    # A buggy upstream or intermediary sends one response too many. On a reused connection it would be read
    # as the answer to the next request: one user's token handed to another (HTTP/1.1 has no request ids).
    stray_sent = asyncio.Event()

    async def one_too_many(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = True
        while True:
            head = await read_request(reader)
            who = re.search(rb"participant_name=(\w+)", head)
            assert who is not None
            writer.write(json_response(b'{"token":"for-%s"}' % who.group(1)))
            await writer.drain()
            if first:
                first = False
                await stray_sent.wait()  # once the first caller has its answer and the connection is idle
                writer.write(json_response(b'{"token":"for-nobody"}'))
                await writer.drain()

    async with raw_upstream(one_too_many) as url, harness(url, max_retries=0) as h:
        transport = h.client._transport
        assert isinstance(transport, AiohttpUpstreamTransport)
        first = await h.client.get_webrtc_token("agent_demo", participant_name="alice")
        stray_sent.set()
        async with asyncio.timeout(5):  # until the stray bytes sit in the idle pooled connection
            while not pooled_connection_has_unread_bytes(transport):
                await asyncio.sleep(0.001)
        second = await h.client.get_webrtc_token("agent_demo", participant_name="bob")
    assert (first, second) == ({"token": "for-alice"}, {"token": "for-bob"})


# Any JSON value the gateway could be handed (text that json.dumps writes, so valid and finite).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


@given(json_values, st.booleans())
def test_an_answer_parses_to_exactly_what_the_stdlib_reads(value: object, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only).encode()
    parsed = parse_json(text)
    assert parsed == json.loads(text)
    assert json.dumps(parsed) == json.dumps(json.loads(text))  # the same types and float values throughout


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            b"-9223372036854775809",
            -9223372036854775809,
        ),  # beyond 64 bits: still an exact int (orjson: a float)
        (b"123456789012345678901234567890", 123456789012345678901234567890),
        (
            b'"\\ud800"',
            "\ud800",
        ),  # a lone surrogate: refused by the fast parser, read by the stdlib as before
        (b"-0", 0),
        (b"1E5", 100000.0),
        (b'{"a":1,"a":2}', {"a": 2}),  # the last duplicate wins, as in json.loads
    ],
    ids=["beyond-64-bits", "30-digits", "lone-surrogate", "minus-zero", "exponent", "duplicate-key"],
)
def test_answers_parse_as_the_stdlib_reads_them(text: bytes, expected: object) -> None:
    parsed = parse_json(text)
    assert parsed == expected and type(parsed) is type(expected)


@pytest.mark.parametrize(
    "text",
    [b"1" * 4301, b'{"a":1,}', b"\xef\xbb\xbf{}", b'"\x01"', b"01"],
    ids=["digits", "comma", "bom", "control", "zero"],
)
def test_what_the_stdlib_refuses_is_refused(text: bytes) -> None:
    with pytest.raises(ValueError):
        json.loads(text.decode("utf-8"))  # as text: json.loads would take the bytes' BOM as an encoding mark
    with pytest.raises(ValueError):
        parse_json(text)


async def test_an_integer_beyond_64_bits_reaches_the_route_exact() -> None:
    body = b'{"conversations":[{"conversation_id":"conv_1","size":18446744073709551617}],"has_more":false}'
    async with raw_upstream(answering(body)) as url, harness(url) as h:
        page = await h.client.list_conversations([])
    assert page["conversations"][0]["size"] == 18446744073709551617
