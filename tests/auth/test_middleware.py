"""AuthenticationMiddleware over a tiny Starlette app, called through httpx.ASGITransport."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import Scope

from service.auth import AuthenticationMiddleware, Authenticator
from service.errors import GatewayError, RateLimited
from service.state import principal_of
from tests.auth.support import (
    HS_SECRET,
    OTHER_HS_SECRET,
    FakeClock,
    b64json,
    claims,
    hs_issuer,
    settings_for,
    sign,
)


async def whoami(request: Request) -> JSONResponse:
    """Echo the principal the middleware placed in the request state."""
    principal = principal_of(request)
    return JSONResponse(
        {"user_id": principal.user_id, "actor": principal.actor, "scopes": sorted(principal.scopes)}
    )


async def healthz(request: Request) -> PlainTextResponse:
    """Answer without authentication, and say whether a principal leaked in."""
    return PlainTextResponse("principal" if "principal" in request.scope.get("state", {}) else "ok")


class CountingGuard:
    """A failed-auth guard that blocks a client after `limit` failures (a stand-in for the Redis one)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.failures = 0
        self.checks = 0

    async def check(self, scope: Scope) -> GatewayError | None:
        """Block once the limit is reached."""
        self.checks += 1
        return RateLimited(60, policy="ip-auth-failure") if self.failures >= self.limit else None

    async def record(self, scope: Scope) -> GatewayError | None:
        """Count a failure; the one that reaches the limit is answered with 429."""
        self.failures += 1
        return RateLimited(60, policy="ip-auth-failure") if self.failures >= self.limit else None


@pytest.fixture
async def authenticator(clock: FakeClock) -> AsyncIterator[Authenticator]:
    """Return a started HS256 authenticator."""
    auth = Authenticator(settings_for(hs_issuer()), clock=clock)
    await auth.start()
    yield auth
    await auth.aclose()


def client_for(authenticator: Authenticator, guard: CountingGuard | None = None) -> httpx.AsyncClient:
    """Return an httpx client calling the middleware-wrapped app in-process."""
    app = Starlette(
        routes=[
            Route("/v1/whoami", whoami, methods=["GET", "POST"]),
            Route("/healthz", healthz),
            Route("/v1x", healthz),
        ]
    )
    wrapped = AuthenticationMiddleware(app, authenticator, guard=guard)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=wrapped), base_url="http://gateway.test")


async def test_principal_reaches_the_handler(authenticator: Authenticator) -> None:
    token = sign(claims(sub="ada", scope="convai:session"), HS_SECRET, "HS256")
    async with client_for(authenticator) as client:
        response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    assert response.json() == {"user_id": "ada", "actor": None, "scopes": ["convai:session"]}


async def test_invalid_token_gets_401_problem_without_the_token(authenticator: Authenticator) -> None:
    token = sign(claims(sub="ada"), OTHER_HS_SECRET, "HS256")
    async with client_for(authenticator) as client:
        response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["status"] == 401 and body["code"] == "invalid_token" and body["reason"] == "bad signature"
    for part in token.split("."):
        assert part not in response.text
        assert all(part not in value for value in response.headers.values())


async def test_missing_token_gets_401_without_error_attribute(authenticator: Authenticator) -> None:
    async with client_for(authenticator) as client:
        response = await client.get("/v1/whoami")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert "error=" not in response.headers["www-authenticate"]
    assert response.json()["reason"] == "missing bearer token"


async def test_expired_token_gets_401(authenticator: Authenticator, clock: FakeClock) -> None:
    token = sign(claims(exp=int(clock.now) - 3600), HS_SECRET, "HS256")
    async with client_for(authenticator) as client:
        response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.json()["reason"] == "expired"
    assert token not in response.text


async def test_paths_outside_the_prefix_are_untouched(authenticator: Authenticator) -> None:
    async with client_for(authenticator) as client:
        health = await client.get("/healthz", headers={"Authorization": "Bearer garbage"})
        lookalike = await client.get("/v1x")
    assert (health.status_code, health.text) == (200, "ok")
    assert (lookalike.status_code, lookalike.text) == (200, "ok")


