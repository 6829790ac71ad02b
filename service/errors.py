"""The gateway's exception tree and the one place that turns exceptions into HTTP responses.

Every error body is `application/problem+json` (RFC 9457) with a stable machine-readable `code`.
Messages never include tokens, keys or signed URLs: callers pass only a reason class.

    GatewayError
    ├── AuthenticationFailed      401 invalid_token / missing_token
    ├── PermissionDenied          403 forbidden
    │   ├── MissingScope          403 insufficient_scope
    │   ├── AgentNotAllowed       403 agent_not_allowed
    │   └── ActAsNotAllowed       403 act_as_not_allowed
    ├── NotFound                  404 not_found
    ├── InvalidRequest            422 invalid_request
    ├── RequestTimeout            408 request_timeout
    ├── PayloadTooLarge           413 payload_too_large
    ├── UnsupportedMediaType      415 unsupported_media_type
    ├── RateLimited               429 rate_limited
    ├── ServiceUnavailable        503 unavailable (ledger, limiter in `closed` mode, ...)
    └── UpstreamError             502 upstream_error
        ├── UpstreamTimeout       504 upstream_timeout
        ├── UpstreamRateLimited   429 upstream_rate_limited
        └── UpstreamRejected      422 upstream_rejected
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, ClassVar

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PROBLEM_CONTENT_TYPE = "application/problem+json"
# A URN, not a URL: nothing has to be hosted for the type to stay stable and unique (RFC 9457 3.1.1).
PROBLEM_TYPE_BASE = "urn:convai-gateway:problem:"

logger = logging.getLogger("service.errors")


class GatewayError(Exception):
    """Base of every error the gateway answers with a problem response."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    title: ClassVar[str] = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers: dict[str, str] = dict(headers or {})
        self.extra: dict[str, Any] = dict(extra or {})


class AuthenticationFailed(GatewayError):
    """The bearer token is missing or fails verification; `reason` is a short class, never the token."""

    status = 401
    code = "invalid_token"
    title = "Unauthorized"

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        # RFC 6750: no error attribute when the request simply had no credentials.
        challenge = 'Bearer realm="convai-gateway"'
        if not missing:
            challenge += f', error="invalid_token", error_description="{reason}"'
        super().__init__(reason, headers={"WWW-Authenticate": challenge}, extra={"reason": reason})
        self.reason = reason


class PermissionDenied(GatewayError):
    """The caller is authenticated but may not do this."""

    status = 403
    code = "forbidden"
    title = "Forbidden"


class MissingScope(PermissionDenied):
    """The token lacks the scope a route requires."""

    code = "insufficient_scope"

    def __init__(self, scope: str) -> None:
        super().__init__(
            f"this route requires scope {scope}",
            headers={"WWW-Authenticate": f'Bearer error="insufficient_scope", scope="{scope}"'},
            extra={"required_scope": scope},
        )


class AgentNotAllowed(PermissionDenied):
    """The agent is outside the workspace allowlist or the token's `agents` claim."""

    code = "agent_not_allowed"


class ActAsNotAllowed(PermissionDenied):
    """`X-On-Behalf-Of` was sent by a token without `convai:act-as`."""

    code = "act_as_not_allowed"


class NotFound(GatewayError):
    """The resource does not exist or is not the caller's (the two are indistinguishable)."""

    status = 404
    code = "not_found"
    title = "Not found"


class InvalidRequest(GatewayError):
    """A parameter or body failed validation."""

    status = 422
    code = "invalid_request"
    title = "Invalid request"


class RequestTimeout(GatewayError):
    """The request body did not arrive in time (a slow or stalled client)."""

    status = 408
    code = "request_timeout"
    title = "Request timeout"


class PayloadTooLarge(GatewayError):
    """The request body is over the limit."""

    status = 413
    code = "payload_too_large"
    title = "Payload too large"


class UnsupportedMediaType(GatewayError):
    """The request body has the wrong content type."""

    status = 415
    code = "unsupported_media_type"
    title = "Unsupported media type"


class RateLimited(GatewayError):
    """A rate-limit policy rejected the request."""

    status = 429
    code = "rate_limited"
    title = "Too many requests"

    def __init__(self, retry_after: int, detail: str | None = None, *, policy: str | None = None) -> None:
        retry_after = max(1, retry_after)
        super().__init__(
            detail or f"rate limit exceeded; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
            extra={"policy": policy} if policy else None,
        )
        self.retry_after = retry_after


class ServiceUnavailable(GatewayError):
    """A dependency the request needs (ledger, rate limiter) is unavailable."""

    status = 503
    code = "unavailable"
    title = "Service unavailable"


