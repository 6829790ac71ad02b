"""Per-issuer user id namespaces through the real app: two issuers' "alice" are two users.

Issuer A (the environment's, no prefix) and issuer B (a partner, `user_id_prefix = "partner:"`) both sign a
token for sub "alice". Ownership, lists, act-as, rate limits and logs must keep them apart. Every request is
sent twice: the second one is served from the verified-token cache and must behave like the first.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from service.observability import user_hash
from tests.observability.support import access_log_records
from tests.support.gateway import Gateway
from tests.support.issuers import ACTING, LIST, OWN, SIGNED_URL, own_and_partner, partner_headers
from tests.test_act_as import audit_records


@pytest.fixture
async def two_issuers(
    tmp_path: Path, make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]]
) -> AsyncIterator[Gateway]:
    """Yield a gateway trusting its own issuer (no prefix) and a partner whose user ids get "partner:"."""
    async with own_and_partner(tmp_path, make_gateway, 'user_id_prefix = "partner:"') as gateway:
        yield gateway


def own_headers(gateway: Gateway, sub: str, **kwargs: Any) -> dict[str, str]:
    """Return an Authorization header with a token of issuer A (the environment's, no prefix)."""
    return gateway.headers(sub, issuer=OWN, **kwargs)


async def mint(gateway: Gateway, headers: dict[str, str], upstream_user_id: str) -> str:
    """Mint a signed URL and record its conversation upstream with the user_id its client chose."""
    response = await gateway.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=headers)
    assert response.status_code == 200, response.text
    conversation_id: str = response.json()["conversation_id"]
    seeded = await gateway.emulator.post(
        "/_emulator/conversations",
        json={"conversation_id": conversation_id, "agent_id": "agent_demo", "user_id": upstream_user_id},
    )
    seeded.raise_for_status()
    return conversation_id


async def listed(gateway: Gateway, headers: dict[str, str]) -> set[str]:
    """Return the conversation ids the caller's list shows."""
    response = await gateway.client.get(LIST, headers=headers)
    assert response.status_code == 200, response.text
    return {row["conversation_id"] for row in response.json()["conversations"]}


async def status_of(gateway: Gateway, conversation_id: str, headers: dict[str, str]) -> int:
    """Return the status of the caller's details request for a conversation."""
    return (await gateway.client.get(f"{LIST}/{conversation_id}", headers=headers)).status_code


async def test_the_two_alices_never_see_each_others_conversations(two_issuers: Gateway) -> None:
    own_alice = own_headers(two_issuers, "alice")
    partner_alice = partner_headers("alice")
    own_conversation = await mint(two_issuers, own_alice, "alice")
    # B's client sets its user id upstream: the prefixed one (what the gateway lists by), or naively its sub,
    # which is A's alice's upstream user_id too; the ledger still says whose it is.
    partner_conversation = await mint(two_issuers, partner_alice, "partner:alice")
    naive_partner_conversation = await mint(two_issuers, partner_alice, "alice")
    for _ in range(2):  # the second round from the verified-token cache
        assert await listed(two_issuers, own_alice) == {own_conversation}
        assert await listed(two_issuers, partner_alice) == {partner_conversation}
        assert await status_of(two_issuers, own_conversation, own_alice) == 200
        assert await status_of(two_issuers, partner_conversation, own_alice) == 404
        assert await status_of(two_issuers, naive_partner_conversation, own_alice) == 404
        assert await status_of(two_issuers, own_conversation, partner_alice) == 404
        assert await status_of(two_issuers, partner_conversation, partner_alice) == 200
        assert await status_of(two_issuers, naive_partner_conversation, partner_alice) == 200
    lists = [r for r in await two_issuers.upstream_requests() if r["endpoint"] == "list"]
    assert {dict(r["query"])["user_id"] for r in lists} == {"alice", "partner:alice"}


