"""The upstream client against the emulator (and small purpose-built apps) over real loopback HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service import __version__
from service.emulator import create_emulator_app
from service.errors import (
    GatewayError,
    NotFound,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from service.settings import Secret, Settings
from service.upstream import (
    READ_WHOLE_BODY,
    AiohttpUpstreamTransport,
    TransportKind,
    UnreadableBody,
    UpstreamClient,
    create_http_client,
    create_transport,
)
from tests.support.servers import ServedApp, free_port, serve

API_KEY = "xi-upstream-test-key-8d3f1a6c0b9e2d4f7a5c"
TRANSPORTS: tuple[TransportKind, ...] = ("aiohttp", "httpx")


# --- fixtures and helpers -----------------------------------------------------------------------------


def serve_http(app: Any) -> contextlib.AbstractContextManager[ServedApp]:
    """Serve plain HTTP (no WebSocket stack: the client under test never opens one)."""
    return serve(app, ws="none")


@pytest.fixture(scope="module")
def emulator() -> Iterator[ServedApp]:
    """Serve the upstream emulator on loopback for this module."""
    with serve_http(create_emulator_app(API_KEY, seed=False)) as served:
        yield served


@pytest.fixture
def emulator_url(emulator: ServedApp) -> str:
    """Return the emulator's base URL, reset to an empty state with no faults and no request log."""
    control("POST", emulator.url, "/_emulator/reset")
    return emulator.url


@pytest.fixture(params=TRANSPORTS)
def kind(request: pytest.FixtureRequest) -> TransportKind:
    """Run a test once per supported transport."""
    value: TransportKind = request.param
    return value


def control(method: str, base_url: str, path: str, body: Any = None) -> Any:
    """Call the emulator's control API and return its JSON."""
    with httpx.Client(base_url=base_url, timeout=5) as http:
        response = http.request(method, path, json=body)
        response.raise_for_status()
        return response.json() if response.content else None


def seed(base_url: str, **spec: Any) -> str:
    """Seed one conversation and return its id."""
    spec.setdefault("agent_id", "agent_demo")
    spec.setdefault("user_id", "alice")
    result = control("POST", base_url, "/_emulator/conversations", spec)
    if isinstance(result, dict) and isinstance(result.get("conversation_id"), str):
        return str(result["conversation_id"])
    conversation_id = spec.get("conversation_id")
    assert isinstance(conversation_id, str)
    return conversation_id


def fault(base_url: str, **spec: Any) -> None:
    """Inject a fault into the emulator."""
    control("POST", base_url, "/_emulator/faults", spec)


def upstream_requests(base_url: str, path_fragment: str) -> list[dict[str, Any]]:
    """Return the emulator's logged requests whose path contains `path_fragment`."""
    logged = control("GET", base_url, "/_emulator/requests")
    return [row for row in logged if path_fragment in row["path"]]


@dataclass
class Harness:
    """An UpstreamClient plus what it reported through its hooks."""

    client: UpstreamClient
    http: httpx.AsyncClient
    sleeps: list[float] = field(default_factory=list)
    observed: list[tuple[str, str, float]] = field(default_factory=list)


@contextlib.asynccontextmanager
async def harness(
    base_url: str,
    *,
    kind: TransportKind = "aiohttp",
    key: str = API_KEY,
    read_timeout: float = 5.0,
    connect_timeout: float = 2.0,
    audio_read_timeout: float = 5.0,
    max_retries: int = 2,
    max_audio_streams: int | None = None,
    limits: httpx.Limits | None = None,
) -> AsyncIterator[Harness]:
    """Build a real client (real transport, real sockets) with a recording sleep and observer."""
    settings = Settings(
        elevenlabs_api_key=Secret(key),
        elevenlabs_base_url=base_url,
        upstream_connect_timeout=connect_timeout,
        upstream_read_timeout=read_timeout,
    )
    transport = create_transport(kind) if limits is None else create_transport(kind, limits=limits)
    http = create_http_client(settings, transport=transport)
    sleeps: list[float] = []
    observed: list[tuple[str, str, float]] = []

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = UpstreamClient(
        http,
        transport=transport,  # as the app wires it: calls go straight to the transport
        max_retries=max_retries,
        audio_read_timeout=audio_read_timeout,
        max_audio_streams=max_audio_streams,
        observe=lambda endpoint, outcome, seconds: observed.append((endpoint, outcome, seconds)),
        sleep=record_sleep,
        random=lambda: 1.0,
    )
    try:
        yield Harness(client, http, sleeps, observed)
    finally:
        await http.aclose()


