"""Liveness, readiness and the OpenAPI document."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service import __version__
from service.openapi import build_document
from service.state import Services, services_of

_NO_STORE = {"Cache-Control": "no-store"}


async def healthz(request: Request) -> Response:
    """Answer 200 while the process is alive; checks nothing else on purpose."""
    return JSONResponse({"status": "ok"}, headers=_NO_STORE)


async def _redis_check(services: Services) -> dict[str, Any]:
    if services.redis is None:
        return {
            "ok": True,
            "detail": "not configured: in-process rate limiter and ledger (single replica only)",
        }
    try:
        ok = await asyncio.wait_for(
            services.ledger.ping(), timeout=max(services.settings.redis_timeout_seconds, 0.5)
        )
    except Exception:  # any failure is "not ready"; the type is enough for an operator
        ok = False
    return {"ok": bool(ok), "detail": "answering" if ok else "not answering"}


async def readyz(request: Request) -> Response:
    """Answer 200 only when Redis (if configured) answers and the JWT keys are loaded; else 503 naming the check."""
    services = services_of(request)
    keys_ok, keys_detail = services.authenticator.readiness()
    checks = {"redis": await _redis_check(services), "jwt_keys": {"ok": keys_ok, "detail": keys_detail}}
    ready = all(check["ok"] for check in checks.values())
    body = {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "mode": {
            "rate_limiter": "redis" if services.redis is not None else "in-process",
            "ledger": "redis" if services.redis is not None else "in-process",
            "ownership": services.settings.ownership_mode,
        },
    }
    return JSONResponse(body, status_code=200 if ready else 503, headers=_NO_STORE)


async def openapi(request: Request) -> Response:
    """Serve the OpenAPI 3.1 document generated from the app's routes."""
    return JSONResponse(build_document(request.app.routes, version=__version__))


routes = [
    Route("/healthz", healthz, methods=["GET"]),
    Route("/readyz", readyz, methods=["GET"]),
    Route("/openapi.json", openapi, methods=["GET"]),
]
