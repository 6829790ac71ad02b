"""Property: for random users, conversations and requests, no request returns or changes another user's data.

Hypothesis draws a world (conversations with a ledger owner or none and an upstream `user_id` that may
be the owner, someone else, a near-homoglyph of a user or nothing) and a sequence of requests by random
callers (details, audio, feedback, delete, list with pagination, list with a spoofed `user_id`). Against
the real gateway (ASGI), the real emulator and real Redis, in every ownership mode:

- a per-conversation request succeeds exactly when the mode grants the caller the conversation, and is
  the uniform 404 otherwise;
- a feedback or delete reaches upstream only for the caller's own conversation;
- a listing (every page, sealed cursors followed) returns exactly the caller's conversations.

Companion properties live where their code is: redaction in tests/test_redaction.py, client-IP
resolution against spoofed X-Forwarded-For hops in tests/test_client_ip.py.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.ledger import LedgerEntry, encode_entry, ledger_key
from service.ownership import grants
from service.settings import OwnershipMode
from tests.reliability.support import AGENT, CONVERSATIONS, GENEROUS_LIMITS, bearer, scaled, write_config
from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

# Distinct users that a sloppy comparison (case, whitespace, unicode normalisation) would confuse.
USERS = ("alice", "Alice", "alice ", "bob", "b\u00f6b", "bo\u0308b")
ACTIONS = ("details", "audio", "feedback", "delete", "list", "list_spoofed")
MakeGateway = Callable[..., AbstractAsyncContextManager[Gateway]]


@dataclass(frozen=True)
class Conversation:
    """A conversation of the drawn world."""

    conversation_id: str
    ledger_user: str | None
    upstream_user: str | None


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[Conversation], list[tuple[str, str, int, int]]]:
    """Draw conversations and a sequence of (caller, action, conversation index, page size) requests."""
    count = draw(st.integers(1, 8))
    owners = st.one_of(st.none(), st.sampled_from(USERS))
    conversations = [Conversation(f"conv_{i}", draw(owners), draw(owners)) for i in range(count)]
    requests = draw(
        st.lists(
            st.tuples(
                st.sampled_from(USERS), st.sampled_from(ACTIONS), st.integers(0, count - 1), st.integers(1, 3)
            ),
            min_size=1,
            max_size=12,
        )
    )
    return conversations, requests


def owner_grants(mode: OwnershipMode, caller: str, conversation: Conversation) -> bool:
    """Return the ground truth: does `mode` give `caller` this conversation?"""
    entry = None if conversation.ledger_user is None else LedgerEntry(conversation.ledger_user, AGENT, 0)
    return grants(mode, caller, entry, conversation.upstream_user)


def listed_for(mode: OwnershipMode, caller: str, conversation: Conversation) -> bool:
    """Return whether the caller's listing must contain this conversation (upstream filters by user_id)."""
    return conversation.upstream_user == caller and owner_grants(mode, caller, conversation)


@pytest.fixture(params=["ledger_or_user_id", "ledger", "user_id"])
async def mode_gateway(
    request: pytest.FixtureRequest, make_gateway: MakeGateway, tmp_path: Path
) -> AsyncIterator[Gateway]:
    """Yield a gateway in each ownership mode, with limits no example reaches."""
    config = write_config(tmp_path, GENEROUS_LIMITS)
    async with make_gateway(OWNERSHIP_MODE=request.param, GATEWAY_CONFIG=config) as gateway:
        yield gateway


@settings(
    max_examples=scaled(40),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(world=worlds())
async def test_no_request_returns_or_changes_another_users_conversation(
    mode_gateway: Gateway,
    redis_server: RedisServer,
    world: tuple[list[Conversation], list[tuple[str, str, int, int]]],
) -> None:
    gw = mode_gateway
    mode: OwnershipMode = gw.settings.ownership_mode
    conversations, requests = world
    await reset_world(gw, redis_server, conversations)
    deleted: set[str] = set()

    for caller, action, index, page_size in requests:
        headers = bearer(caller)
        target = conversations[index]
        path = f"{CONVERSATIONS}/{target.conversation_id}"
        await gw.emulator.delete("/_emulator/requests")
        if action in ("list", "list_spoofed"):
            params = {"page_size": str(page_size)}
            if action == "list_spoofed":
                params["user_id"] = target.upstream_user or "alice"
                response = await gw.client.get(CONVERSATIONS, params=params, headers=headers)
                assert response.status_code == 422
                assert await gw.upstream_requests() == []
                continue
            seen = await list_everything(gw, headers, params)
            expected = {
                c.conversation_id
                for c in conversations
                if c.conversation_id not in deleted and listed_for(mode, caller, c)
            }
            assert seen == expected, (mode, caller)
            continue

        if action == "details":
            response = await gw.client.get(path, headers=headers)
        elif action == "audio":
            response = await gw.client.get(f"{path}/audio", headers=headers)
        elif action == "feedback":
            response = await gw.client.post(f"{path}/feedback", json={"feedback": "dislike"}, headers=headers)
        else:
            response = await gw.client.delete(path, headers=headers)
        owned = owner_grants(mode, caller, target) and target.conversation_id not in deleted
        assert response.status_code == (200 if owned else 404), (mode, caller, action, target, response.text)
        if response.status_code == 200 and action == "details":
            assert response.json()["conversation_id"] == target.conversation_id
        changes = [
            call
            for call in await gw.upstream_requests()
            if call["endpoint"] in ("feedback", "delete", "audio")
        ]
        assert bool(changes) == (owned and action in ("feedback", "delete", "audio")), (mode, caller, action)
        if owned and action == "delete":
            deleted.add(target.conversation_id)


async def reset_world(gw: Gateway, redis_server: RedisServer, conversations: list[Conversation]) -> None:
    """Empty the emulator and Redis, then seed the drawn conversations and ledger entries."""
    (await gw.emulator.post("/_emulator/reset", json={"seed": False})).raise_for_status()
    with contextlib.closing(redis_server.client()) as client:
        client.flushall()
        for c in conversations:
            if c.ledger_user is not None:
                entry = LedgerEntry(c.ledger_user, AGENT, int(time.time()))
                client.set(ledger_key(c.conversation_id), encode_entry(entry))
    for c in conversations:
        spec: dict[str, Any] = {
            "conversation_id": c.conversation_id,
            "user_id": c.upstream_user,
            "agent_id": AGENT,
            "audio_size_bytes": 256,
        }
        (await gw.emulator.post("/_emulator/conversations", json=spec)).raise_for_status()


async def list_everything(gw: Gateway, headers: dict[str, str], params: dict[str, str]) -> set[str]:
    """Follow every page of the caller's listing and return the conversation ids seen."""
    seen: set[str] = set()
    cursor: str | None = None
    for _ in range(20):
        query = dict(params) if cursor is None else {**params, "cursor": cursor}
        response = await gw.client.get(CONVERSATIONS, params=query, headers=headers)
        assert response.status_code == 200, response.text
        page = response.json()
        seen |= {row["conversation_id"] for row in page["conversations"]}
        cursor = page["next_cursor"]
        if not page["has_more"]:
            return seen
    raise AssertionError("pagination did not end")
