"""Real keys, real tokens and a real JWKS server for the authentication tests."""

from __future__ import annotations

import base64
import contextlib
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec as ec_keys
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from service.auth import Authenticator
from service.errors import AuthenticationFailed
from service.settings import IssuerConfig, Secret, Settings

T0 = 1_700_000_000.0
HS_SECRET = "hs256-test-secret-0123456789abcdef-0123456789"
OTHER_HS_SECRET = "another-hs256-secret-fedcba9876543210-xyz!"
WORKSPACE_AGENTS = frozenset({"agent_a", "agent_b", "agent_c"})

PrivateKey = rsa_keys.RSAPrivateKey | ec_keys.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class FakeClock:
    """A settable clock, injected wherever the code under test reads the time."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move time forward."""
        self.now += seconds


@dataclass(frozen=True)
class Keys:
    """Private keys generated once per test session."""

    rsa: rsa_keys.RSAPrivateKey
    rsa2: rsa_keys.RSAPrivateKey
    ec: ec_keys.EllipticCurvePrivateKey
    ed: ed25519.Ed25519PrivateKey


def generate_keys() -> Keys:
    """Generate an RSA pair, an EC P-256 key and an Ed25519 key."""
    return Keys(
        rsa=rsa_keys.generate_private_key(public_exponent=65537, key_size=2048),
        rsa2=rsa_keys.generate_private_key(public_exponent=65537, key_size=2048),
        ec=ec_keys.generate_private_key(ec_keys.SECP256R1()),
        ed=ed25519.Ed25519PrivateKey.generate(),
    )


def public_pem(key: PrivateKey) -> str:
    """Return the PEM (SubjectPublicKeyInfo) of a private key's public half."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def public_jwk(key: PrivateKey, kid: str | None, alg: str | None = None, **extra: Any) -> dict[str, Any]:
    """Return the public JWK of a private key, with `kid`, optional `alg` and extra members."""
    public = key.public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa_keys.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec_keys.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    if alg is not None:
        jwk["alg"] = alg
    jwk.update(extra)
    return jwk


def claims(now: float = T0, **overrides: Any) -> dict[str, Any]:
    """Return a valid claim set at `now`; an override of None removes the claim."""
    base: dict[str, Any] = {"sub": "user-1", "iat": int(now), "exp": int(now) + 600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], key: PrivateKey | str, algorithm: str, **headers: Any) -> str:
    """Sign `payload` with PyJWT."""
    return jwt.encode(payload, key, algorithm=algorithm, headers=headers or None)


def b64(data: bytes) -> str:
    """Encode unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64json(value: Any) -> str:
    """Encode a JSON value as an unpadded base64url segment."""
    return b64(json.dumps(value).encode())


def settings_for(*issuers: IssuerConfig, **overrides: Any) -> Settings:
    """Build Settings with these issuers and the test workspace agents."""
    values: dict[str, Any] = {
        "elevenlabs_api_key": Secret("xi-test-key-0000000000000000"),
        "issuers": issuers,
        "allowed_agent_ids": WORKSPACE_AGENTS,
    }
    values.update(overrides)
    return Settings(**values)


def hs_issuer(secret: str = HS_SECRET, **overrides: Any) -> IssuerConfig:
    """Return an HS256-only issuer."""
    values: dict[str, Any] = {"issuer": None, "algorithms": ("HS256",), "hs256_secret": Secret(secret)}
    values.update(overrides)
    return IssuerConfig(**values)


def jwks_issuer(url: str, **overrides: Any) -> IssuerConfig:
    """Return an issuer whose keys come from the JWKS at `url`."""
    values: dict[str, Any] = {"issuer": None, "algorithms": ("RS256", "ES256", "EdDSA"), "jwks_url": url}
    values.update(overrides)
    return IssuerConfig(**values)


@dataclass
class JwksServerState:
    """What the loopback JWKS server answers; tests change it while it runs. Counts fetches."""

    keys: list[dict[str, Any]] = field(default_factory=list)
    cache_control: str | None = "max-age=600"
    age: str | None = None  # an Age header, as a cache in front of the IdP adds
    status: int = 200
    raw_body: bytes | None = None
    chunked: bool = False
    etag: str | None = None
    last_modified: str | None = None
    fetches: int = 0
    not_modified: int = 0  # fetches answered 304 because a validator matched
    conditions: list[dict[str, str]] = field(default_factory=list)  # validators each fetch sent
    lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """Restore the defaults between tests."""
        with self.lock:
            self.keys = []
            self.cache_control = "max-age=600"
            self.age = None
            self.status = 200
            self.raw_body = None
            self.chunked = False
            self.etag = None
            self.last_modified = None
            self.fetches = 0
            self.not_modified = 0
            self.conditions = []


def jwks_app(state: JwksServerState) -> Starlette:
    """Return a Starlette app serving `state` at /jwks.json."""

    async def jwks(request: Request) -> Response:
        sent = {
            name: request.headers[name]
            for name in ("if-none-match", "if-modified-since")
            if name in request.headers
        }
        with state.lock:
            state.fetches += 1
            state.conditions.append(sent)
            body = state.raw_body if state.raw_body is not None else json.dumps({"keys": state.keys}).encode()
            headers = {"Cache-Control": state.cache_control} if state.cache_control else {}
            if state.age is not None:
                headers["Age"] = state.age
            if state.etag is not None:
                headers["ETag"] = state.etag
            if state.last_modified is not None:
                headers["Last-Modified"] = state.last_modified
            status, chunked = state.status, state.chunked
            # A matching validator (RFC 9110 section 13.1: If-None-Match wins when both are sent).
            if "if-none-match" in sent:
                unchanged = sent["if-none-match"] == state.etag
            else:
                unchanged = "if-modified-since" in sent and sent["if-modified-since"] == state.last_modified
            if status == 200 and unchanged:
                state.not_modified += 1
                return Response(status_code=304, headers=headers)
        if chunked:

            async def chunks() -> AsyncIterator[bytes]:
                for start in range(0, len(body), 16 * 1024):
                    yield body[start : start + 16 * 1024]

            return StreamingResponse(
                chunks(), status_code=status, media_type="application/json", headers=headers
            )
        return Response(body, status_code=status, media_type="application/json", headers=headers)

    return Starlette(routes=[Route("/jwks.json", jwks)])


@contextlib.asynccontextmanager
async def started(settings: Settings, clock: FakeClock, **kwargs: Any) -> AsyncIterator[Authenticator]:
    """Start an Authenticator (prefetching its JWKS) for the block, then close it."""
    authenticator = Authenticator(settings, clock=clock, **kwargs)
    await authenticator.start()
    try:
        yield authenticator
    finally:
        await authenticator.aclose()


async def rejection(authenticator: Authenticator, token: str, on_behalf_of: str | None = None) -> str:
    """Authenticate `token`, expect a 401, and return its reason class."""
    with pytest.raises(AuthenticationFailed) as info:
        await authenticator.authenticate(f"Bearer {token}", on_behalf_of)
    assert info.value.status == 401
    assert token not in str(info.value.detail) and token not in json.dumps(info.value.extra)
    return info.value.reason
