"""The conversation routes end to end: gateway (ASGI, real Redis, real JWTs) in front of the emulator.

Alice is the caller throughout; bob is the other user. Scenarios of one conversation, seen by alice:

- own_minted:       minted by alice through the gateway (ledger: alice), upstream user_id alice
- own_unminted:     not in the ledger (a WebRTC session), upstream user_id alice
- foreign_minted:   minted by bob (ledger: bob), upstream user_id bob
- spoofed:          minted by bob (ledger: bob), but bob's client claimed user_id=alice upstream
- foreign_unminted: not in the ledger, upstream user_id bob
- missing:          never existed
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import threading
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.app import create_app
from service.dev_tokens import mint_token
from service.emulator import FAKE_SECRETS, audio_bytes
from service.settings import OWNERSHIP_MODES, OwnershipMode, load_settings
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import TEST_JWT_SECRET, Gateway, gateway_env
from tests.support.servers import RedisServer, serve

MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]
LIST = "/v1/convai/conversations"
SCENARIOS = ("own_minted", "own_unminted", "foreign_minted", "spoofed", "foreign_unminted", "missing")
GRANTED: dict[OwnershipMode, set[str]] = {
    "ledger_or_user_id": {"own_minted", "own_unminted"},
    "ledger": {"own_minted"},
    # user_id mode trusts the client-chosen upstream user_id: the spoof works there, by design of that mode.
    "user_id": {"own_minted", "own_unminted", "spoofed"},
}
# Outcomes the ledger alone decides in favour of alice: audio, feedback and delete then skip the details call.
LEDGER_GRANTED: dict[OwnershipMode, set[str]] = {
    "ledger_or_user_id": {"own_minted"},
    "ledger": {"own_minted"},
    "user_id": set(),
}
ALL_SCOPES = "convai:session convai:history convai:delete"


# --------------------------------------------------------------------------------------------- helpers


async def seed(gw: Gateway, user_id: str | None, **spec: Any) -> str:
    """Create a conversation in the emulator and return its id."""
    response = await gw.emulator.post("/_emulator/conversations", json={"user_id": user_id, **spec})
    response.raise_for_status()
    conversation_id: str = response.json()["conversation_id"]
    return conversation_id


async def mint(
    gw: Gateway, user: str, *, upstream_user: str | None, agent: str = "agent_demo", **spec: Any
) -> str:
    """Mint a signed URL as `user` (ledger entry) and create its conversation upstream with `upstream_user`."""
    response = await gw.client.get(
        "/v1/convai/conversation/get-signed-url", params={"agent_id": agent}, headers=gw.headers(user)
    )
    assert response.status_code == 200, response.text
    conversation_id: str = response.json()["conversation_id"]
    return await seed(gw, upstream_user, conversation_id=conversation_id, agent_id=agent, **spec)


async def scenario(gw: Gateway, name: str, **spec: Any) -> str:
    """Create the conversation of one scenario (see the module docstring) and return its id."""
    if name == "own_minted":
        return await mint(gw, "alice", upstream_user="alice", **spec)
    if name == "own_unminted":
        return await seed(gw, "alice", **spec)
    if name == "foreign_minted":
        return await mint(gw, "bob", upstream_user="bob", **spec)
    if name == "spoofed":
        return await mint(gw, "bob", upstream_user="alice", **spec)
    if name == "foreign_unminted":
        return await seed(gw, "bob", **spec)
    return "conv_doesnotexist0000000000000"


async def upstream_calls(gw: Gateway, endpoint: str | None = None) -> list[dict[str, Any]]:
    """Return the emulator's request log, optionally for one endpoint."""
    return [r for r in await gw.upstream_requests() if endpoint is None or r["endpoint"] == endpoint]


async def details_calls(gw: Gateway) -> int:
    """Return how many upstream conversation-details calls the emulator has seen since its log was cleared."""
    return len(await upstream_calls(gw, "get"))


async def clear_upstream_log(gw: Gateway) -> None:
    """Forget the upstream requests the emulator has recorded so far."""
    (await gw.emulator.delete("/_emulator/requests")).raise_for_status()


async def upstream_exists(gw: Gateway, conversation_id: str) -> bool:
    """Ask the emulator directly (with the api key) whether a conversation still exists."""
    response = await gw.emulator.get(f"{LIST}/{conversation_id}", headers={"xi-api-key": EMULATOR_API_KEY})
    return response.status_code == 200


def problem(response: httpx.Response) -> dict[str, Any]:
    """Return a problem+json body, checking its media type."""
    assert response.headers["content-type"] == "application/problem+json", response.text
    body: dict[str, Any] = response.json()
    return body


async def missing_body(gw: Gateway, method: str, suffix: str = "", **kwargs: Any) -> bytes:
    """Return the body of a 404 for a conversation that never existed (the reference for foreign ones)."""
    response = await gw.client.request(
        method,
        f"{LIST}/conv_neverexisted000000000000{suffix}",
        headers=gw.headers("alice", scopes=ALL_SCOPES),
        **kwargs,
    )
    assert response.status_code == 404
    return response.content