class AudioStreamsBusy(ServiceUnavailable):
    """This replica already relays as many audio streams as it allows (UPSTREAM_MAX_AUDIO_STREAMS)."""

    code = "audio_streams_busy"

    def __init__(self, retry_after: int = 5) -> None:
        super().__init__(
            f"too many audio downloads in progress; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


class UpstreamError(GatewayError):
    """The upstream API is unreachable, failed, or answered something unusable."""

    status = 502
    code = "upstream_error"
    title = "Bad gateway"


class UpstreamTimeout(UpstreamError):
    """The upstream API did not answer in time."""

    status = 504
    code = "upstream_timeout"
    title = "Gateway timeout"


class UpstreamRateLimited(UpstreamError):
    """The upstream API rate-limited the workspace."""

    status = 429
    code = "upstream_rate_limited"
    title = "Too many requests"


class UpstreamRejected(UpstreamError):
    """The upstream API rejected the request's parameters."""

    status = 422
    code = "upstream_rejected"
    title = "Invalid request"


@contextlib.contextmanager
def headers_on_error(headers: Mapping[str, str]) -> Iterator[None]:
    """Add `headers` (without overwriting) to any GatewayError raised in the block, then re-raise it."""
    try:
        yield
    except GatewayError as exc:
        for name, value in headers.items():
            exc.headers.setdefault(name, value)
        raise


@contextlib.contextmanager
def upstream_not_found_is_an_error(detail: str) -> Iterator[None]:
    """Turn a NotFound from an upstream call in the block into a 502 with `detail`: no resource is missing."""
    # On the token and list routes an upstream 404 means an allowed agent upstream does not know (deleted there,
    # or mistyped in ALLOWED_AGENT_IDS): the gateway's configuration is at fault, not the caller's request, and
    # "no such conversation" would be false.
    try:
        yield
    except NotFound as exc:
        logger.warning("upstream answered 404: %s", detail)
        raise UpstreamError(detail) from exc


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Response:
    """Build an RFC 9457 problem response."""
    body: dict[str, Any] = {
        "type": PROBLEM_TYPE_BASE + code,
        "title": title,
        "status": status,
        "detail": detail,
        "code": code,
    }
    if extra:
        body.update(extra)
    return Response(
        json.dumps(body, separators=(",", ":")),
        status_code=status,
        media_type=PROBLEM_CONTENT_TYPE,
        headers=dict(headers or {}),
    )


def error_response(exc: GatewayError) -> Response:
    """Turn a GatewayError into its problem response."""
    return problem_response(exc.status, exc.code, exc.title, exc.detail, headers=exc.headers, extra=exc.extra)


_HTTP_CODES = {
    400: ("bad_request", "Bad request"),
    404: ("not_found", "Not found"),
    405: ("method_not_allowed", "Method not allowed"),
    413: ("payload_too_large", "Payload too large"),
    415: ("unsupported_media_type", "Unsupported media type"),
}


async def _gateway_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)  # noqa: S101 - registered for GatewayError only
    return error_response(exc)


async def _http_exception_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 - registered for HTTPException only
    code, title = _HTTP_CODES.get(exc.status_code, ("http_error", "HTTP error"))
    detail = exc.detail if exc.status_code != 404 else "no such route"
    headers = exc.headers
    if exc.status_code == 405:
        headers = {**(headers or {}), "Allow": ", ".join(_allowed_methods(request))}
    return problem_response(exc.status_code, code, title, str(detail), headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    # Starlette's 405 names only the methods of the first route matching the path; a path served by several
    # routes (a conversation's GET and DELETE) must name them all.
    methods: set[str] = set()
    for route in routes_matching_path(request.scope):
        methods |= route.methods or set()
    return sorted(methods)


def routes_matching_path(scope: Scope) -> list[Route]:
    """Return the app's routes whose path matches the request's, whatever their methods."""
    router = getattr(scope.get("app"), "router", None)
    return [
        route
        for route in getattr(router, "routes", ())
        if isinstance(route, Route) and route.matches(scope)[0] is not Match.NONE
    ]


async def _unhandled_error_handler(request: Request, exc: Exception) -> Response:
    # The exception text may quote inputs; log the type and traceback, answer without details.
    logger.error("unhandled error", exc_info=exc)
    return problem_response(
        500, "internal_error", "Internal error", "the gateway failed to handle this request"
    )


class UnhandledErrorMiddleware:
    """Answer an unexpected exception with a 500 problem inside the middleware stack.

    Starlette's own 500 handler sits outside every user middleware, so its responses would miss the
    request id and security headers; this boundary sits inside them.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app; answer a failure before the response started with a 500 problem, a shutdown with a 503."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def answer(exc: Exception) -> Response | None:
            if isinstance(exc, ClientDisconnect):
                return None  # nobody is left to answer; re-raised and ended below
            return await _unhandled_error_handler(Request(scope), exc)

        try:
            await answer_early_errors(self.app, scope, receive, send, answer, cancelled=_shutdown_response)
        except ClientDisconnect:
            # The client hung up while its body was being read: not a gateway failure, so no 500 and no
            # ERROR line (anyone could raise those at will); the access log and metrics record a 499.
            logger.info("client disconnected before its request body was read")


def _shutdown_response() -> Response:
    # Only the server cancels a request: at shutdown, once --graceful-timeout has run out. uvicorn would answer
    # a plain-text 500 and log a traceback, on every deploy that outlasts the timeout; a 503 problem tells the
    # client to retry (elsewhere).
    logger.info("request cut off by shutdown after the graceful timeout")
    return problem_response(
        503,
        "shutting_down",
        "Service unavailable",
        "the gateway is shutting down; retry the request",
        headers={"Connection": "close", "Retry-After": "1"},
    )


async def answer_early_errors(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    answer: Callable[[Exception], Awaitable[Response | None]],
    *,
    cancelled: Callable[[], Response] | None = None,
) -> None:
    """Run `app`; answer an exception (or, with `cancelled`, a cancellation) raised before its response started."""
    started = False

    async def send_tracking(message: Message) -> None:
        nonlocal started
        if message["type"] == "http.response.start":
            started = True
        await send(message)

    try:
        await app(scope, receive, send_tracking)
    except Exception as exc:
        # Once the response has started it is too late for a problem body; the server closes the connection.
        response = None if started else await answer(exc)
        if response is None:
            raise
        await response(scope, receive, send)
    except asyncio.CancelledError:
        if started or cancelled is None:
            raise
        await cancelled()(scope, receive, send)


EXCEPTION_HANDLERS = {
    GatewayError: _gateway_error_handler,
    HTTPException: _http_exception_handler,
    Exception: _unhandled_error_handler,
}
