"""Acting for a user, end to end: the request runs as the user and the audit log names both principals."""

from __future__ import annotations

import logging

import pytest

from tests.support.gateway import Gateway
from tests.support.servers import RedisServer

SIGNED_URL = "/v1/convai/conversation/get-signed-url"


def audit_records(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    """Return the audit log records of one event."""
    return [r for r in caplog.records if r.name == "convai_gateway.audit" and r.getMessage() == event]


async def test_act_as_mints_for_the_user_and_audits_both(
    gateway: Gateway, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convai_gateway.audit")
    service_token = gateway.headers("backend-gw", scopes="convai:session convai:history convai:act-as")
    response = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_demo"}, headers={**service_token, "X-On-Behalf-Of": "carol"}
    )
    assert response.status_code == 200, response.text
    conversation_id = response.json()["conversation_id"]

    with redis_server.client() as client:
        stored = [client.get(key) for key in client.keys("ledger:*")]
    assert len(stored) == 1 and '"user":"carol"' in str(stored[0]).replace(" ", "")

    (act_as,) = audit_records(caplog, "act_as")
    assert (act_as.__dict__["actor"], act_as.__dict__["user"]) == ("backend-gw", "carol")
    (minted,) = audit_records(caplog, "session_minted")
    assert minted.__dict__["conversation_id"] == conversation_id
    assert minted.__dict__["actor"] == "backend-gw"

    # The conversation is carol's: carol reads it directly, the service principal as itself does not.
    await gateway.emulator.post(
        "/_emulator/conversations",
        json={"conversation_id": conversation_id, "agent_id": "agent_demo", "user_id": "carol"},
    )
    carol = await gateway.client.get(
        f"/v1/convai/conversations/{conversation_id}", headers=gateway.headers("carol")
    )
    itself = await gateway.client.get(f"/v1/convai/conversations/{conversation_id}", headers=service_token)
    assert (carol.status_code, itself.status_code) == (200, 404)


async def test_act_as_rate_limits_count_against_the_user(gateway: Gateway) -> None:
    service_token = gateway.headers("backend-gw", scopes="convai:session convai:act-as")
    burst = gateway.settings.rate_limits["user-session"].burst
    statuses = []
    for _ in range(burst + 1):
        response = await gateway.client.get(
            SIGNED_URL, params={"agent_id": "agent_demo"}, headers={**service_token, "X-On-Behalf-Of": "dave"}
        )
        statuses.append(response.status_code)
    assert statuses == [200] * burst + [429]
    # Another user acted for by the same service token has a budget of their own.
    other = await gateway.client.get(
        SIGNED_URL, params={"agent_id": "agent_demo"}, headers={**service_token, "X-On-Behalf-Of": "erin"}
    )
    assert other.status_code == 200


async def test_on_behalf_of_from_a_plain_user_token_is_forbidden(gateway: Gateway) -> None:
    response = await gateway.client.get(
        SIGNED_URL,
        params={"agent_id": "agent_demo"},
        headers={**gateway.headers("mallory"), "X-On-Behalf-Of": "carol"},
    )
    assert response.status_code == 403
    assert response.json()["code"] == "act_as_not_allowed"
    assert await gateway.upstream_requests() == []