@pytest.fixture(params=OWNERSHIP_MODES)
async def mode_gateway(request: pytest.FixtureRequest, make_gateway: MakeGateway) -> AsyncIterator[Gateway]:
    """Yield a gateway per ownership mode."""
    async with make_gateway(OWNERSHIP_MODE=request.param) as gw:
        yield gw


# --------------------------------------------------------------------------------- per-conversation routes


async def test_details_are_served_to_the_owner_only_in_every_mode(mode_gateway: Gateway) -> None:
    gw = mode_gateway
    mode = gw.settings.ownership_mode
    ids = {name: await scenario(gw, name) for name in SCENARIOS}
    reference = await missing_body(gw, "GET")
    for name, conversation_id in ids.items():
        await clear_upstream_log(gw)
        response = await gw.client.get(f"{LIST}/{conversation_id}", headers=gw.headers("alice"))
        if name in GRANTED[mode]:
            assert response.status_code == 200, (mode, name, response.text)
            assert response.json()["conversation_id"] == conversation_id
        else:
            assert response.status_code == 404, (mode, name)
            assert response.content == reference, (mode, name)
            assert problem(response)["code"] == "not_found"
        assert response.headers["cache-control"] == "private, no-store"
        # Same shape for every outcome: exactly one upstream details call, foreign or missing alike.
        assert [c["endpoint"] for c in await upstream_calls(gw)] == ["get"], (mode, name)


async def test_audio_is_streamed_to_the_owner_only_in_every_mode(mode_gateway: Gateway) -> None:
    gw = mode_gateway
    mode = gw.settings.ownership_mode
    size = 200_000
    ids = {name: await scenario(gw, name, audio_size_bytes=size) for name in SCENARIOS}
    reference = await missing_body(gw, "GET", "/audio")
    for name, conversation_id in ids.items():
        await clear_upstream_log(gw)
        response = await gw.client.get(f"{LIST}/{conversation_id}/audio", headers=gw.headers("alice"))
        audio_calls = await upstream_calls(gw, "audio")
        assert await details_calls(gw) == (0 if name in LEDGER_GRANTED[mode] else 1), (mode, name)
        if name in GRANTED[mode]:
            assert response.status_code == 200, (mode, name, response.text)
            assert response.content == audio_bytes(conversation_id, size)
            assert response.headers["content-type"] == "audio/mpeg"
            assert response.headers["content-length"] == str(size)
            assert response.headers["cache-control"] == "private, no-store"
            assert len(audio_calls) == 1
        else:
            assert response.status_code == 404, (mode, name)
            assert response.content == reference
            assert audio_calls == [], "no audio may be fetched before ownership is decided"


async def test_feedback_reaches_upstream_for_the_owner_only_in_every_mode(mode_gateway: Gateway) -> None:
    gw = mode_gateway
    mode = gw.settings.ownership_mode
    ids = {name: await scenario(gw, name) for name in SCENARIOS}
    reference = await missing_body(gw, "POST", "/feedback", json={"feedback": "like"})
    for name, conversation_id in ids.items():
        await clear_upstream_log(gw)
        response = await gw.client.post(
            f"{LIST}/{conversation_id}/feedback", json={"feedback": "dislike"}, headers=gw.headers("alice")
        )
        sent = await upstream_calls(gw, "feedback")
        assert await details_calls(gw) == (0 if name in LEDGER_GRANTED[mode] else 1), (mode, name)
        if name in GRANTED[mode]:
            assert response.status_code == 200, (mode, name, response.text)
            assert [json.loads(c["body"]) for c in sent] == [{"feedback": "dislike"}]
            # The audit line names the agent whether the ledger or the upstream details granted the call.
            [audited] = [
                line for line in gw.logs if line.startswith("feedback_sent") and conversation_id in line
            ]
            assert "'agent_id': 'agent_demo'" in audited, (mode, name)
        else:
            assert response.status_code == 404, (mode, name)
            assert response.content == reference
            assert sent == []


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [("GET", "/audio", None), ("POST", "/feedback", {"feedback": "like"}), ("DELETE", "", None)],
)
async def test_minted_but_never_started_conversation_is_the_uniform_404(
    mode_gateway: Gateway, method: str, suffix: str, body: dict[str, str] | None
) -> None:
    gw = mode_gateway
    alice = gw.headers("alice", scopes=ALL_SCOPES)
    reference = await missing_body(gw, method, suffix, json=body)
    minted = await gw.client.get(
        "/v1/convai/conversation/get-signed-url", params={"agent_id": "agent_demo"}, headers=alice
    )
    assert minted.status_code == 200, minted.text
    conversation_id = minted.json()["conversation_id"]
    await clear_upstream_log(gw)
    response = await gw.client.request(method, f"{LIST}/{conversation_id}{suffix}", headers=alice, json=body)
    assert response.status_code == 404
    assert response.content == reference
    assert response.headers["cache-control"] == "private, no-store"