async def test_partner_act_as_acts_for_its_own_alice_only(
    two_issuers: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convai_gateway.audit")
    service = {**partner_headers("partner-gw", ACTING), "X-On-Behalf-Of": "alice"}
    minted = []
    for _ in range(2):
        minted.append(await mint(two_issuers, service, "partner:alice"))
    for conversation_id in minted:
        assert await status_of(two_issuers, conversation_id, own_headers(two_issuers, "alice")) == 404
        assert await status_of(two_issuers, conversation_id, partner_headers("alice")) == 200
    acts = audit_records(caplog, "act_as")
    assert [(r.__dict__["actor"], r.__dict__["user"]) for r in acts] == [
        ("partner:partner-gw", "partner:alice")
    ] * 2
    # Naming another namespace in the header stays inside the partner's: "partner:" + the header value.
    caplog.clear()
    reach = {**partner_headers("partner-gw", ACTING), "X-On-Behalf-Of": "partner:alice"}
    await mint(two_issuers, reach, "x")
    (act,) = audit_records(caplog, "act_as")
    assert act.__dict__["user"] == "partner:partner:alice"


async def test_own_act_as_reaches_a_prefixed_user_by_the_prefixed_id(
    two_issuers: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    # README: the unprefixed issuer's act-as token (your API gateway's) may act for any user id, prefixed ones
    # included; the header names the user id as stored, prefix and all.
    caplog.set_level(logging.INFO, logger="convai_gateway.audit")
    partner_conversation = await mint(two_issuers, partner_headers("alice"), "partner:alice")
    own_conversation = await mint(two_issuers, own_headers(two_issuers, "alice"), "alice")
    acting = own_headers(two_issuers, "api-gw", scopes=ACTING)
    for _ in range(2):
        for_partner = {**acting, "X-On-Behalf-Of": "partner:alice"}
        assert await status_of(two_issuers, partner_conversation, for_partner) == 200
        assert await status_of(two_issuers, own_conversation, for_partner) == 404
        for_own = {**acting, "X-On-Behalf-Of": "alice"}
        assert await status_of(two_issuers, own_conversation, for_own) == 200
        assert await status_of(two_issuers, partner_conversation, for_own) == 404
    acts = [(r.__dict__["actor"], r.__dict__["user"]) for r in audit_records(caplog, "act_as")]
    assert acts == ([("api-gw", "partner:alice")] * 2 + [("api-gw", "alice")] * 2) * 2


async def test_the_two_alices_have_rate_limits_of_their_own(two_issuers: Gateway) -> None:
    burst = two_issuers.settings.rate_limits["user-session"].burst
    statuses = []
    for _ in range(burst + 1):
        response = await two_issuers.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner_headers("alice")
        )
        statuses.append(response.status_code)
    assert statuses == [200] * burst + [429]
    for _ in range(2):
        own = await two_issuers.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers=own_headers(two_issuers, "alice")
        )
        assert own.status_code == 200, own.text


async def test_logs_name_the_prefixed_user(two_issuers: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="convai_gateway.audit")
    with access_log_records() as access:
        for _ in range(2):
            response = await two_issuers.client.get(
                SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner_headers("alice")
            )
            assert response.status_code == 200
        assert access.wait_for(2, timeout=5)
    assert [r.__dict__["user"] for r in access.records] == [user_hash("partner:alice")] * 2
    assert [r.__dict__["user"] for r in audit_records(caplog, "session_minted")] == ["partner:alice"] * 2


async def test_user_id_too_long_with_the_prefix_is_a_401_like_any_bad_user_id(two_issuers: Gateway) -> None:
    longest = 256 - len("partner:")
    for _ in range(2):
        fits = await two_issuers.client.get(LIST, headers=partner_headers("a" * longest))
        assert fits.status_code == 200, fits.text
    too_long = partner_headers("a" * (longest + 1))
    reference = await two_issuers.client.get(LIST, headers=own_headers(two_issuers, "a" * 257))
    for _ in range(2):
        refused = await two_issuers.client.get(LIST, headers=too_long)
        assert refused.status_code == 401, refused.text
        assert refused.headers["content-type"] == reference.headers["content-type"]
        assert refused.headers["www-authenticate"] == reference.headers["www-authenticate"]
        assert refused.json() == reference.json()
        assert refused.json()["code"] == "invalid_token"


async def test_own_issuer_cannot_claim_a_user_of_the_partner_namespace(two_issuers: Gateway) -> None:
    partner_conversation = await mint(two_issuers, partner_headers("alice"), "partner:alice")
    forged = own_headers(two_issuers, "partner:alice")
    for _ in range(2):
        refused = await two_issuers.client.get(f"{LIST}/{partner_conversation}", headers=forged)
        assert refused.status_code == 401, refused.text
        assert refused.json()["code"] == "invalid_token"