def session_of(transport: AiohttpUpstreamTransport) -> aiohttp.ClientSession | None:
    """Read the transport's current aiohttp session (a function, so type narrowing does not stick)."""
    return transport.session


def outcomes(h: Harness, endpoint: str) -> list[str]:
    """Return the outcomes observed for one endpoint, in order."""
    return [outcome for name, outcome, _ in h.observed if name == endpoint]


# --- happy paths --------------------------------------------------------------------------------------


async def test_signed_url_returns_upstream_body_with_key_and_conversation_id(
    emulator_url: str, kind: TransportKind
) -> None:
    async with harness(emulator_url, kind=kind) as h:
        body = await h.client.get_signed_url("agent_demo")
    assert body["signed_url"].startswith("ws://")
    assert "conversation_id=" in body["signed_url"]  # only minted with include_conversation_id=true
    [logged] = upstream_requests(emulator_url, "/get-signed-url")
    assert logged["headers"]["xi-api-key"] == API_KEY
    assert logged["headers"]["user-agent"] == f"convai-gateway/{__version__}"
    assert ["include_conversation_id", "true"] in logged["query"]
    assert outcomes(h, "get_signed_url") == ["ok"]


async def test_webrtc_token_sends_participant_name(emulator_url: str, kind: TransportKind) -> None:
    async with harness(emulator_url, kind=kind) as h:
        body = await h.client.get_webrtc_token("agent_demo", participant_name="alice")
    assert isinstance(body["token"], str) and body["token"]
    [logged] = upstream_requests(emulator_url, "/conversation/token")
    assert logged["query"] == [["agent_id", "agent_demo"], ["participant_name", "alice"]]
    assert logged["headers"]["xi-api-key"] == API_KEY


async def test_list_conversations_passes_repeated_params_and_returns_the_page(emulator_url: str) -> None:
    mine = seed(emulator_url, user_id="alice")
    seed(emulator_url, user_id="bob")
    async with harness(emulator_url) as h:
        page = await h.client.list_conversations(
            [("user_id", "alice"), ("page_size", "10"), ("tool_names", "end_call"), ("tool_names", "x")]
        )
    assert [row["conversation_id"] for row in page["conversations"]] == [mine]
    assert page["has_more"] is False
    [logged] = upstream_requests(emulator_url, "/v1/convai/conversations")
    assert [pair for pair in logged["query"] if pair[0] == "tool_names"] == [
        ["tool_names", "end_call"],
        ["tool_names", "x"],
    ]


async def test_get_conversation_returns_details(emulator_url: str) -> None:
    conversation_id = seed(emulator_url)
    async with harness(emulator_url) as h:
        details = await h.client.get_conversation(conversation_id)
    assert details["conversation_id"] == conversation_id
    assert details["agent_id"] == "agent_demo"
    assert "transcript" in details


async def test_feedback_and_delete_reach_upstream(emulator_url: str, kind: TransportKind) -> None:
    conversation_id = seed(emulator_url)
    async with harness(emulator_url, kind=kind) as h:
        await h.client.send_feedback(conversation_id, "dislike")
        details = await h.client.get_conversation(conversation_id)
        assert details["metadata"]["feedback"]["overall_score"] == "dislike"
        await h.client.delete_conversation(conversation_id)
        with pytest.raises(NotFound):
            await h.client.get_conversation(conversation_id)
    [posted] = upstream_requests(emulator_url, "/feedback")
    assert posted["method"] == "POST"
    assert outcomes(h, "feedback") == ["ok"] and outcomes(h, "delete") == ["ok"]


# --- status mapping -----------------------------------------------------------------------------------


async def test_wrong_key_is_a_bad_gateway_logged_without_the_body(
    emulator_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="service.upstream")
    async with harness(emulator_url, key="xi-wrong-key-0000000000000000") as h:
        with pytest.raises(UpstreamError) as caught:
            await h.client.list_conversations([])
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert outcomes(h, "list") == ["auth_error"]
    assert "401" in caplog.text or "403" in caplog.text
    assert "xi-wrong-key" not in caplog.text and "detail" not in caplog.text