async def test_delete_before_the_conversation_starts_keeps_it_the_minters(mode_gateway: Gateway) -> None:
    # A signed URL stays usable after a DELETE that found nothing upstream: its ledger entry must survive it.
    gw = mode_gateway
    alice = gw.headers("alice", scopes=ALL_SCOPES)
    minted = await gw.client.get(
        "/v1/convai/conversation/get-signed-url", params={"agent_id": "agent_demo"}, headers=alice
    )
    assert minted.status_code == 200, minted.text
    conversation_id = minted.json()["conversation_id"]
    assert (await gw.client.delete(f"{LIST}/{conversation_id}", headers=alice)).status_code == 404
    # The conversation starts later, its client claiming another user_id upstream.
    await seed(gw, "mallory", conversation_id=conversation_id, agent_id="agent_demo")
    alices = await gw.client.get(f"{LIST}/{conversation_id}", headers=alice)
    mallorys = await gw.client.get(f"{LIST}/{conversation_id}", headers=gw.headers("mallory"))
    if gw.settings.ownership_mode == "user_id":
        assert (alices.status_code, mallorys.status_code) == (404, 200)
    else:
        assert (alices.status_code, mallorys.status_code) == (200, 404)


async def test_delete_removes_the_owners_conversation_and_ledger_entry_only(mode_gateway: Gateway) -> None:
    gw = mode_gateway
    mode = gw.settings.ownership_mode
    ids = {name: await scenario(gw, name) for name in SCENARIOS}
    reference = await missing_body(gw, "DELETE")
    alice = gw.headers("alice", scopes=ALL_SCOPES)
    for name, conversation_id in ids.items():
        await clear_upstream_log(gw)
        response = await gw.client.delete(f"{LIST}/{conversation_id}", headers=alice)
        deletes = await upstream_calls(gw, "delete")
        assert await details_calls(gw) == (0 if name in LEDGER_GRANTED[mode] else 1), (mode, name)
        if name in GRANTED[mode]:
            assert response.status_code == 200, (mode, name, response.text)
            assert response.json() == {}
            assert len(deletes) == 1
            assert not await upstream_exists(gw, conversation_id)
        else:
            assert response.status_code == 404, (mode, name)
            assert response.content == reference
            assert deletes == []
            if name != "missing":
                assert await upstream_exists(gw, conversation_id)
    assert any("conversation_deleted" in line for line in gw.logs)


async def test_delete_forgets_the_ledger_entry(make_gateway: MakeGateway) -> None:
    async with make_gateway(OWNERSHIP_MODE="ledger") as gw:
        conversation_id = await mint(gw, "alice", upstream_user="alice")
        alice = gw.headers("alice", scopes=ALL_SCOPES)
        assert (await gw.client.delete(f"{LIST}/{conversation_id}", headers=alice)).status_code == 200
        # Recreate it upstream under the same id: without a ledger entry, ledger mode must refuse it now.
        await seed(gw, "alice", conversation_id=conversation_id)
        response = await gw.client.get(f"{LIST}/{conversation_id}", headers=alice)
        assert response.status_code == 404


async def test_delete_requires_the_delete_scope(gateway: Gateway) -> None:
    conversation_id = await mint(gateway, "alice", upstream_user="alice")
    response = await gateway.client.delete(f"{LIST}/{conversation_id}", headers=gateway.headers("alice"))
    assert response.status_code == 403
    assert problem(response)["code"] == "insufficient_scope"
    assert await upstream_exists(gateway, conversation_id)


async def test_a_delete_without_the_scope_costs_no_rate_limit_budget(gateway: Gateway) -> None:
    burst = gateway.settings.rate_limits["user-delete"].burst
    missing = f"{LIST}/conv_doesnotexist0000000000000"
    refused = [
        await gateway.client.delete(missing, headers=gateway.headers("alice")) for _ in range(burst + 1)
    ]
    assert {(r.status_code, problem(r)["code"]) for r in refused} == {(403, "insufficient_scope")}
    # With the scope, the delete is judged on its merits: the whole burst is still there.
    allowed = await gateway.client.delete(missing, headers=gateway.headers("alice", scopes=ALL_SCOPES))
    assert (allowed.status_code, problem(allowed)["code"]) == (404, "not_found")
    assert allowed.headers["ratelimit"].startswith(f'"user-delete";r={burst - 1};'), allowed.headers


async def test_history_routes_require_the_history_scope(gateway: Gateway) -> None:
    conversation_id = await mint(gateway, "alice", upstream_user="alice")
    headers = gateway.headers("alice", scopes="convai:session")
    await clear_upstream_log(gateway)
    for method, path in (
        ("GET", LIST),
        ("GET", f"{LIST}/{conversation_id}"),
        ("GET", f"{LIST}/{conversation_id}/audio"),
        ("POST", f"{LIST}/{conversation_id}/feedback"),
    ):
        response = await gateway.client.request(method, path, headers=headers, json={"feedback": "like"})
        assert response.status_code == 403, path
        assert problem(response)["code"] == "insufficient_scope"
    assert await upstream_calls(gateway) == []


