"""Per-issuer scope allowlists through the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from service.dev_tokens import mint_token
from tests.support.gateway import Gateway

OWN = "https://own.example"
PARTNER = "https://partner.example"
PARTNER_SECRET = "partner-secret-0123456789abcdef0123456789"
SIGNED_URL = "/v1/convai/conversation/get-signed-url"
LIST = "/v1/convai/conversations"
ACTING = "convai:session convai:history convai:act-as"


def partner_headers(sub: str, scopes: str) -> dict[str, str]:
    """Return an Authorization header with a token of the partner issuer."""
    return {"Authorization": f"Bearer {mint_token(PARTNER_SECRET, sub, scopes=scopes, issuer=PARTNER)}"}


@pytest.fixture
async def two_issuers(
    tmp_path: Path, make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]]
) -> AsyncIterator[Gateway]:
    """Yield a gateway trusting its own issuer (environment, no allowlist) and a partner bound to sessions."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[issuers]]\nissuer = "{PARTNER}"\nhs256_secret_env = "PARTNER_SECRET"\n'
        'allowed_scopes = ["convai:session"]\n'
    )
    async with make_gateway(
        JWT_ISSUER=OWN, GATEWAY_CONFIG=str(config), PARTNER_SECRET=PARTNER_SECRET
    ) as gateway:
        yield gateway


async def test_restricted_issuer_cannot_list_conversations_its_token_claims(two_issuers: Gateway) -> None:
    partner = partner_headers("bob", "convai:session convai:history")
    for _ in range(2):  # the second request verifies nothing: the token comes from the cache
        refused = await two_issuers.client.get(LIST, headers=partner)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "insufficient_scope"
        assert refused.json()["required_scope"] == "convai:history"
    assert await two_issuers.upstream_requests() == []
    own = await two_issuers.client.get(LIST, headers=two_issuers.headers("bob", issuer=OWN))
    assert own.status_code == 200, own.text
    minted = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner)
    assert minted.status_code == 200, minted.text


async def test_restricted_issuer_cannot_act_as_even_with_the_scope_in_its_token(two_issuers: Gateway) -> None:
    partner = {**partner_headers("partner-gw", ACTING), "X-On-Behalf-Of": "carol"}
    for _ in range(2):
        refused = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "act_as_not_allowed"
    assert await two_issuers.upstream_requests() == []
    own = {**two_issuers.headers("own-gw", scopes=ACTING, issuer=OWN), "X-On-Behalf-Of": "carol"}
    for _ in range(2):
        acting = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=own)
        assert acting.status_code == 200, acting.text
