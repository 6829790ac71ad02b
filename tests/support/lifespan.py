"""Drive an app's lifespan in-process so httpx's ASGITransport can call it with its lifespan state."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send


class _WithState:
    """Give every request a shallow copy of the lifespan state, as uvicorn does."""

    def __init__(self, app: Starlette, state: dict[str, Any]) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope = dict(scope)
        scope["state"] = dict(self.state)
        await self.app(scope, receive, send)


@contextlib.asynccontextmanager
async def running(app: Starlette) -> AsyncIterator[_WithState]:
    """Run `app`'s lifespan and yield an ASGI app that injects its state into each request."""
    async with app.router.lifespan_context(app) as state:
        yield _WithState(app, dict(state or {}))
