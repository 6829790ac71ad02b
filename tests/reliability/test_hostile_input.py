"""Hostile input against the real HTTP server: one table, each row with the status it must get.

Every row is sent as raw bytes over a socket to the gateway served by uvicorn on loopback, so nothing
(httpx, ASGITransport) normalises paths, drops control characters or fixes headers on the way. A row
that is refused must be refused before any upstream call, and no row may ever produce a 500, a
`Set-Cookie` or an echo of injected header text.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.reliability.support import (
    CONVERSATIONS,
    SIGNED_URL,
    RawResponse,
    ServedGateway,
    bearer,
    parse_raw_response,
    raw_exchange,
    raw_request,
    served_gateway,
)
from tests.support.servers import RedisServer

FEEDBACK = f"{CONVERSATIONS}/conv_missing/feedback"
BODY_TIMEOUT_SECONDS = 1.0
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class Creds:
    """The Authorization values a row may use."""

    user: str  # alice, scopes session + history + delete
    act_as: str  # a service token with convai:act-as


Build = Callable[[Creds], bytes]


@dataclass(frozen=True)
class Row:
    """One hostile request and what must come back."""

    build: Build
    status: int
    code: str | None = None  # the problem `code`; None when uvicorn answers before the app
    upstream: bool = False  # whether the request may reach upstream
    trickle: float | None = None  # send the body one byte every `trickle` seconds


def get(target: str, *extra: tuple[str, str], auth: str = "user") -> Build:
    """Build a GET with the chosen credentials and extra headers."""
    return lambda c: raw_request("GET", target, [("Authorization", getattr(c, auth)), *extra])


def feedback(body: bytes, content_type: str | None = "application/json", *extra: tuple[str, str]) -> Build:
    """Build a feedback POST with `body` as given."""
    headers = [("Content-Type", content_type)] if content_type is not None else []
    return lambda c: raw_request("POST", FEEDBACK, [("Authorization", c.user), *headers, *extra], body)


def raw(template: str, encoding: str = "latin-1") -> Build:
    """Build a request from a template with `{user}` / `{act_as}` placeholders, bytes exactly as written."""
    return lambda c: template.format(user=c.user, act_as=c.act_as).encode(encoding)


def chunked(payload: bytes) -> bytes:
    """Encode `payload` as one chunk plus the terminating chunk."""
    return f"{len(payload):x}\r\n".encode() + payload + b"\r\n0\r\n\r\n"


INVALID, NOT_FOUND, TOO_LARGE = "invalid_request", "not_found", "payload_too_large"

ROWS: dict[str, Row] = {
    # Path traversal and encoded slashes never reach a different upstream path.
    "traversal-encoded-slashes": Row(get(f"{CONVERSATIONS}/..%2F..%2Fv1%2Fconvai%2Fagents"), 404, NOT_FOUND),
    "traversal-dot-dot-literal": Row(get(f"{CONVERSATIONS}/../../../etc/passwd"), 404, NOT_FOUND),
    "traversal-dot-dot-encoded": Row(get(f"{CONVERSATIONS}/%2e%2e"), 422, INVALID),
    "traversal-slash-in-id-audio": Row(get(f"{CONVERSATIONS}/conv_1%2F..%2Fconv_2/audio"), 404, NOT_FOUND),
    "traversal-backslash": Row(get(f"{CONVERSATIONS}/conv%5C..%5Cother"), 422, INVALID),
    "traversal-query-in-id": Row(get(f"{CONVERSATIONS}/conv_1%3Fuser_id%3Dbob"), 422, INVALID),
    "traversal-fragment-in-id": Row(get(f"{CONVERSATIONS}/conv_1%23x"), 422, INVALID),
    # Oversized identifiers and parameters.
    "conversation-id-10000-chars": Row(get(f"{CONVERSATIONS}/{'c' * 10_000}"), 422, INVALID),
    "agent-id-10000-chars": Row(get(f"{SIGNED_URL}?agent_id={'a' * 10_000}"), 422, INVALID),
    "cursor-10000-chars": Row(get(f"{CONVERSATIONS}?cursor={'k' * 10_000}"), 422, "invalid_cursor"),
    "page-size-huge-number": Row(get(f"{CONVERSATIONS}?page_size={'9' * 400}"), 422, INVALID),
    # Unicode and control characters.
    "id-right-to-left-override": Row(get(f"{CONVERSATIONS}/%E2%80%AEconv"), 422, INVALID),
    "id-crlf": Row(get(f"{CONVERSATIONS}/conv%0D%0ASet-Cookie:%20x"), 422, INVALID),
    "id-nul": Row(get(f"{CONVERSATIONS}/conv%00"), 422, INVALID),
    "id-fullwidth-letters": Row(get(f"{CONVERSATIONS}/%EF%BD%83onv"), 422, INVALID),
    "agent-id-homoglyph": Row(get(f"{SIGNED_URL}?agent_id=agent_d%D0%B5mo"), 422, INVALID),
    "raw-utf8-in-request-line": Row(
        raw("GET /v1/convai/conversations/convé HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "utf-8"),
        400,
    ),
    # Duplicate and array query parameters.
    "user-id-twice": Row(get(f"{CONVERSATIONS}?user_id=alice&user_id=bob"), 422, INVALID),
    "user-id-once": Row(get(f"{CONVERSATIONS}?user_id=bob"), 422, INVALID),
    "agent-id-twice-mint": Row(get(f"{SIGNED_URL}?agent_id=agent_demo&agent_id=agent_other"), 422, INVALID),
    "agent-id-twice-list": Row(get(f"{CONVERSATIONS}?agent_id=agent_demo&agent_id=agent_other"), 422, INVALID),
    "agent-id-array": Row(get(f"{SIGNED_URL}?agent_id[]=agent_demo"), 422, INVALID),
    "page-size-twice": Row(get(f"{CONVERSATIONS}?page_size=1&page_size=100"), 422, INVALID),
    "bad-percent-encoding": Row(get(f"{SIGNED_URL}?agent_id=%zz%"), 422, INVALID),
    "percent-encoding-not-utf8": Row(get(f"{CONVERSATIONS}?search=%FF%FE"), 422, INVALID),
    # Header injection.
    "request-id-bare-cr": Row(raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\rSet-Cookie: x=1\r\n\r\n"), 400),
    "request-id-bare-lf": Row(raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\nSet-Cookie: x=1\r\n\r\n"), 400),
    "request-id-encoded-crlf": Row(raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a%0d%0aSet-Cookie:x\r\nConnection: close\r\n\r\n"), 200),
    "request-id-obs-fold": Row(raw("GET /healthz HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\r\n Set-Cookie: x=1\r\n\r\n"), 400),
    "on-behalf-of-bare-cr": Row(get(CONVERSATIONS, ("X-On-Behalf-Of", "bob\rX-Evil: 1"), auth="act_as"), 400),
    "on-behalf-of-control-char": Row(get(CONVERSATIONS, ("X-On-Behalf-Of", "bob\x01"), auth="act_as"), 400),
    "on-behalf-of-tab": Row(get(CONVERSATIONS, ("X-On-Behalf-Of", "bob\tx"), auth="act_as"), 422, INVALID),
    "on-behalf-of-utf8": Row(
        raw("GET /v1/convai/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: {act_as}\r\nX-On-Behalf-Of: böb\r\nConnection: close\r\n\r\n", "utf-8"),
        422,
        INVALID,
    ),
    "on-behalf-of-twice": Row(
        get(CONVERSATIONS, ("X-On-Behalf-Of", "bob"), ("X-On-Behalf-Of", "eve"), auth="act_as"), 422, INVALID
    ),
    "on-behalf-of-without-act-as": Row(get(CONVERSATIONS, ("X-On-Behalf-Of", "bob")), 403, "act_as_not_allowed"),
    "on-behalf-of-200-chars": Row(get(CONVERSATIONS, ("X-On-Behalf-Of", "b" * 200), auth="act_as"), 422, INVALID),
    "authorization-twice": Row(get(CONVERSATIONS, ("Authorization", "Bearer x.y.z")), 401, "invalid_token"),
    "content-length-and-chunked": Row(
        feedback(b"0\r\n\r\n", "application/json", ("Content-Length", "5"), ("Transfer-Encoding", "chunked")), 400
    ),
    # Bodies over the limits.
    "body-over-16k-declared": Row(feedback(b"{" + b" " * 20_000 + b"}"), 413, TOO_LARGE),
    "body-over-16k-chunked": Row(
        feedback(chunked(b" " * 20_000), "application/json", ("Transfer-Encoding", "chunked")), 413, TOO_LARGE
    ),
    "feedback-body-over-1k": Row(feedback(b'{"feedback": "like"' + b" " * 2_000 + b"}"), 413, TOO_LARGE),
    "content-length-absurd": Row(feedback(b"{}", "application/json", ("Content-Length", "9" * 12)), 413, TOO_LARGE),
    "content-length-overflow": Row(feedback(b"{}", "application/json", ("Content-Length", "9" * 30)), 400),
    "content-length-negative": Row(feedback(b"{}", "application/json", ("Content-Length", "-1")), 400),
    # Wrong content types.
    "content-type-text-plain": Row(feedback(b'{"feedback": "like"}', "text/plain"), 415, "unsupported_media_type"),
    "content-type-missing": Row(feedback(b'{"feedback": "like"}', None), 415, "unsupported_media_type"),
    "content-type-form": Row(feedback(b"feedback=like", "application/x-www-form-urlencoded"), 415, "unsupported_media_type"),
    "content-type-json-lookalike": Row(feedback(b'{"feedback": "like"}', "application/jsonp"), 415, "unsupported_media_type"),
    # JSON bombs and parser differentials.
    "json-deep-array": Row(feedback(b"[" * 500 + b"]" * 500), 422, INVALID),
    "json-deep-value": Row(feedback(b'{"feedback":' + b"[" * 480 + b"]" * 480 + b"}"), 422, INVALID),
    "json-huge-float": Row(feedback(b'{"feedback": 1e999999}'), 422, INVALID),
    "json-huge-integer": Row(feedback(b'{"feedback": ' + b"9" * 1_000 + b"}"), 422, INVALID),
    "json-duplicate-keys": Row(feedback(b'{"feedback": "like", "feedback": "dislike"}'), 422, INVALID),
    "json-nan": Row(feedback(b'{"feedback": NaN}'), 422, INVALID),
    "json-invalid-utf8": Row(feedback(b'{"feedback": "\xff\xfe"}'), 422, INVALID),
    "json-extra-key": Row(feedback(b'{"feedback": "like", "user_id": "bob"}'), 422, INVALID),
    # Tokens of 1 MB.
    "token-1mb-opaque": Row(raw(
        "GET /v1/convai/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + "a" * 1024 * 1024 + "\r\nConnection: close\r\n\r\n"
    ), 401, "invalid_token"),
    "token-1mb-jwt-shaped": Row(raw(
        "GET /v1/convai/conversations HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJ" + "a" * 1024 * 1024 + ".e30.x\r\nConnection: close\r\n\r\n"
    ), 401, "invalid_token"),
    # Slow bodies: a trickled body is cut at the deadline; a merely slow one still works.
    "slowloris-body": Row(
        lambda c: raw_request("POST", FEEDBACK, [("Authorization", c.user), ("Content-Type", "application/json"),
                                                 ("Content-Length", "1000")], b"{" + b" " * 998 + b"}"),
        408, "request_timeout", trickle=0.05,
    ),
    "slow-but-in-time-body": Row(feedback(b'{"feedback": "like"}'), 404, NOT_FOUND, upstream=True, trickle=0.02),
    # No Host header.
    "http10-no-host-health": Row(raw("GET /healthz HTTP/1.0\r\n\r\n"), 200),
    "http10-no-host-openapi": Row(raw("GET /openapi.json HTTP/1.0\r\n\r\n"), 200),
    "http10-no-host-list": Row(raw("GET /v1/convai/conversations HTTP/1.0\r\nAuthorization: {user}\r\n\r\n"), 200, upstream=True),
    "http10-no-host-mint": Row(raw(f"GET {SIGNED_URL}?agent_id=agent_demo HTTP/1.0\r\nAuthorization: {{user}}\r\n\r\n"), 200, upstream=True),
    "http11-no-host": Row(raw("GET /v1/convai/conversations HTTP/1.1\r\nAuthorization: {user}\r\nConnection: close\r\n\r\n"), 200, upstream=True),
    "unknown-method": Row(raw("BREW /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"), 400),
    "method-not-allowed": Row(lambda c: raw_request("PUT", f"{CONVERSATIONS}/conv_1", [("Authorization", c.user)]), 405, "method_not_allowed"),
}  # fmt: skip


@pytest.fixture(scope="module")
def served(redis_server: RedisServer, emulator_server: str) -> Iterator[ServedGateway]:
    """Serve one gateway for the whole table, with a short body deadline so the slow-body rows stay fast."""
    redis_server.start()
    redis_server.flush()
    with served_gateway(
        emulator_server, redis_server.url, REQUEST_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT_SECONDS)
    ) as gateway:
        yield gateway


async def trickle(port: int, request: bytes, interval: float, *, limit: float = 10.0) -> RawResponse:
    """Send the head at once, then the body one byte every `interval` s until the server answers."""
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + b"\r\n\r\n")
        await writer.drain()
        answer = asyncio.ensure_future(reader.read())
        for byte in body:
            if answer.done():
                break
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                break
            # The pause is the attack itself (a client that trickles its body), not a wait for a race.
            await asyncio.wait([answer], timeout=interval)
        raw_answer = await asyncio.wait_for(answer, limit)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return parse_raw_response(raw_answer)


async def upstream_call_count(gateway_emulator: str) -> int:
    """Return how many upstream calls the emulator logged."""
    import httpx

    async with httpx.AsyncClient(base_url=gateway_emulator) as emulator:
        response = await emulator.get("/_emulator/requests")
        response.raise_for_status()
        return len(response.json())


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
async def test_hostile_request_gets_its_expected_status(
    served: ServedGateway, emulator_server: str, row: Row
) -> None:
    creds = Creds(
        user=bearer("alice")["Authorization"],
        act_as=bearer("svc-gateway", scopes="convai:history convai:act-as")["Authorization"],
    )
    request = row.build(creds)
    before = await upstream_call_count(emulator_server)
    if row.trickle is not None:
        response = await trickle(served.port, request, row.trickle)
        if row.status == 408:
            # The 408 is the cut: a complete body (~50 s of trickling here) is never answered 408.
            assert response.header("connection") == "close"
    else:
        response = await raw_exchange(served.port, request)
    after = await upstream_call_count(emulator_server)

    assert response.status == row.status, response.body[:300]
    assert response.header("set-cookie") is None
    if row.code is not None:
        assert (response.header("content-type") or "").startswith("application/problem+json")
        problem = response.json()
        assert problem["code"] == row.code and problem["status"] == row.status
    request_id = response.header("x-request-id")
    if request_id is not None:
        assert _REQUEST_ID.fullmatch(request_id), request_id
    if not row.upstream:
        assert after == before, "a refused request reached upstream"
    assert not any("unhandled error" in line for line in served.logs)
