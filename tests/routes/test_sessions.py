"""The token routes against the real emulator (loopback HTTP) and the private Redis."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import redis

from service.errors import UpstreamError
from service.ledger import ledger_key
from service.routes.sessions import SIGNED_URL_LIFETIME_SECONDS, conversation_id_from
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

SIGNED_URL = "/v1/convai/conversation/get-signed-url"
TOKEN = "/v1/convai/conversation/token"
ROUTES = [SIGNED_URL, TOKEN]
MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


@pytest.fixture
def inspect(redis_server: RedisServer, redis_url: str) -> Iterator[redis.Redis]:
    """Yield a synchronous client of the private Redis, to read the ledger directly."""
    with contextlib.closing(redis_server.client()) as client:
        yield client


@pytest.fixture
async def fast_gateway(make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    """Yield a gateway with no upstream retries and a short read timeout, for upstream fault tests."""
    async with make_gateway(UPSTREAM_MAX_RETRIES="0", UPSTREAM_READ_TIMEOUT_SECONDS="0.3") as gateway:
        yield gateway


def assert_no_store(response: httpx.Response) -> None:
    """Assert the response forbids caching."""
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["pragma"] == "no-cache"


def problem_code(response: httpx.Response) -> str:
    """Return the `code` of a problem+json response."""
    assert response.headers["content-type"].startswith("application/problem+json")
    code: str = response.json()["code"]
    return code


def signature_of(signed_url: str) -> str:
    """Return the `conversation_signature` of a signed URL."""
    (signature,) = parse_qs(urlsplit(signed_url).query)["conversation_signature"]
    return signature


async def add_fault(gateway: Gateway, **fault: Any) -> None:
    """Queue an emulator fault."""
    response = await gateway.emulator.post("/_emulator/faults", json=fault)
    response.raise_for_status()


# --- signed URL ---------------------------------------------------------------------------------------


async def test_signed_url_is_recorded_as_the_callers_before_it_is_returned(
    gateway: Gateway, inspect: redis.Redis
) -> None:
    before = int(time.time())
    response = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gateway.headers("user_a")
    )
    after = int(time.time())
    assert response.status_code == 200, response.text
    assert_no_store(response)
    assert response.headers["ratelimit"].startswith('"user-session"')
    body = response.json()
    assert set(body) == {"signed_url", "conversation_id", "expires_at"}
    conversation_id = body["conversation_id"]
    assert parse_qs(urlsplit(body["signed_url"]).query)["conversation_id"] == [conversation_id]
    assert isinstance(body["expires_at"], int)
    assert before + SIGNED_URL_LIFETIME_SECONDS <= body["expires_at"] <= after + SIGNED_URL_LIFETIME_SECONDS

    stored = inspect.get(ledger_key(conversation_id))
    assert stored is not None
    assert json.loads(stored) == {
        "user": "user_a",
        "agent_id": "agent_demo",
        "minted_at": body["expires_at"] - SIGNED_URL_LIFETIME_SECONDS,
    }
    ttl = gateway.settings.ledger_ttl_days * 86_400
    assert ttl - 10 <= inspect.ttl(ledger_key(conversation_id)) <= ttl

    (call,) = await gateway.upstream_requests()
    assert call["endpoint"] == "get_signed_url"
    assert call["query"] == [["agent_id", "agent_demo"], ["include_conversation_id", "true"]]
    assert call["headers"]["xi-api-key"] == EMULATOR_API_KEY
    assert "authorization" not in call["headers"]


async def test_conversation_id_from_the_upstream_body_is_recorded(
    gateway: Gateway, inspect: redis.Redis
) -> None:
    config = await gateway.emulator.post("/_emulator/config", json={"signed_url_id_in_body": True})
    assert config.json()["signed_url_id_in_body"] is True
    response = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_other"}, headers=gateway.headers("user_b")
    )
    assert response.status_code == 200, response.text
    conversation_id = response.json()["conversation_id"]
    stored = inspect.get(ledger_key(conversation_id))
    assert stored is not None
    assert json.loads(stored)["user"] == "user_b"
    assert json.loads(stored)["agent_id"] == "agent_other"


def test_conversation_id_is_taken_from_the_body_or_else_the_url() -> None:
    url = (
        "wss://up.example/v1/convai/conversation?agent_id=a&conversation_signature=s&conversation_id=conv_url"
    )
    bare = "wss://up.example/v1/convai/conversation?agent_id=a&conversation_signature=s"
    assert conversation_id_from({"conversation_id": "conv_body"}, bare) == "conv_body"
    assert conversation_id_from({}, url) == "conv_url"
    assert conversation_id_from({"conversation_id": "conv_url"}, url) == "conv_url"
    # A malformed id in the body is not trusted; the URL still names the conversation.
    assert conversation_id_from({"conversation_id": "../conv"}, url) == "conv_url"
    assert conversation_id_from({"conversation_id": 42}, url) == "conv_url"


@pytest.mark.parametrize(
    ("body", "url"),
    [
        ({}, "wss://up.example/c?agent_id=a&conversation_signature=s"),
        ({}, "wss://up.example/c?conversation_id=conv%2F..%2Fx"),
        ({}, "wss://up.example/c?conversation_id=conv_a&conversation_id=conv_b"),
        ({"conversation_id": ""}, "not a url"),
        ({"conversation_id": "conv_body"}, "wss://up.example/c?conversation_id=conv_other"),
    ],
    ids=["none", "malformed", "ambiguous", "empty", "inconsistent"],
)
def test_no_trustworthy_conversation_id_is_an_upstream_error(body: dict[str, Any], url: str) -> None:
    with pytest.raises(UpstreamError) as caught:
        conversation_id_from(body, url)
    assert caught.value.status == 502
    assert "conv_" not in caught.value.detail


async def mint_as_a_then_claim_as_b(
    gateway: Gateway,
) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    """Mint a session as user_a, let upstream record user_b as its user_id; return the mint, then both reads."""
    minted = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gateway.headers("user_a")
    )
    conversation_id = minted.json()["conversation_id"]
    # The client that connects chooses the upstream user_id; here it claims to be user_b.
    created = await gateway.emulator.post(
        "/_emulator/conversations",
        json={"conversation_id": conversation_id, "agent_id": "agent_demo", "user_id": "user_b"},
    )
    created.raise_for_status()
    path = f"/v1/convai/conversations/{conversation_id}"
    owner = await gateway.client.get(path, headers=gateway.headers("user_a"))
    other = await gateway.client.get(path, headers=gateway.headers("user_b"))
    return minted, owner, other


async def test_ledger_decides_ownership_even_against_a_spoofed_upstream_user_id(gateway: Gateway) -> None:
    _, owner, spoofer = await mint_as_a_then_claim_as_b(gateway)
    assert owner.status_code == 200, owner.text
    assert spoofer.status_code == 404


async def test_in_process_ledger_records_ownership_without_redis(
    make_gateway: MakeGateway, inspect: redis.Redis
) -> None:
    async with make_gateway(REDIS_URL="", OWNERSHIP_MODE="ledger") as gateway:
        minted, owner, other = await mint_as_a_then_claim_as_b(gateway)
        assert minted.status_code == 200, minted.text
        assert_no_store(minted)
    assert owner.status_code == 200, owner.text
    assert other.status_code == 404
    assert inspect.keys("ledger:*") == []


async def test_ledger_outage_fails_the_mint_closed_while_the_limiter_falls_back(
    make_gateway: MakeGateway, redis_server: RedisServer
) -> None:
    async with make_gateway(RATE_LIMIT_ON_REDIS_ERROR="local") as gateway:
        redis_server.stop()
        try:
            failed = await gateway.client.get(
                SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gateway.headers("user_a")
            )
            token = await gateway.client.get(
                TOKEN, params={"agent_id": "agent_demo"}, headers=gateway.headers("user_a")
            )
        finally:
            redis_server.start()
        metrics = await gateway.client.get("/metrics")
        recovered = await gateway.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=gateway.headers("user_a")
        )
        calls = await gateway.upstream_requests()
    assert failed.status_code == 503
    assert problem_code(failed) == "ledger_unavailable"
    assert_no_store(failed)
    # Upstream minted a URL, but nobody owns its conversation, so it is thrown away.
    minted_upstream = [c for c in calls if c["endpoint"] == "get_signed_url"]
    assert len(minted_upstream) == 2
    assert "signed_url" not in failed.text and "conversation_signature" not in failed.text
    assert token.status_code == 200, token.text
    assert 'convai_gateway_ledger_writes_total{outcome="error"} 1.0' in metrics.text
    assert recovered.status_code == 200, recovered.text


# --- WebRTC token -------------------------------------------------------------------------------------


async def test_token_participant_is_always_the_caller(gateway: Gateway, inspect: redis.Redis) -> None:
    response = await gateway.client.get(
        TOKEN,
        params=[("agent_id", "agent_demo"), ("participant_name", "mallory"), ("user_id", "mallory")],
        headers=gateway.headers("user_a"),
    )
    assert response.status_code == 200, response.text
    assert_no_store(response)
    assert response.headers["ratelimit"].startswith('"user-session"')
    body = response.json()
    assert list(body) == ["token"]
    assert isinstance(body["token"], str) and body["token"]
    (call,) = await gateway.upstream_requests()
    assert call["endpoint"] == "token"
    assert call["query"] == [["agent_id", "agent_demo"], ["participant_name", "user_a"]]
    assert call["headers"]["xi-api-key"] == EMULATOR_API_KEY
    # A WebRTC token yields no conversation id, so nothing is recorded.
    assert inspect.keys("ledger:*") == []


async def test_token_conversation_named_by_upstream_is_recorded_for_the_caller(
    gateway: Gateway, inspect: redis.Redis, redis_server: RedisServer
) -> None:
    await gateway.emulator.post("/_emulator/config", json={"token_conversation_id": True})
    response = await gateway.client.get(
        TOKEN, params={"agent_id": "agent_other"}, headers=gateway.headers("user_c")
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"token", "conversation_id"}
    stored = inspect.get(ledger_key(body["conversation_id"]))
    assert stored is not None
    assert json.loads(stored)["user"] == "user_c"
    assert json.loads(stored)["agent_id"] == "agent_other"
    # With an id to record, a ledger outage fails the token closed too.
    redis_server.stop()
    try:
        failed = await gateway.client.get(
            TOKEN, params={"agent_id": "agent_other"}, headers=gateway.headers("user_c")
        )
    finally:
        redis_server.start()
    assert failed.status_code == 503
    assert problem_code(failed) == "ledger_unavailable"
    assert "token" not in failed.json()


@pytest.mark.parametrize("route", ROUTES)
async def test_branch_id_is_validated_and_forwarded(gateway: Gateway, route: str) -> None:
    response = await gateway.client.get(
        route, params={"agent_id": "agent_demo", "branch_id": "branch_42"}, headers=gateway.headers("user_a")
    )
    assert response.status_code == 200, response.text
    (call,) = await gateway.upstream_requests()
    assert ["branch_id", "branch_42"] in call["query"]


# --- secrets never leak -------------------------------------------------------------------------------


async def test_api_key_signature_and_token_never_reach_the_client_or_the_logs(
    make_gateway: MakeGateway,
) -> None:
    responses: list[httpx.Response] = []
    async with make_gateway() as gateway:
        headers = gateway.headers("user_a")
        signed = await gateway.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=headers)
        token = await gateway.client.get(TOKEN, params={"agent_id": "agent_demo"}, headers=headers)
        responses += [signed, token]
        responses.append(
            await gateway.client.get(SIGNED_URL, params={"agent_id": "agent_x"}, headers=headers)
        )
        responses.append(await gateway.client.get(TOKEN, params={"agent_id": "a", "x": "1"}, headers=headers))
        await add_fault(gateway, endpoint="get_signed_url", kind="status", status=500, times=5)
        responses.append(
            await gateway.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=headers)
        )
        logs = "\n".join(gateway.logs)
    async with make_gateway(ELEVENLABS_API_KEY="xi-wrong-key-00000000000000000000") as wrong:
        rejected = await wrong.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=headers)
        responses.append(rejected)
        logs += "\n".join(wrong.logs)

    signature = signature_of(signed.json()["signed_url"])
    webrtc_token = token.json()["token"]
    assert rejected.status_code == 502
    assert "Invalid API key" not in rejected.text
    for response in responses:
        assert_no_store(response)
        visible = response.text + "\n" + "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        assert EMULATOR_API_KEY not in visible
        assert "xi-wrong-key" not in visible
        if response is not signed:
            assert signature not in visible
    for secret in (EMULATOR_API_KEY, "xi-wrong-key", signature, webrtc_token, headers["Authorization"][7:]):
        assert secret not in logs
    audit_lines = [line for line in logs.splitlines() if line.startswith(("session_minted", "token_minted"))]
    assert len(audit_lines) == 2
    assert signed.json()["conversation_id"] in audit_lines[0]
    assert "'user': 'user_a'" in audit_lines[0] and "'user': 'user_a'" in audit_lines[1]


# --- refusals before any upstream call ----------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_agent_outside_the_allowlist_or_the_token_is_refused_before_upstream(
    gateway: Gateway, route: str
) -> None:
    outside = await gateway.client.get(route, params={"agent_id": "agent_evil"}, headers=gateway.headers("u"))
    narrowed = await gateway.client.get(
        route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u", agents=["agent_other"])
    )
    for response in (outside, narrowed):
        assert response.status_code == 403
        assert problem_code(response) == "agent_not_allowed"
        assert_no_store(response)
    assert await gateway.upstream_requests() == []


@pytest.mark.parametrize("route", ROUTES)
async def test_a_refused_agent_costs_no_rate_limit_budget(
    gateway: Gateway, inspect: redis.Redis, route: str
) -> None:
    burst = gateway.settings.rate_limits["user-session"].burst
    headers = gateway.headers("u")
    refused = [
        await gateway.client.get(route, params={"agent_id": "agent_evil"}, headers=headers)
        for _ in range(burst + 1)
    ]
    assert [(r.status_code, problem_code(r)) for r in refused] == [(403, "agent_not_allowed")] * (burst + 1)
    # The whole burst is still there: the first allowed request spends only its own unit.
    allowed = await gateway.client.get(route, params={"agent_id": "agent_demo"}, headers=headers)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["ratelimit"].startswith(f'"user-session";r={burst - 1};'), allowed.headers
    assert [key for key in inspect.scan_iter() if "agent_evil" in str(key)] == []


@pytest.mark.parametrize("route", ROUTES)
async def test_missing_scope_is_403_before_upstream(gateway: Gateway, route: str) -> None:
    response = await gateway.client.get(
        route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u", scopes="convai:history")
    )
    assert response.status_code == 403
    assert problem_code(response) == "insufficient_scope"
    assert "insufficient_scope" in response.headers["www-authenticate"]
    assert_no_store(response)
    assert await gateway.upstream_requests() == []


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    "params",
    [
        [("agent_id", "agent_demo"), ("page_size", "5")],
        [("agent_id", "agent_demo"), ("xi-api-key", "mine")],
        [("agent_id", "agent_demo"), ("agent_id", "agent_other")],
        [],
        [("agent_id", "")],
        [("agent_id", "agent_demo/../x")],
        [("agent_id", "agent_demo"), ("branch_id", "b?x=1")],
    ],
    ids=["unknown", "smuggled-key", "duplicate", "missing", "empty", "malformed", "bad-branch"],
)
async def test_invalid_query_is_422_before_upstream(
    gateway: Gateway, route: str, params: list[tuple[str, str]]
) -> None:
    response = await gateway.client.get(route, params=tuple(params), headers=gateway.headers("u"))
    assert response.status_code == 422, response.text
    assert problem_code(response) == "invalid_request"
    assert_no_store(response)
    assert await gateway.upstream_requests() == []


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("query_string", ["agent_id=agent_demo&branch_id=%FF", "agent_id=agent_dem%F6"])
async def test_percent_escapes_that_are_not_utf8_are_422_before_upstream(
    gateway: Gateway, route: str, query_string: str
) -> None:
    response = await gateway.client.get(f"{route}?{query_string}", headers=gateway.headers("u"))
    assert response.status_code == 422, response.text
    assert problem_code(response) == "invalid_request"
    assert_no_store(response)
    assert await gateway.upstream_requests() == []


async def test_participant_name_not_utf8_is_422_on_the_token_route(gateway: Gateway) -> None:
    # Ignored parameters are still parameters: a query that is not UTF-8 is refused as a whole.
    response = await gateway.client.get(
        f"{TOKEN}?agent_id=agent_demo&participant_name=%FF", headers=gateway.headers("u")
    )
    assert response.status_code == 422, response.text
    assert await gateway.upstream_requests() == []


async def test_include_conversation_id_true_from_an_upstream_client_is_accepted(
    gateway: Gateway, inspect: redis.Redis
) -> None:
    # The upstream reference documents include_conversation_id on this route, and the official SDKs send it
    # (`get_signed_url(agent_id=..., include_conversation_id=True)`): a client that only changed its base URL
    # must not get a 422 for asking what the gateway does anyway.
    response = await gateway.client.get(
        SIGNED_URL,
        params={"agent_id": "agent_demo", "include_conversation_id": "true"},
        headers=gateway.headers("user_a"),
    )
    assert response.status_code == 200, response.text
    assert_no_store(response)
    conversation_id = response.json()["conversation_id"]
    assert json.loads(inspect.get(ledger_key(conversation_id)) or "{}")["user"] == "user_a"
    (call,) = await gateway.upstream_requests()
    assert call["query"] == [["agent_id", "agent_demo"], ["include_conversation_id", "true"]]


@pytest.mark.parametrize("value", ["false", "", "1", "yes"])
async def test_include_conversation_id_other_than_true_is_422_before_upstream(
    gateway: Gateway, value: str
) -> None:
    # false would ask for a reusable signature without an id: the gateway always mints single-use URLs whose
    # conversation it records, so it says so instead of silently answering something else.
    response = await gateway.client.get(
        SIGNED_URL,
        params={"agent_id": "agent_demo", "include_conversation_id": value},
        headers=gateway.headers("u"),
    )
    assert response.status_code == 422, response.text
    assert problem_code(response) == "invalid_request"
    assert response.json()["parameter"] == "include_conversation_id"
    assert_no_store(response)
    assert await gateway.upstream_requests() == []


async def test_include_conversation_id_is_refused_on_the_token_route(gateway: Gateway) -> None:
    response = await gateway.client.get(
        TOKEN,
        params={"agent_id": "agent_demo", "include_conversation_id": "true"},
        headers=gateway.headers("u"),
    )
    assert response.status_code == 422
    assert await gateway.upstream_requests() == []


async def test_participant_name_is_refused_on_the_signed_url_route(gateway: Gateway) -> None:
    response = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_demo", "participant_name": "x"}, headers=gateway.headers("u")
    )
    assert response.status_code == 422
    assert await gateway.upstream_requests() == []


@pytest.mark.parametrize("route", ROUTES)
async def test_head_mints_nothing(gateway: Gateway, inspect: redis.Redis, route: str) -> None:
    # A HEAD (curl -I, a link checker) ran the whole GET: an upstream mint, a ledger entry, an audit line and
    # a unit of the caller's and the agent's session budget, for a URL or token nobody could ever read.
    response = await gateway.client.head(
        route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u")
    )
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert response.headers["cache-control"] == "no-store"
    assert await gateway.upstream_requests() == []
    assert list(inspect.scan_iter("ledger:*")) == []
    minted = await gateway.client.get(route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u"))
    # The whole burst is still there: the HEAD cost nothing.
    assert minted.headers["ratelimit"].startswith('"user-session";r=4;'), minted.headers["ratelimit"]


@pytest.mark.parametrize("route", ROUTES)
async def test_rate_limit_stops_mints_before_upstream(gateway: Gateway, route: str) -> None:
    statuses = []
    for _ in range(8):
        response = await gateway.client.get(
            route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u")
        )
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    assert statuses[-1] == 429, statuses
    assert int(response.headers["retry-after"]) >= 1
    assert_no_store(response)
    assert len(await gateway.upstream_requests()) == statuses.count(200)


# --- upstream failures --------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"kind": "status", "status": 500}, 502, "upstream_error"),
        ({"kind": "status", "status": 503}, 502, "upstream_error"),
        ({"kind": "status", "status": 401}, 502, "upstream_error"),
        # An allowed agent upstream does not know (deleted there, or a typo in ALLOWED_AGENT_IDS): the gateway's
        # configuration is at fault, not the caller; it was a 404 "no such conversation" on a route that exists.
        ({"kind": "status", "status": 404}, 502, "upstream_error"),
        ({"kind": "rate_limit", "retry_after": 7}, 429, "upstream_rate_limited"),
        ({"kind": "slow", "delay_seconds": 1.0}, 504, "upstream_timeout"),
        ({"kind": "malformed_json"}, 502, "upstream_error"),
    ],
    ids=["500", "503", "401", "404", "429", "timeout", "malformed"],
)
async def test_upstream_failures_map_to_gateway_errors_and_record_nothing(
    fast_gateway: Gateway, inspect: redis.Redis, route: str, fault: dict[str, Any], status: int, code: str
) -> None:
    endpoint = "get_signed_url" if route == SIGNED_URL else "token"
    await add_fault(fast_gateway, endpoint=endpoint, **fault)
    response = await fast_gateway.client.get(
        route, params={"agent_id": "agent_demo"}, headers=fast_gateway.headers("u")
    )
    assert response.status_code == status, response.text
    assert problem_code(response) == code
    assert_no_store(response)
    assert response.headers["ratelimit"].startswith('"user-session"')
    if status == 429:
        assert response.headers["retry-after"] == "7"
    assert inspect.keys("ledger:*") == []


async def test_upstream_rejecting_the_api_key_is_a_502(make_gateway: MakeGateway) -> None:
    async with make_gateway(ELEVENLABS_API_KEY="xi-wrong-key-11111111111111111111") as gateway:
        response = await gateway.client.get(
            TOKEN, params={"agent_id": "agent_demo"}, headers=gateway.headers("u")
        )
        (call,) = await gateway.upstream_requests()
    assert response.status_code == 502
    assert problem_code(response) == "upstream_error"
    assert call["headers"]["xi-api-key"] == "xi-wrong-key-11111111111111111111"


@pytest.mark.parametrize("route", ROUTES)
async def test_missing_or_invalid_token_is_401_and_not_cached(gateway: Gateway, route: str) -> None:
    missing = await gateway.client.get(route, params={"agent_id": "agent_demo"})
    expired = await gateway.client.get(
        route, params={"agent_id": "agent_demo"}, headers=gateway.headers("u", ttl=-120)
    )
    for response in (missing, expired):
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert response.headers["cache-control"] == "no-store"
    assert await gateway.upstream_requests() == []