async def test_unknown_conversation_is_not_found(emulator_url: str) -> None:
    async with harness(emulator_url) as h:
        with pytest.raises(NotFound):
            await h.client.get_conversation("conv_does_not_exist")
    assert outcomes(h, "get") == ["not_found"]


async def test_upstream_422_is_rejected_with_a_generic_detail(emulator_url: str) -> None:
    async with harness(emulator_url) as h:
        with pytest.raises(UpstreamRejected) as caught:
            await h.client.list_conversations([("page_size", "1000")])
    assert caught.value.status == 422
    assert caught.value.detail == "upstream rejected the request parameters"
    assert outcomes(h, "list") == ["rejected"]


async def test_upstream_429_carries_its_retry_after(emulator_url: str) -> None:
    fault(emulator_url, endpoint="token", kind="rate_limit", retry_after=7)
    async with harness(emulator_url) as h:
        with pytest.raises(UpstreamRateLimited) as caught:
            await h.client.get_webrtc_token("agent_demo", participant_name="alice")
    assert caught.value.status == 429
    assert caught.value.headers["Retry-After"] == "7"
    assert h.sleeps == []  # a 429 is the caller's to retry, not ours
    assert outcomes(h, "token") == ["rate_limited"]


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, "1"), ("0", "1"), ("12", "12"), ("soon", "1"), ("Wed, 21 Oct 2015 07:28:00 GMT", "1")],
)
async def test_upstream_retry_after_defaults_and_floors_at_one_second(
    header: str | None, expected: str
) -> None:
    async def limited(request: Request) -> Response:
        headers = {"Retry-After": header} if header is not None else {}
        return JSONResponse({"detail": "slow down"}, status_code=429, headers=headers)

    app = Starlette(routes=[Route("/v1/convai/conversations", limited)])
    with serve_http(app) as served:
        async with harness(served.url) as h:
            with pytest.raises(UpstreamRateLimited) as caught:
                await h.client.list_conversations([])
    assert caught.value.headers["Retry-After"] == expected


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_upstream_5xx_is_a_bad_gateway(emulator_url: str, status: int) -> None:
    fault(emulator_url, endpoint="get", kind="status", status=status)
    conversation_id = seed(emulator_url)
    async with harness(emulator_url, max_retries=0) as h:
        with pytest.raises(UpstreamError) as caught:
            await h.client.get_conversation(conversation_id)
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert str(status) in caught.value.detail
    assert outcomes(h, "get") == ["error_5xx"]


async def test_slow_upstream_is_a_timeout_and_not_retried(emulator_url: str, kind: TransportKind) -> None:
    fault(emulator_url, endpoint="list", kind="slow", delay_seconds=1.0)
    async with harness(emulator_url, kind=kind, read_timeout=0.1) as h:
        with pytest.raises(UpstreamTimeout) as caught:
            await h.client.list_conversations([])
    assert caught.value.status == 504
    assert h.sleeps == []
    assert outcomes(h, "list") == ["timeout"]


async def test_malformed_json_is_a_bad_gateway(emulator_url: str, kind: TransportKind) -> None:
    fault(emulator_url, endpoint="list", kind="malformed_json")
    async with harness(emulator_url, kind=kind) as h:
        with pytest.raises(UpstreamError, match="malformed upstream response") as caught:
            await h.client.list_conversations([])
    assert caught.value.status == 502
    assert outcomes(h, "list") == ["malformed"]


async def test_wrong_shape_json_is_malformed() -> None:
    async def shapeless(request: Request) -> Response:
        return JSONResponse({"signed_url": 42, "conversations": {}, "token": None})

    app = Starlette(
        routes=[
            Route("/v1/convai/conversation/get-signed-url", shapeless),
            Route("/v1/convai/conversation/token", shapeless),
            Route("/v1/convai/conversations", shapeless),
            Route("/v1/convai/conversations/{cid}", lambda request: JSONResponse([1, 2])),
        ]
    )
    with serve_http(app) as served:
        async with harness(served.url) as h:
            for call in (
                h.client.get_signed_url("agent_demo"),
                h.client.get_webrtc_token("agent_demo", participant_name="alice"),
                h.client.list_conversations([]),
                h.client.get_conversation("conv_1"),
            ):
                with pytest.raises(UpstreamError, match="malformed upstream response"):
                    await call
    assert [outcome for _, outcome, _ in h.observed] == ["malformed"] * 4