async def test_cors_preflight_is_not_authenticated(authenticator: Authenticator) -> None:
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "GET"}
    async with client_for(authenticator) as client:
        preflight = await client.options("/v1/whoami", headers=headers)
        plain_options = await client.options("/v1/whoami")
    assert preflight.status_code != 401 and "www-authenticate" not in preflight.headers
    assert plain_options.status_code == 401


async def test_act_as_through_the_middleware(authenticator: Authenticator) -> None:
    service = sign(claims(sub="svc", scope="convai:act-as convai:history"), HS_SECRET, "HS256")
    user = sign(claims(sub="ada"), HS_SECRET, "HS256")
    async with client_for(authenticator) as client:
        acting = await client.get(
            "/v1/whoami", headers={"Authorization": f"Bearer {service}", "X-On-Behalf-Of": "u-7"}
        )
        refused = await client.get(
            "/v1/whoami", headers={"Authorization": f"Bearer {user}", "X-On-Behalf-Of": "u-7"}
        )
        malformed = await client.get(
            "/v1/whoami", headers={"Authorization": f"Bearer {service}", "X-On-Behalf-Of": "two words"}
        )
        doubled = await client.get(
            "/v1/whoami",
            headers=[
                ("Authorization", f"Bearer {service}"),
                ("X-On-Behalf-Of", "a"),
                ("X-On-Behalf-Of", "b"),
            ],
        )
    assert acting.status_code == 200
    assert acting.json()["user_id"] == "u-7" and acting.json()["actor"] == "svc"
    assert refused.status_code == 403 and refused.json()["code"] == "act_as_not_allowed"
    assert malformed.status_code == 422 and malformed.json()["code"] == "invalid_request"
    assert doubled.status_code == 422


async def test_token_is_judged_before_the_on_behalf_of_header(authenticator: Authenticator) -> None:
    # DESIGN section 1: a missing or invalid token is a 401, whatever else the request carries; a doubled
    # X-On-Behalf-Of must not turn it into a 422 that skips the failed-authentication count.
    guard = CountingGuard(limit=100)
    doubled = [("X-On-Behalf-Of", "a"), ("X-On-Behalf-Of", "b")]
    user = sign(claims(sub="ada"), HS_SECRET, "HS256")
    async with client_for(authenticator, guard) as client:
        anonymous = await client.get("/v1/whoami", headers=doubled)
        forged = await client.get("/v1/whoami", headers=[("Authorization", "Bearer not.a.token"), *doubled])
        plain = await client.get("/v1/whoami", headers=[("Authorization", f"Bearer {user}"), *doubled])
    assert anonymous.status_code == 401 and "error=" not in anonymous.headers["www-authenticate"]
    assert forged.status_code == 401 and forged.json()["code"] == "invalid_token"
    assert guard.failures == 2
    assert plain.status_code == 403 and plain.json()["code"] == "act_as_not_allowed"


async def test_duplicate_authorization_headers_are_rejected(authenticator: Authenticator) -> None:
    token = sign(claims(), HS_SECRET, "HS256")
    async with client_for(authenticator) as client:
        response = await client.get(
            "/v1/whoami", headers=[("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
        )
    assert response.status_code == 401 and response.json()["reason"] == "malformed token"


async def test_failure_guard_turns_repeated_failures_into_429(authenticator: Authenticator) -> None:
    guard = CountingGuard(limit=3)
    good = sign(claims(), HS_SECRET, "HS256")
    async with client_for(authenticator, guard) as client:
        ok = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {good}"})
        statuses = [
            (await client.get("/v1/whoami", headers={"Authorization": "Bearer not.a.token"})).status_code
            for _ in range(3)
        ]
        blocked = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {good}"})
    assert ok.status_code == 200
    assert statuses == [401, 401, 429]
    assert blocked.status_code == 429 and blocked.headers["retry-after"] == "60"
    assert guard.failures == 3 and guard.checks == 5


async def test_token_with_a_non_string_alg_is_a_counted_401(authenticator: Authenticator) -> None:
    guard = CountingGuard(limit=100)
    token = f"{b64json({'alg': ['HS256'], 'typ': 'JWT'})}.{b64json(claims())}.c2ln"
    async with client_for(authenticator, guard) as client:
        response = await client.get("/v1/whoami", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.json()["code"] == "invalid_token"
    assert guard.failures == 1