async def test_conversations_of_agents_outside_the_tokens_agents_claim_are_hidden(gateway: Gateway) -> None:
    other = await mint(gateway, "alice", upstream_user="alice", agent="agent_other")
    narrowed = gateway.headers("alice", agents=["agent_demo"], scopes=ALL_SCOPES)
    for method, suffix, body in (
        ("GET", "", None),
        ("GET", "/audio", None),
        ("POST", "/feedback", {"feedback": "like"}),
        ("DELETE", "", None),
    ):
        # The ledger names alice as the owner, yet the token may not see the agent: still the uniform 404.
        response = await gateway.client.request(
            method, f"{LIST}/{other}{suffix}", headers=narrowed, json=body
        )
        assert response.status_code == 404, suffix
    actions = [c["endpoint"] for c in await upstream_calls(gateway) if c["endpoint"] != "get"]
    assert actions == ["get_signed_url"], "no audio, feedback or delete may reach upstream"
    assert (await gateway.client.get(f"{LIST}/{other}", headers=gateway.headers("alice"))).status_code == 200


async def test_ownership_fails_closed_when_the_ledger_is_down(
    gateway: Gateway, redis_server: RedisServer
) -> None:
    conversation_id = await seed(gateway, "alice")  # upstream user_id alice, unknown to the ledger
    redis_server.stop()
    await clear_upstream_log(gateway)
    alice = gateway.headers("alice")
    for path in (f"{LIST}/{conversation_id}", f"{LIST}/{conversation_id}/audio", LIST):
        response = await gateway.client.get(path, headers=alice)
        # Never a guess from the client-chosen user_id alone while the ledger cannot be read.
        assert response.status_code == 503, (path, response.text)
        assert problem(response)["code"] == "ledger_unavailable"
    assert await upstream_calls(gateway, "audio") == []


# ------------------------------------------------------------------------------------------ redaction


async def test_details_are_redacted(make_gateway: MakeGateway) -> None:
    async with make_gateway(REDACT_FIELDS="transcript.*.feedback,analysis.transcript_summary") as gw:
        conversation_id = await mint(
            gw,
            "alice",
            upstream_user="alice",
            dynamic_variables={"secret__pin": "4242"},
            tool_names=[
                "get_order_status",
                "search_knowledge_base",
                "create_calendar_event",
                "show_product_card",
            ],
        )
        raw = (
            await gw.emulator.get(f"{LIST}/{conversation_id}", headers={"xi-api-key": EMULATOR_API_KEY})
        ).text
        assert all(secret in raw for secret in FAKE_SECRETS), "the emulator must serve the secrets to hide"

        response = await gw.client.get(f"{LIST}/{conversation_id}", headers=gw.headers("alice"))
        assert response.status_code == 200
        text = response.text
        for secret in (*FAKE_SECRETS, "4242", "secret__"):
            assert secret not in text
        details = response.json()
        assert "charging" not in details["metadata"] and "cost" not in details["metadata"]
        assert "transcript_summary" not in details["analysis"]
        assert all("feedback" not in entry for entry in details["transcript"])
        assert details["conversation_initiation_client_data"]["dynamic_variables"]["plan"] == "pro"
        assert len(details["transcript"]) > 0


# ---------------------------------------------------------------------------------------- hostile ids

# An id whose decoded form holds a "/" no longer matches the route (404); every other one reaches the
# route and is refused by id validation (422). The same answer for every method and sub-resource.
NO_ROUTE = (404, "not_found")
INVALID_ID = (422, "invalid_request")
HOSTILE_IDS: dict[str, tuple[int, str]] = {
    "..%2F..": NO_ROUTE,
    "..%2F..%2Fv1%2Fconvai%2Fagents": NO_ROUTE,
    "%2e%2e": INVALID_ID,
    "%2E%2E%2F": NO_ROUTE,
    "conv%2Fx": NO_ROUTE,
    "conv%00x": INVALID_ID,
    "conv%20x": INVALID_ID,
    "a%3Fb=c": INVALID_ID,
    "a%23frag": INVALID_ID,
    "a" * 10_000: INVALID_ID,
    quote("conv_é"): INVALID_ID,
    quote("会話"): INVALID_ID,
    "conv.1": INVALID_ID,
    "conv%252Fx": INVALID_ID,
}


@pytest.mark.parametrize(
    ("method", "suffix"), [("GET", ""), ("GET", "/audio"), ("POST", "/feedback"), ("DELETE", "")]
)
async def test_hostile_conversation_ids_never_reach_upstream(
    gateway: Gateway, method: str, suffix: str
) -> None:
    headers = gateway.headers("alice", scopes=ALL_SCOPES)
    wrong: dict[str, tuple[tuple[int, str], tuple[int, str]]] = {}
    for hostile, expected in HOSTILE_IDS.items():
        url = httpx.URL(f"http://gateway.test{LIST}/{hostile}{suffix}")
        response = await gateway.client.request(method, url, headers=headers, json={"feedback": "like"})
        answer = (response.status_code, problem(response)["code"])
        if answer != expected:
            wrong[hostile[:40]] = (answer, expected)
    assert wrong == {}, "(answer, expected) per id"
    assert await upstream_calls(gateway) == []