async def test_dropped_connection_is_a_bad_gateway_not_a_timeout(
    emulator_url: str, kind: TransportKind
) -> None:
    fault(emulator_url, endpoint="list", kind="drop")
    async with harness(emulator_url, kind=kind) as h:
        with pytest.raises(UpstreamError) as caught:
            await h.client.list_conversations([])
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert h.sleeps == []
    assert outcomes(h, "list") == ["transport_error"]


async def test_unreachable_upstream_is_retried_then_a_bad_gateway(kind: TransportKind) -> None:
    async with harness(f"http://127.0.0.1:{free_port()}", kind=kind) as h:
        with pytest.raises(UpstreamError) as caught:
            await h.client.get_signed_url("agent_demo")
    assert type(caught.value) is UpstreamError and caught.value.status == 502
    assert h.sleeps == [0.1, 0.2]
    assert outcomes(h, "get_signed_url") == ["connect_error"] * 3


async def test_redirects_are_not_followed() -> None:
    async def moved(request: Request) -> Response:
        return Response(status_code=302, headers={"Location": "http://127.0.0.1:9/elsewhere"})

    app = Starlette(routes=[Route("/v1/convai/conversations", moved)])
    with serve_http(app) as served:
        async with harness(served.url) as h:
            with pytest.raises(UpstreamError):
                await h.client.list_conversations([])
    assert outcomes(h, "list") == ["error_3xx"]


# --- retries ------------------------------------------------------------------------------------------


async def test_get_retries_after_transient_5xx_then_succeeds(emulator_url: str, kind: TransportKind) -> None:
    fault(emulator_url, endpoint="list", kind="status", status=503, times=2)
    async with harness(emulator_url, kind=kind, max_retries=2) as h:
        page = await h.client.list_conversations([])
    assert page["conversations"] == []
    assert h.sleeps == [0.1, 0.2]  # full jitter with random()=1.0: base * 2**attempt
    assert outcomes(h, "list") == ["error_5xx", "error_5xx", "ok"]
    assert len(upstream_requests(emulator_url, "/v1/convai/conversations")) == 3


async def test_retries_are_bounded_by_max_retries(emulator_url: str) -> None:
    fault(emulator_url, endpoint="get_signed_url", kind="status", status=502, times=10)
    async with harness(emulator_url, max_retries=3) as h:
        with pytest.raises(UpstreamError):
            await h.client.get_signed_url("agent_demo")
    assert h.sleeps == [0.1, 0.2, 0.4]
    assert len(upstream_requests(emulator_url, "/get-signed-url")) == 4


async def test_backoff_delay_is_capped_and_jittered() -> None:
    async def unavailable(request: Request) -> Response:
        return JSONResponse({}, status_code=504)

    app = Starlette(routes=[Route("/v1/convai/conversations", unavailable)])
    with serve_http(app) as served:
        async with harness(served.url, max_retries=6) as h:
            with pytest.raises(UpstreamError):
                await h.client.list_conversations([])
    assert h.sleeps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


async def test_no_retry_once_the_time_budget_is_spent(emulator_url: str) -> None:
    fault(emulator_url, endpoint="list", kind="status", status=503, times=3)
    ticks = iter(range(0, 1000, 2))  # every clock reading is 2 s later than the last
    settings = Settings(
        elevenlabs_api_key=Secret(API_KEY), elevenlabs_base_url=emulator_url, upstream_read_timeout=3.0
    )
    sleeps: list[float] = []

    async def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)

    async with create_http_client(settings) as http:
        client = UpstreamClient(http, max_retries=2, sleep=record_sleep, clock=lambda: float(next(ticks)))
        with pytest.raises(UpstreamError):
            await client.list_conversations([])
    assert sleeps == []
    assert len(upstream_requests(emulator_url, "/v1/convai/conversations")) == 1


