"""Two token issuers in one gateway: its own (the environment's) and a partner's from GATEWAY_CONFIG."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from service.dev_tokens import mint_token
from tests.support.gateway import Gateway

OWN = "https://own.example"
PARTNER = "https://partner.example"
PARTNER_SECRET = "partner-secret-0123456789abcdef0123456789"
SIGNED_URL = "/v1/convai/conversation/get-signed-url"
LIST = "/v1/convai/conversations"
ACTING = "convai:session convai:history convai:act-as"


def partner_headers(sub: str, scopes: str = "convai:session convai:history") -> dict[str, str]:
    """Return an Authorization header with a token of the partner issuer."""
    return {"Authorization": f"Bearer {mint_token(PARTNER_SECRET, sub, scopes=scopes, issuer=PARTNER)}"}


@contextlib.asynccontextmanager
async def own_and_partner(
    tmp_path: Path,
    make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]],
    partner_settings: str,
) -> AsyncIterator[Gateway]:
    """Run a gateway trusting its own issuer and the partner, whose [[issuers]] entry adds `partner_settings`."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[issuers]]\nissuer = "{PARTNER}"\nhs256_secret_env = "PARTNER_SECRET"\n{partner_settings}\n'
    )
    async with make_gateway(
        JWT_ISSUER=OWN, GATEWAY_CONFIG=str(config), PARTNER_SECRET=PARTNER_SECRET
    ) as gateway:
        yield gateway