# ------------------------------------------------------------------------------------- feedback bodies


@pytest.mark.parametrize(
    ("content", "content_type", "status"),
    [
        (b'{"feedback": "like"}', "text/plain", 415),
        (b'{"feedback": "like"}', None, 415),
        (b'{"feedback": "like"}', "application/x-www-form-urlencoded", 415),
        (b'{"feedback": "' + b"x" * 1100 + b'"}', "application/json", 413),
        (b"{}", "application/json", 422),
        (b"", "application/json", 422),
        (b"not json", "application/json", 422),
        (b'{"feedback": "love"}', "application/json", 422),
        (b'{"feedback": "LIKE"}', "application/json", 422),
        (b'{"feedback": 1}', "application/json", 422),
        (b'{"feedback": true}', "application/json", 422),
        (b'{"feedback": ["like"]}', "application/json", 422),
        (b'{"feedback": "like", "rating": 5}', "application/json", 422),
        (b'{"feedback": "like", "feedback": "dislike"}', "application/json", 422),
        (b'["like"]', "application/json", 422),
        (b'"like"', "application/json", 422),
        (b"\xff\xfe", "application/json", 422),
    ],
)
async def test_invalid_feedback_bodies_are_refused_before_any_upstream_call(
    gateway: Gateway, content: bytes, content_type: str | None, status: int
) -> None:
    conversation_id = await mint(gateway, "alice", upstream_user="alice")
    await clear_upstream_log(gateway)
    headers = gateway.headers("alice")
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = await gateway.client.post(
        f"{LIST}/{conversation_id}/feedback", content=content, headers=headers
    )
    assert response.status_code == status, response.text
    assert await upstream_calls(gateway) == []


async def test_a_chunked_feedback_body_over_the_limit_is_refused(gateway: Gateway) -> None:
    conversation_id = await mint(gateway, "alice", upstream_user="alice")
    await clear_upstream_log(gateway)

    async def body() -> AsyncIterator[bytes]:
        yield b'{"feedback": "'
        for _ in range(4):
            yield b"x" * 512
        yield b'"}'

    headers = {**gateway.headers("alice"), "Content-Type": "application/json"}
    response = await gateway.client.post(
        f"{LIST}/{conversation_id}/feedback", content=body(), headers=headers
    )
    assert response.status_code == 413
    assert problem(response)["code"] == "payload_too_large"
    assert await upstream_calls(gateway) == []


async def test_head_on_audio_sends_headers_without_body(gateway: Gateway) -> None:
    conversation_id = await seed(gateway, "alice", audio_size_bytes=100_000)
    response = await gateway.client.head(f"{LIST}/{conversation_id}/audio", headers=gateway.headers("alice"))
    assert response.status_code == 200
    assert response.headers["content-length"] == "100000"
    assert response.content == b""


