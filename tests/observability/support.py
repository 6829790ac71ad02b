"""A tiny Starlette app wrapped in the gateway's observability and hygiene middleware, for these tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from service.errors import EXCEPTION_HANDLERS, NotFound, UnhandledErrorMiddleware
from service.http_hygiene import BodyLimitMiddleware, SecurityHeadersMiddleware, cors_middleware
from service.observability import ACCESS_LOGGER, Metrics, RequestContextMiddleware, metrics_endpoint
from tests.support.gateway import handler_attached


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


@dataclass
class Probe:
    """What the routes saw, for assertions."""

    echo_calls: int = 0
    request_ids: list[str] = field(default_factory=list)


class CutBody:
    """An ASGI endpoint that sends headers and part of a body, then returns without finishing."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # What the audio route does when the upstream stream fails mid-way: headers and part of the body are
        # gone, so it returns without the final body message and the server drops the connection.
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"audio/mpeg")]}
        )
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})


def build_app(
    metrics: Metrics,
    *,
    clock: FakeClock | None = None,
    origins: tuple[str, ...] = (),
    max_body: int = 1024,
    probe: Probe | None = None,
) -> Starlette:
    """Return an app with the production middleware order and a handful of representative routes."""
    clock = clock or FakeClock()
    probe = probe or Probe()

    async def item(request: Request) -> Response:
        clock.advance(0.3)
        probe.request_ids.append(request.state.request_id)
        return JSONResponse({"id": request.path_params["item_id"], "request_id": request.state.request_id})

    async def whoami(request: Request) -> Response:
        request.state.principal = SimpleNamespace(user_id="alice@example.com")
        logging.getLogger("tests.observability.route").warning("handling whoami")
        return JSONResponse({"ok": True})

    async def stream(request: Request) -> Response:
        async def body() -> Any:
            yield b"first"
            clock.advance(2.0)
            yield b"second"

        # Work after the body (a background task) must not count as response time.
        return StreamingResponse(
            body(), media_type="text/plain", background=BackgroundTask(clock.advance, 100)
        )

    async def forever(request: Request) -> Response:
        async def body() -> Any:
            yield b"hello"
            await asyncio.Event().wait()  # ends only when the client goes away
            yield b"never"

        return StreamingResponse(body(), media_type="text/plain")

    async def problem(request: Request) -> Response:
        raise NotFound("no such thing")

    async def boom(request: Request) -> Response:
        raise RuntimeError("exploded")

    async def cached(request: Request) -> Response:
        return Response("x", headers={"Cache-Control": "max-age=60", "X-Frame-Options": "SAMEORIGIN"})

    async def echo(request: Request) -> Response:
        probe.echo_calls += 1
        body = await request.body()
        return JSONResponse({"length": len(body)})

    middleware = [
        Middleware(RequestContextMiddleware, metrics=metrics, clock=clock),
        Middleware(SecurityHeadersMiddleware),
    ]
    cors = cors_middleware(origins)
    if cors is not None:
        middleware.append(cors)
    middleware.append(Middleware(UnhandledErrorMiddleware))
    middleware.append(Middleware(BodyLimitMiddleware, max_bytes=max_body))
    return Starlette(
        routes=[
            Route("/items/{item_id}", item, methods=["GET"]),
            Route("/whoami", whoami),
            Route("/stream", stream),
            Route("/forever", forever),
            Route("/cut", CutBody()),
            Route("/problem", problem),
            Route("/boom", boom),
            Route("/cached", cached),
            Route("/echo", echo, methods=["POST"]),
            Route("/metrics", metrics_endpoint(metrics)),
        ],
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
    )


class AccessLogWaiter(logging.Handler):
    """Collect access records from any thread and signal when one arrives."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.arrived = threading.Event()
        self._changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._changed:
            self.records.append(record)
            self._changed.notify_all()
        self.arrived.set()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until `count` records have arrived."""
        with self._changed:
            return self._changed.wait_for(lambda: len(self.records) >= count, timeout)


def access_log_records() -> contextlib.AbstractContextManager[AccessLogWaiter]:
    """Collect the access logger's records (at INFO) for the duration of the block."""
    return handler_attached(logging.getLogger(ACCESS_LOGGER), AccessLogWaiter(), logging.INFO)