async def test_non_retryable_statuses_are_not_retried(emulator_url: str) -> None:
    fault(emulator_url, endpoint="list", kind="status", status=500, times=3)
    async with harness(emulator_url) as h:
        with pytest.raises(UpstreamError):
            await h.client.list_conversations([])
    assert h.sleeps == []
    assert len(upstream_requests(emulator_url, "/v1/convai/conversations")) == 1


async def test_post_and_delete_are_never_retried(emulator_url: str) -> None:
    conversation_id = seed(emulator_url)
    fault(emulator_url, endpoint="feedback", kind="status", status=503, times=1)
    fault(emulator_url, endpoint="delete", kind="status", status=503, times=1)
    async with harness(emulator_url, max_retries=2) as h:
        with pytest.raises(UpstreamError):
            await h.client.send_feedback(conversation_id, "like")
        with pytest.raises(UpstreamError):
            await h.client.delete_conversation(conversation_id)
    assert h.sleeps == []
    assert len(upstream_requests(emulator_url, "/feedback")) == 1
    assert len([r for r in upstream_requests(emulator_url, conversation_id) if r["method"] == "DELETE"]) == 1


# --- audio --------------------------------------------------------------------------------------------


async def test_audio_is_streamed_in_chunks_with_type_and_length(
    emulator_url: str, kind: TransportKind
) -> None:
    size = 300 * 1024
    conversation_id = seed(emulator_url, audio_size_bytes=size)
    chunks: list[bytes] = []
    async with harness(emulator_url, kind=kind) as h:
        async with h.client.stream_audio(conversation_id) as audio:
            assert audio.content_type.startswith("audio/")
            assert audio.content_length == size
            async for chunk in audio.chunks():
                chunks.append(chunk)
        assert audio.closed
    assert len(chunks) > 1
    assert sum(len(c) for c in chunks) == size
    assert outcomes(h, "audio") == ["ok"]


async def test_audio_status_errors_raise_on_entering(emulator_url: str) -> None:
    async with harness(emulator_url) as h:
        with pytest.raises(NotFound):
            async with h.client.stream_audio("conv_missing"):
                pytest.fail("entered a stream for a missing conversation")
    assert outcomes(h, "audio") == ["not_found"]