@pytest.mark.parametrize("value", ["like", "dislike", None])
async def test_valid_feedback_values_are_forwarded(gateway: Gateway, value: str | None) -> None:
    conversation_id = await mint(gateway, "alice", upstream_user="alice")
    headers = {**gateway.headers("alice"), "Content-Type": "application/json; charset=utf-8"}
    response = await gateway.client.post(
        f"{LIST}/{conversation_id}/feedback", content=json.dumps({"feedback": value}), headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.headers["ratelimit-policy"].startswith('"user-feedback"')
    sent = await upstream_calls(gateway, "feedback")
    assert [json.loads(c["body"]) for c in sent] == [{"feedback": value}]


# ------------------------------------------------------------------------------------------------ list


async def test_list_forces_the_caller_and_passes_every_filter(gateway: Gateway) -> None:
    params: list[tuple[str, str | int | float | bool | None]] = [
        ("agent_id", "agent_demo"),
        ("call_successful", "failure"),
        ("call_start_before_unix", "1900000000"),
        ("call_start_after_unix", "0"),
        ("call_duration_min_secs", "5"),
        ("call_duration_max_secs", "600"),
        ("rating_min", "1"),
        ("rating_max", "5"),
        ("has_feedback_comment", "false"),
        ("evaluation_params", "resolved:success"),
        ("evaluation_params", "polite:unknown"),
        ("data_collection_params", "city:eq:Oslo"),
        ("data_collection_params", "plan:in:pro|team"),
        ("data_collection_params", "age:gte:18"),
        ("data_collection_params", "email:exists"),
        ("data_collection_params", "phone:missing"),
        ("tool_names", "get_order_status"),
        ("tool_names", "end_call"),
        ("page_size", "7"),
        ("summary_mode", "include"),
        ("search", "return policy"),
    ]
    response = await gateway.client.get(LIST, params=params, headers=gateway.headers("alice"))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "private, no-store"
    [call] = await upstream_calls(gateway, "list")
    forwarded = [tuple(item) for item in call["query"]]
    assert forwarded[0] == ("user_id", "alice")
    assert sorted(forwarded[1:]) == sorted(params)
    assert "authorization" not in {name.lower() for name in call["headers"]}


async def test_an_upstream_404_on_the_list_is_a_502_not_a_missing_conversation(gateway: Gateway) -> None:
    # The list route exists whatever upstream says; a 404 from upstream there (an allowed agent it does not
    # know) is a fault between the gateway and upstream, and it was answered "no such conversation".
    fault = {"endpoint": "list", "kind": "status", "status": 404}
    (await gateway.emulator.post("/_emulator/faults", json=fault)).raise_for_status()
    response = await gateway.client.get(
        LIST, params={"agent_id": "agent_demo"}, headers=gateway.headers("alice")
    )
    assert response.status_code == 502, response.text
    assert problem(response)["code"] == "upstream_error"
    assert response.headers["cache-control"] == "private, no-store"
    assert response.headers["ratelimit"].startswith('"user-history"')


async def test_list_returns_only_the_callers_conversations(gateway: Gateway) -> None:
    mine = {await seed(gateway, "alice"), await seed(gateway, "alice")}
    await seed(gateway, "bob")
    response = await gateway.client.get(LIST, headers=gateway.headers("alice"))
    assert response.status_code == 200
    body = response.json()
    assert {row["conversation_id"] for row in body["conversations"]} == mine
    assert body["has_more"] is False and body["next_cursor"] is None


@pytest.mark.parametrize("user_id", ["alice", "bob", ""])
async def test_a_client_user_id_is_rejected_and_never_forwarded(gateway: Gateway, user_id: str) -> None:
    response = await gateway.client.get(LIST, params={"user_id": user_id}, headers=gateway.headers("alice"))
    assert response.status_code == 422
    body = problem(response)
    assert body["code"] == "invalid_request" and body["parameter"] == "user_id"
    assert await upstream_calls(gateway) == []


Query = list[tuple[str, str | int | float | bool | None]]
INVALID_LIST_QUERIES: list[Query] = [
    [("unknown", "1")],
    [("xi-api-key", "k")],
    [("page_size", "0")],
    [("page_size", "101")],
    [("page_size", "ten")],
    [("page_size", "5"), ("page_size", "6")],
    [("call_successful", "maybe")],
    [("call_start_before_unix", "-1")],
    [("call_start_after_unix", "1e9")],
    [("call_duration_min_secs", "-5")],
    [("call_duration_max_secs", "99999999999999999999")],
    [("rating_min", "0")],
    [("rating_max", "6")],
    [("has_feedback_comment", "yes")],
    [("summary_mode", "all")],
    [("search", "x" * 201)],
    [("search", "line\nbreak")],
    [("search", "next\x85line")],  # a C1 control character
    [("agent_id", "../agents")],
    [("agent_id", "a" * 129)],
    [("evaluation_params", "resolved")],
    [("evaluation_params", "resolved:maybe")],
    [("evaluation_params", "bad id:success")],
    [("evaluation_params", ":success")],
    [("data_collection_params", "city")],
    [("data_collection_params", "city:like:Oslo")],
    [("data_collection_params", "city:eq")],
    [("data_collection_params", "city:eq:")],
    [("data_collection_params", "city:exists:line\nbreak")],
    [("data_collection_params", "city:in:a||b")],
    [("data_collection_params", "ci/ty:eq:Oslo")],
    [("data_collection_params", "city:eq:" + "x" * 201)],
    [("tool_names", "")],
    [("tool_names", "t" * 129)],
    [("tool_names", "tab\there")],
    [("tool_names", "t")] * 21,
    [("cursor", "not-a-cursor")],
    # Edited past the longest cursor the gateway seals, or with a control character: not sealed here either.
    [("cursor", "k" * 8193)],
    [("cursor", "line\nbreak")],
    # A forged cursor whose payload nests 1,400 arrays: it once reached the JSON parser and escaped as a 500.
    [("cursor", base64.urlsafe_b64encode(b"[" * 1400).rstrip(b"=").decode() + "." + "A" * 43)],
]


@pytest.mark.parametrize(
    "query",
    [
        [("search", "return\u00a0policy")],  # a no-break space, as pasted from a web page or a word processor
        [("search", "東京\u3000大阪")],  # an ideographic space, as typed with a Japanese input method
        [("search", "café 😀 \u200d")],
        [("tool_names", "order\u00a0status")],
        [("data_collection_params", "name:eq:Jean\u00a0Dupont")],
        [("data_collection_params", "city:in:Zürich|東京\u3000都")],
    ],
    ids=["search-nbsp", "search-ideographic-space", "search-emoji", "tool-nbsp", "eq-nbsp", "in-unicode"],
)
async def test_free_text_filters_take_any_text_without_control_characters(
    gateway: Gateway, query: Query
) -> None:
    # The document allows every character but controls; Python's isprintable() also refused every space but
    # U+0020, so a pasted no-break space or a Japanese full-width space made a search a 422.
    response = await gateway.client.get(LIST, params=query, headers=gateway.headers("alice"))
    assert response.status_code == 200, response.text
    [call] = await upstream_calls(gateway, "list")
    assert [tuple(item) for item in call["query"]] == [("user_id", "alice"), *query]


@pytest.mark.parametrize(
    "query_string",
    ["search=%FF", "tool_names=caf%E9", "data_collection_params=city:eq:%C3", "search=ok&foo%FF=1"],
    ids=["search-ff", "tool-latin1", "truncated-utf8", "name-not-utf8"],
)
async def test_percent_escapes_that_are_not_utf8_are_refused_before_upstream(
    gateway: Gateway, query_string: str
) -> None:
    # They used to be decoded with errors="replace": `search=%FF` searched upstream for U+FFFD, a filter
    # the client never sent.
    response = await gateway.client.get(f"{LIST}?{query_string}", headers=gateway.headers("alice"))
    assert response.status_code == 422, response.text
    assert problem(response)["code"] == "invalid_request"
    assert await upstream_calls(gateway) == []


@pytest.mark.parametrize("query", INVALID_LIST_QUERIES, ids=lambda q: f"{q[0][0]}={str(q[0][1])[:20]}")
async def test_invalid_list_parameters_are_refused_before_upstream(gateway: Gateway, query: Query) -> None:
    response = await gateway.client.get(LIST, params=query, headers=gateway.headers("alice"))
    assert response.status_code == 422, response.text
    # A cursor the gateway did not seal is its own code; every other parameter is an invalid request.
    expected = "invalid_cursor" if query[0][0] == "cursor" else "invalid_request"
    assert problem(response)["code"] == expected, response.text
    assert await upstream_calls(gateway) == []


async def test_list_refuses_agents_the_token_may_not_use(gateway: Gateway) -> None:
    for headers, agent in (
        (gateway.headers("alice"), "agent_unlisted"),
        (gateway.headers("alice", agents=["agent_demo"]), "agent_other"),
    ):
        response = await gateway.client.get(LIST, params={"agent_id": agent}, headers=headers)
        assert response.status_code == 403
        assert problem(response)["code"] == "agent_not_allowed"
    assert await upstream_calls(gateway) == []


async def test_list_drops_rows_of_agents_outside_the_tokens_agents_claim(gateway: Gateway) -> None:
    demo = await seed(gateway, "alice", agent_id="agent_demo")
    await seed(gateway, "alice", agent_id="agent_other")
    await seed(gateway, "alice", agent_id="agent_unlisted")
    narrowed = await gateway.client.get(
        LIST, headers=gateway.headers("alice", agents=["agent_demo", "agent_x"])
    )
    assert [row["conversation_id"] for row in narrowed.json()["conversations"]] == [demo]
    unrestricted = await gateway.client.get(LIST, headers=gateway.headers("alice"))
    assert len(unrestricted.json()["conversations"]) == 3


async def test_list_drops_rows_the_ownership_mode_does_not_grant(mode_gateway: Gateway) -> None:
    gw = mode_gateway
    mode = gw.settings.ownership_mode
    # Only scenarios whose upstream user_id is alice can be returned by the forced upstream filter.
    ids = {
        name: await scenario(gw, name) for name in ("own_minted", "own_unminted", "spoofed", "foreign_minted")
    }
    response = await gw.client.get(LIST, headers=gw.headers("alice"))
    assert response.status_code == 200
    listed = {row["conversation_id"] for row in response.json()["conversations"]}
    assert listed == {ids[name] for name in GRANTED[mode] if name in ids}


async def test_cursor_pages_for_its_caller_and_is_refused_for_another(gateway: Gateway) -> None:
    created = {await seed(gateway, "alice", start_time_unix_secs=1_700_000_000 + i) for i in range(3)}
    await seed(gateway, "bob")
    alice, bob = gateway.headers("alice"), gateway.headers("bob")

    seen: list[str] = []
    cursor: str | None = None
    client_cursors: list[str] = []
    upstream_cursors: list[str] = []
    for _ in range(5):
        params = {"page_size": "1", **({"cursor": cursor} if cursor else {})}
        await clear_upstream_log(gateway)
        response = await gateway.client.get(LIST, params=params, headers=alice)
        assert response.status_code == 200, response.text
        [call] = await upstream_calls(gateway, "list")
        upstream_cursors += [value for name, value in call["query"] if name == "cursor"]
        page = response.json()
        seen += [row["conversation_id"] for row in page["conversations"]]
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            break
        client_cursors.append(cursor)
    assert sorted(seen) == sorted(created)
    assert len(client_cursors) == len(upstream_cursors) == 2
    assert not set(client_cursors) & set(upstream_cursors), (
        "the client gets a sealed cursor, never the raw one"
    )
    first_cursor = client_cursors[0]

    await clear_upstream_log(gateway)
    replay = await gateway.client.get(LIST, params={"cursor": first_cursor}, headers=bob)
    assert replay.status_code == 422
    assert problem(replay)["code"] == "invalid_cursor"
    tampered = first_cursor[:-2] + ("AA" if not first_cursor.endswith("AA") else "BB")
    refused = await gateway.client.get(LIST, params={"cursor": tampered}, headers=alice)
    assert refused.status_code == 422
    assert await upstream_calls(gateway) == []


# --------------------------------------------------------------------------- streaming through uvicorn


@pytest.fixture
async def served_gateway(emulator_url: str, redis_url: str) -> AsyncIterator[tuple[str, httpx.AsyncClient]]:
    """Serve a gateway (user_id mode) with uvicorn on loopback; yield its URL and an emulator client."""
    env = gateway_env(emulator_url, EMULATOR_API_KEY, redis_url, OWNERSHIP_MODE="user_id")
    with serve(create_app(load_settings(env))) as served:
        async with httpx.AsyncClient(base_url=emulator_url) as emulator:
            yield served.url, emulator


def _token(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(TEST_JWT_SECRET, sub, ttl=300)}"}


async def test_audio_memory_stays_bounded_for_a_large_file(
    served_gateway: tuple[str, httpx.AsyncClient],
) -> None:
    url, emulator = served_gateway
    size = 64 * 1024 * 1024
    created = await emulator.post(
        "/_emulator/conversations", json={"user_id": "alice", "audio_size_bytes": size}
    )
    conversation_id = created.json()["conversation_id"]
    received = 0
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            async with client.stream(
                "GET", f"{LIST}/{conversation_id}/audio", headers=_token("alice")
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-length"] == str(size)
                async for chunk in response.aiter_raw():
                    received += len(chunk)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
    assert received == size
    # Emulator, gateway and client all run in this process: their peak together stays far below the file.
    assert peak < size // 8, f"peak {peak} bytes while streaming {size}"


class EndlessAudioUpstream:
    """An upstream whose audio never ends; it records when the gateway hangs up on it."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.bytes_sent = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path: str = scope["path"]
        if not path.endswith("/audio"):
            conversation_id = path.rsplit("/", 1)[-1]
            body = json.dumps(
                {"conversation_id": conversation_id, "agent_id": "agent_demo", "user_id": "alice"}
            )
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"audio/ogg"), (b"content-length", str(2**40).encode())],
            }
        )
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        try:
            chunk = b"\x00" * 65536
            while not gone.is_set():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                self.bytes_sent += len(chunk)
                await asyncio.sleep(0)  # let the disconnect watcher run between chunks
        finally:
            watcher.cancel()
            self.closed.set()


async def test_client_disconnect_closes_the_upstream_audio_stream(redis_url: str) -> None:
    upstream = EndlessAudioUpstream()
    with serve(upstream, lifespan="off") as upstream_server:
        env = gateway_env(upstream_server.url, EMULATOR_API_KEY, redis_url, OWNERSHIP_MODE="user_id")
        with serve(create_app(load_settings(env))) as gateway_server:
            async with httpx.AsyncClient(base_url=gateway_server.url, timeout=30) as client:
                async with client.stream(
                    "GET", f"{LIST}/conv_endless/audio", headers=_token("alice")
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"] == "audio/ogg"
                    received = 0
                    async for chunk in response.aiter_raw():
                        received += len(chunk)
                        if received > 1_000_000:
                            break
            # Leaving the block closed the client connection; the gateway must now hang up on upstream
            # promptly, not keep draining it (the connection is gone, but upstream data keeps arriving).
            sent_at_close = upstream.bytes_sent
            assert await asyncio.to_thread(upstream.closed.wait, 15), "upstream stream left open"
            assert upstream.bytes_sent - sent_at_close < 64 * 1024 * 1024


async def test_a_listener_that_stops_reading_is_cut_off_and_upstream_released(redis_url: str) -> None:
    # Without a deadline on sends, a client that never reads held the upstream stream (and an audio place)
    # for as long as it kept the connection open.
    upstream = EndlessAudioUpstream()
    with serve(upstream, lifespan="off") as upstream_server:
        env = gateway_env(
            upstream_server.url,
            EMULATOR_API_KEY,
            redis_url,
            OWNERSHIP_MODE="user_id",
            UPSTREAM_AUDIO_READ_TIMEOUT_SECONDS="0.5",
        )
        with serve(create_app(load_settings(env))) as gateway_server:
            with socket.create_connection(("127.0.0.1", gateway_server.port), timeout=10) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                token = _token("alice")["Authorization"]
                sock.sendall(
                    f"GET {LIST}/conv_endless/audio HTTP/1.1\r\nHost: gateway\r\nAuthorization: {token}\r\n\r\n".encode()
                )
                assert sock.recv(12) == b"HTTP/1.1 200"
                # The client now reads nothing more but keeps the connection open.
                assert await asyncio.to_thread(upstream.closed.wait, 10), (
                    "a stalled listener kept upstream open"
                )
