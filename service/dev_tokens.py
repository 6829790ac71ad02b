"""Mint HS256 development tokens (the `token` and `dev` commands, and the tests)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import jwt


def mint_token(
    secret: str,
    sub: str,
    *,
    scopes: str | None = "convai:session convai:history",
    ttl: int = 3600,
    agents: Sequence[str] | None = None,
    issuer: str | None = None,
    audience: str | None = None,
    now: float | None = None,
    **claims: Any,
) -> str:
    """Return an HS256 JWT for `sub` with the given scopes, lifetime and optional agents claim."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "sub": sub,
        "iat": issued,
        "nbf": issued,
        "exp": issued + ttl,
        "jti": uuid.uuid4().hex,
    }
    if scopes is not None:
        payload["scope"] = scopes
    if agents is not None:
        payload["agents"] = list(agents)
    if issuer:
        payload["iss"] = issuer
    if audience:
        payload["aud"] = audience
    payload.update(claims)
    return jwt.encode(payload, secret, algorithm="HS256")