async def test_leaving_audio_early_closes_the_upstream_response(kind: TransportKind) -> None:
    finished = threading.Event()
    sent: list[int] = []

    async def endless_audio(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                for _ in range(100_000):
                    sent.append(1)
                    yield b"\x00" * 16384
                    await asyncio.sleep(0)  # let the server notice the disconnect and cancel us
            finally:
                finished.set()

        return StreamingResponse(body(), media_type="audio/mpeg")

    app = Starlette(routes=[Route("/v1/convai/conversations/{cid}/audio", endless_audio)])
    with serve_http(app) as served:
        async with harness(served.url, kind=kind) as h:
            async with h.client.stream_audio("conv_1") as audio:
                assert audio.content_type == "audio/mpeg" and audio.content_length is None
                async for _chunk in audio.chunks():
                    break
            assert audio.closed
            # The server's generator ends only when it sees the client hang up.
            assert await asyncio.to_thread(finished.wait, 5.0)
    assert len(sent) < 100_000


async def test_audio_stalling_mid_stream_is_a_timeout(kind: TransportKind) -> None:
    async def stalling_audio(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            yield b"ID3" + b"\x00" * 1024
            await asyncio.sleep(2.0)  # a stalled upstream; cancelled when the client hangs up
            yield b"never"

        return StreamingResponse(body(), media_type="audio/mpeg")

    app = Starlette(routes=[Route("/v1/convai/conversations/{cid}/audio", stalling_audio)])
    received: list[bytes] = []
    with serve_http(app) as served:
        # 0.5 s, well under the 2 s stall: the head, read under the same timeout, took over 0.2 s once on a
        # loaded machine, and the test then timed out before the stream it is about.
        async with harness(served.url, kind=kind, audio_read_timeout=0.5) as h:
            with pytest.raises(UpstreamTimeout):
                async with h.client.stream_audio("conv_1") as audio:
                    async for chunk in audio.chunks():
                        received.append(chunk)
            assert audio.closed
    assert b"".join(received).startswith(b"ID3")
    assert outcomes(h, "audio") == ["timeout"]


async def test_audio_uses_its_own_read_timeout(emulator_url: str) -> None:
    conversation_id = seed(emulator_url)
    fault(emulator_url, endpoint="audio", kind="slow", delay_seconds=0.3)
    async with harness(emulator_url, read_timeout=0.05, audio_read_timeout=5.0) as h:
        async with h.client.stream_audio(conversation_id) as audio:
            received = b"".join([chunk async for chunk in audio.chunks()])
    assert len(received) == audio.content_length


# --- hygiene ------------------------------------------------------------------------------------------


async def test_conversation_ids_are_quoted_as_one_path_segment() -> None:
    seen: list[bytes] = []

    async def record(request: Request) -> Response:
        seen.append(request.scope["raw_path"])
        return JSONResponse({"conversation_id": "x"})

    app = Starlette(routes=[Route("/{rest:path}", record, methods=["GET", "POST", "DELETE"])])
    with serve_http(app) as served:
        async with harness(served.url) as h:
            await h.client.get_conversation("a/../b?c=d#e")
            await h.client.send_feedback("a/b", None)
    # httpx may leave "=" unescaped (it is legal in a path segment); "/", "?" and "#" never are.
    assert seen == [
        b"/v1/convai/conversations/a%2F..%2Fb%3Fc=d%23e",
        b"/v1/convai/conversations/a%2Fb/feedback",
    ]


@pytest.mark.parametrize("conversation_id", ["", ".", ".."])
async def test_dot_segment_ids_never_reach_another_endpoint(emulator_url: str, conversation_id: str) -> None:
    async with harness(emulator_url) as h:
        with pytest.raises(NotFound):
            await h.client.get_conversation(conversation_id)
        with pytest.raises(NotFound):
            await h.client.delete_conversation(conversation_id)
    assert control("GET", emulator_url, "/_emulator/requests") == []


async def test_upstream_cookies_are_never_replayed(kind: TransportKind) -> None:
    cookies: list[str | None] = []

    async def tracking(request: Request) -> Response:
        cookies.append(request.headers.get("cookie"))
        response = JSONResponse({"conversations": [], "has_more": False})
        response.set_cookie("session", "upstream-session-cookie")
        return response

    app = Starlette(routes=[Route("/v1/convai/conversations", tracking)])
    with serve_http(app) as served:
        async with harness(served.url, kind=kind) as h:
            await h.client.list_conversations([])
            await h.client.list_conversations([])
    assert cookies == [None, None]


async def test_api_key_never_appears_in_raised_errors(emulator_url: str) -> None:
    async def echo_key(request: Request) -> Response:
        # A hostile or buggy upstream echoing the credential it received.
        status = int(request.query_params.get("status", "200"))
        key = request.headers.get("xi-api-key", "")
        if status == 200:
            return Response(f"not json {key}", media_type="application/json")
        return JSONResponse({"detail": f"bad key {key}"}, status_code=status)

    app = Starlette(routes=[Route("/v1/convai/conversations", echo_key)])
    errors: list[GatewayError] = []
    with serve_http(app) as served:
        async with harness(served.url, max_retries=0) as h:
            for status in ("200", "400", "401", "403", "409", "422", "429", "500", "503"):
                with pytest.raises(GatewayError) as caught:
                    await h.client.list_conversations([("status", status)])
                errors.append(caught.value)
    async with harness(f"http://127.0.0.1:{free_port()}", max_retries=0) as h:
        with pytest.raises(GatewayError) as unreachable:
            await h.client.list_conversations([])
        errors.append(unreachable.value)
    fault(emulator_url, endpoint="list", kind="slow", delay_seconds=1.0)
    async with harness(emulator_url, read_timeout=0.05) as h:
        with pytest.raises(GatewayError) as slow:
            await h.client.list_conversations([])
        errors.append(slow.value)
    assert len(errors) == 11
    for error in errors:
        rendered = f"{error!s} {error!r} {error.detail} {error.headers} {error.extra}"
        assert API_KEY not in rendered


async def test_signed_url_never_appears_in_logs(emulator_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    fault(emulator_url, endpoint="get_signed_url", kind="status", status=503)
    async with harness(emulator_url) as h:
        body = await h.client.get_signed_url("agent_demo")
    assert body["signed_url"] not in caplog.text
    assert API_KEY not in caplog.text
    assert "retrying upstream get_signed_url" in caplog.text


async def test_closing_the_client_closes_the_aiohttp_session(emulator_url: str) -> None:
    settings = Settings(elevenlabs_api_key=Secret(API_KEY), elevenlabs_base_url=emulator_url)
    http = create_http_client(settings)  # the default transport
    transport = http._transport  # the measured default is checked, not assumed
    assert isinstance(transport, AiohttpUpstreamTransport)
    assert session_of(transport) is None  # nothing bound to an event loop before the first request
    await UpstreamClient(http).list_conversations([])
    session = session_of(transport)
    assert session is not None and not session.closed
    await http.aclose()
    assert session.closed


# --- reading whole bodies -------------------------------------------------------------------------------


async def test_transport_reads_a_small_body_whole_only_when_asked() -> None:
    async def page(request: Request) -> Response:
        return JSONResponse({"conversations": [], "has_more": False})

    app = Starlette(routes=[Route("/v1/convai/conversations", page)])
    transport = AiohttpUpstreamTransport()
    try:
        with serve_http(app) as served:
            url = served.url + "/v1/convai/conversations"
            whole = await transport.handle_async_request(
                httpx.Request("GET", url, extensions={READ_WHOLE_BODY: True})
            )
            streamed = await transport.handle_async_request(httpx.Request("GET", url))
            assert whole.json() == {"conversations": [], "has_more": False}  # no aread() needed
            with pytest.raises(httpx.ResponseNotRead):
                _ = streamed.content
            assert await streamed.aread() == whole.content
    finally:
        await transport.aclose()


async def test_a_whole_read_response_is_closed_with_its_content_and_length() -> None:
    """A whole-read answer (sized or chunked) is what Response(content=...) makes: read, closed, its length set."""
    payload = b'{"conversations":[],"has_more":false}'

    async def sized(request: Request) -> Response:
        return Response(payload, media_type="application/json")

    async def chunked(request: Request) -> Response:
        async def parts() -> AsyncIterator[bytes]:
            yield payload[:10]
            yield payload[10:]

        return StreamingResponse(parts(), media_type="application/json")

    app = Starlette(routes=[Route("/sized", sized), Route("/chunked", chunked)])
    transport = AiohttpUpstreamTransport()
    try:
        with serve_http(app) as served:
            for path in ("/sized", "/chunked"):
                request = httpx.Request("GET", served.url + path, extensions={READ_WHOLE_BODY: True})
                whole = await transport.handle_async_request(request)
                assert whole.content == payload and await whole.aread() == payload
                assert whole.is_closed and whole.is_stream_consumed
                assert whole.headers.get_list("content-length") == [str(len(payload))]
                assert [chunk async for chunk in whole.aiter_bytes()] == [payload]
    finally:
        await transport.aclose()


async def test_transport_reads_whole_up_to_its_limit_and_refuses_more() -> None:
    limit = 64 * 1024

    async def blob(request: Request) -> Response:
        return Response(b"\x00" * int(request.query_params["size"]), media_type="application/octet-stream")

    app = Starlette(routes=[Route("/blob", blob)])
    transport = AiohttpUpstreamTransport(max_body_bytes=limit)
    try:
        with serve_http(app) as served:
            request = httpx.Request(
                "GET", f"{served.url}/blob?size={limit}", extensions={READ_WHOLE_BODY: True}
            )
            assert len((await transport.handle_async_request(request)).content) == limit
            request = httpx.Request(
                "GET", f"{served.url}/blob?size={limit + 1}", extensions={READ_WHOLE_BODY: True}
            )
            with pytest.raises(UnreadableBody, match="over the limit"):
                await transport.handle_async_request(request)
    finally:
        await transport.aclose()


async def test_client_without_a_transport_sends_through_the_httpx_client(emulator_url: str) -> None:
    settings = Settings(elevenlabs_api_key=Secret(API_KEY), elevenlabs_base_url=emulator_url)
    async with create_http_client(settings) as http:
        body = await UpstreamClient(http).get_signed_url("agent_demo")
    assert body["signed_url"].startswith("ws")
    assert len(upstream_requests(emulator_url, "get-signed-url")) == 1
