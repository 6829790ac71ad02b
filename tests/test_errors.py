"""Errors: every GatewayError becomes an RFC 9457 problem with a stable code."""

from __future__ import annotations

import json

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import errors


def app_raising(exc: Exception) -> Starlette:
    """Build an app whose only route raises the given exception."""

    async def endpoint(request: Request) -> Response:
        raise exc

    return Starlette(routes=[Route("/boom", endpoint)], exception_handlers=errors.EXCEPTION_HANDLERS)


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (errors.AuthenticationFailed("expired"), 401, "invalid_token"),
        (errors.MissingScope("convai:delete"), 403, "insufficient_scope"),
        (errors.AgentNotAllowed("agent not allowed"), 403, "agent_not_allowed"),
        (errors.ActAsNotAllowed(), 403, "act_as_not_allowed"),
        (errors.NotFound(), 404, "not_found"),
        (errors.InvalidRequest("bad"), 422, "invalid_request"),
        (errors.PayloadTooLarge(), 413, "payload_too_large"),
        (errors.UnsupportedMediaType(), 415, "unsupported_media_type"),
        (errors.RateLimited(7), 429, "rate_limited"),
        (errors.ServiceUnavailable(), 503, "unavailable"),
        (errors.UpstreamError(), 502, "upstream_error"),
        (errors.UpstreamTimeout(), 504, "upstream_timeout"),
        (errors.UpstreamRateLimited(headers={"Retry-After": "3"}), 429, "upstream_rate_limited"),
        (errors.UpstreamRejected(), 422, "upstream_rejected"),
    ],
)
async def test_gateway_errors_become_problem_responses(
    exc: errors.GatewayError, status: int, code: str
) -> None:
    transport = httpx.ASGITransport(app=app_raising(exc))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(code)
    assert {"title", "detail"} <= body.keys()


async def test_unauthorized_carries_bearer_challenge() -> None:
    transport = httpx.ASGITransport(app=app_raising(errors.AuthenticationFailed("expired")))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.headers["www-authenticate"].startswith("Bearer ")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


async def test_rate_limited_sets_retry_after_at_least_one() -> None:
    transport = httpx.ASGITransport(app=app_raising(errors.RateLimited(0)))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.headers["retry-after"] == "1"


async def test_unhandled_exception_is_a_500_problem_without_details() -> None:
    transport = httpx.ASGITransport(
        app=app_raising(RuntimeError("secret-in-message")), raise_app_exceptions=False
    )
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "secret-in-message" not in response.text


async def test_unknown_route_is_a_problem_404() -> None:
    app = Starlette(routes=[], exception_handlers=errors.EXCEPTION_HANDLERS)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/nope")
    assert response.status_code == 404
    assert json.loads(response.text)["code"] == "not_found"
