"""HTTP hygiene: security headers, CORS for an explicit origin list, a request body size limit, dev's Host check."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from typing import Any, Final

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    PayloadTooLarge,
    RequestTimeout,
    answer_early_errors,
    error_response,
    problem_response,
)
from service.observability import REQUEST_ID_HEADER, record_refused_request, request_id_for
from service.state import Services

DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024
_HTTP1: Final = ("1.0", "1.1")
DEFAULT_BODY_TIMEOUT_SECONDS: Final = 10.0
HSTS_MAX_AGE_SECONDS: Final = 63_072_000  # two years, the preload-list minimum is one

_API_SECURITY_HEADERS: Final = (
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    # An API answers JSON and audio, never documents: nothing may load or frame anything.
    ("Content-Security-Policy", "default-src 'none'; frame-ancestors 'none'"),
    ("Cross-Origin-Resource-Policy", "same-site"),
    ("Cache-Control", "no-store"),
)
# The same, as raw ASGI header pairs keyed by lower-case name.
_RAW_SECURITY_HEADERS: Final = tuple(
    (name.lower().encode("latin-1"), (name.lower().encode("latin-1"), value.encode("latin-1")))
    for name, value in _API_SECURITY_HEADERS
)


def security_header_pairs() -> tuple[tuple[bytes, bytes], ...]:
    """Return the security headers every response carries, as raw (lower-case name, value) pairs."""
    return tuple(pair for _, pair in _RAW_SECURITY_HEADERS)


CORS_METHODS: Final = ("GET", "POST", "DELETE", "OPTIONS")
# X-On-Behalf-Of is deliberately absent: acting for a user is for server-side gateways, never browsers.
# traceparent and tracestate (W3C Trace Context) are what OpenTelemetry's browser instrumentation adds to every
# fetch: without them each preflight, and so every call, of such a frontend failed. They grant nothing here; the
# access log keeps only a valid traceparent's trace id.
CORS_REQUEST_HEADERS: Final = ("Authorization", "Content-Type", "X-Request-ID", "traceparent", "tracestate")
CORS_EXPOSED_HEADERS: Final = ("RateLimit", "RateLimit-Policy", "Retry-After", "X-Request-ID")
CORS_MAX_AGE_SECONDS: Final = 600


class SecurityHeadersMiddleware:
    """Add defensive security headers to every HTTP response, keeping any value a route set itself."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        hsts_max_age: int = HSTS_MAX_AGE_SECONDS,
        content_security_policy: str | None = None,
    ) -> None:
        """Wrap `app`; HSTS (sent only over https) uses `hsts_max_age` seconds; a page's own CSP replaces the API's."""
        self.app = app
        self.hsts = f"max-age={hsts_max_age}; includeSubDomains"
        csp = b"content-security-policy"
        self.headers = tuple(
            (name, (csp, content_security_policy.encode("latin-1")))
            if name == csp and content_security_policy is not None
            else (name, pair)
            for name, pair in _RAW_SECURITY_HEADERS
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        https = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                # One pass over the response's headers, then appends (MutableHeaders.setdefault would scan
                # them once per security header).
                raw = list(message.get("headers", ()))
                present = {name.lower() for name, _ in raw}
                raw += [pair for name, pair in self.headers if name not in present]
                # HSTS over plain http is ignored by browsers and would mislead; send it only over TLS.
                if https and b"strict-transport-security" not in present:
                    raw.append((b"strict-transport-security", self.hsts.encode("latin-1")))
                message = {**message, "headers": raw}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class ProblemCORSMiddleware(CORSMiddleware):
    """Starlette's CORS middleware whose refused preflights are problem+json like every other error."""

    def preflight_response(self, request_headers: Headers) -> Response:
        """Answer a preflight; a refusal keeps its reason and its CORS headers in a problem body."""
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        kept = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-type", "content-length")
        }
        reason = bytes(response.body).decode("utf-8")  # "Disallowed CORS origin, headers"
        return problem_response(400, "cors_refused", "CORS preflight refused", reason, headers=kept)


def cors_middleware(origins: tuple[str, ...]) -> Middleware | None:
    """Return a CORS middleware for exactly `origins`, or None when no origin is allowed."""
    options = _cors_options(origins)
    return None if options is None else Middleware(ProblemCORSMiddleware, **options)


def _cors_options(origins: tuple[str, ...]) -> dict[str, Any] | None:
    if not origins:
        return None
    if "*" in origins:
        raise ValueError("CORS origins must be listed explicitly; '*' is not allowed")
    return {
        "allow_origins": list(origins),
        # Callers authenticate with bearer tokens, never cookies: credentialed CORS is never needed.
        "allow_credentials": False,
        "allow_methods": list(CORS_METHODS),
        "allow_headers": list(CORS_REQUEST_HEADERS),
        "expose_headers": list(CORS_EXPOSED_HEADERS),
        "max_age": CORS_MAX_AGE_SECONDS,
    }


@functools.lru_cache(maxsize=8)
def _cors_policy(origins: tuple[str, ...]) -> ProblemCORSMiddleware | None:
    # The app's own middleware class and options (cors_middleware), so both apply one policy.
    options = _cors_options(origins)
    return None if options is None else ProblemCORSMiddleware(_no_app, **options)


async def _no_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the CORS policy of a refusal wraps no app")


def cors_response_headers(origins: tuple[str, ...], origin: str | None) -> list[tuple[bytes, bytes]]:
    """Return the headers the app's CORS middleware for `origins` adds to a response to a request from `origin`."""
    # Run the app's own middleware on a bare response start, so that a response written below the app
    # (service.server_protocol) follows exactly the app's origin policy, its Vary and its exposed headers.
    policy = _cors_policy(origins)
    if policy is None:
        return []
    sent: list[Message] = []

    async def keep(message: Message) -> None:
        sent.append(message)

    request_headers = Headers(raw=[] if origin is None else [(b"origin", origin.encode("latin-1"))])
    start: Message = {"type": "http.response.start", "status": 200, "headers": []}
    step = policy.send(start, send=keep, request_headers=request_headers)
    try:
        # Neither the middleware's send nor `keep` waits for anything: the first step runs it to its end.
        step.send(None)
    except StopIteration:
        return [(bytes(name), bytes(value)) for name, value in sent[0]["headers"]]
    # It waited (a Starlette that changed its middleware): no CORS headers, as for an origin not allowed;
    # tests/test_serve.py compares a refusal's CORS headers with the app's and would fail.
    step.close()
    return []


class _BodyTooLarge(PayloadTooLarge):
    """Raised from the wrapped `receive` when the streamed body passes the limit."""


class _BodyTimeout(RequestTimeout):
    """Raised from the wrapped `receive` when the body has not fully arrived by the deadline."""


class BodyLimitMiddleware:
    """Reject request bodies over `max_bytes` (413) or not received within `body_timeout` seconds (408).

    uvicorn has no request-body read timeout, so a client trickling its body byte by byte (slowloris)
    would hold a connection and a request task for as long as it likes; the deadline bounds that.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int = DEFAULT_MAX_BODY_BYTES,
        *,
        body_timeout: float | None = DEFAULT_BODY_TIMEOUT_SECONDS,
    ) -> None:
        """Wrap `app` with a body limit of `max_bytes` and a whole-body deadline (None: no deadline)."""
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        if body_timeout is not None and body_timeout <= 0:
            raise ValueError("body_timeout must be > 0")
        self.app = app
        self.max_bytes = max_bytes
        self.body_timeout = body_timeout

    def _error(self) -> _BodyTooLarge:
        # Connection: close, as for every answer given before the body is read (see `__call__`).
        return _BodyTooLarge(
            f"the request body is larger than {self.max_bytes} bytes", headers={"Connection": "close"}
        )

    def _timeout(self) -> _BodyTimeout:
        # Connection: close, so the server drops the unread rest of the body instead of parsing it.
        return _BodyTimeout(
            f"the request body was not received within {self.body_timeout:g} s",
            headers={"Connection": "close"},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        # One pass over the raw headers for the two that frame a body (Headers would copy them and scan twice).
        # Names compared as given, as Headers does: ASGI servers give lower-case names.
        declared: str | None = None  # the first Content-Length, as Headers.get gives
        chunked = False  # a Transfer-Encoding header is present
        for name, value in scope["headers"]:
            if name == b"content-length":
                if declared is None:
                    declared = value.decode("latin-1")
            elif name == b"transfer-encoding":
                chunked = True
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            # Answer before reading a byte of it.
            await error_response(self._error())(scope, receive, send)
            return

        # Only a request that announces a body gets a deadline: a bodyless request's later receive()
        # calls wait for the disconnect (e.g. while audio streams) and must never time out.
        has_body = chunked or (declared is not None and declared not in ("", "0"))
        if not has_body and scope.get("http_version") in _HTTP1:
            # HTTP/1.x frames a body only with one of those headers: there is nothing to limit or time.
            # (HTTP/2 bodies need no Content-Length, so other versions keep the wrappers.)
            await self.app(scope, receive, send)
            return
        received = 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout if has_body and self.body_timeout is not None else None
        body_complete = not has_body

        async def limited_receive() -> Message:
            nonlocal received, deadline, body_complete
            if deadline is None:
                message = await receive()
            else:
                # asyncio.timeout_at, not wait_for: on Python 3.11 wait_for runs the receive in a task of its own
                # (~4 % of a feedback request's CPU under load, py-spy) and costs a loop turn per body message.
                try:
                    async with asyncio.timeout_at(deadline):
                        message = await receive()
                except TimeoutError:
                    raise self._timeout() from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                deadline = None  # the body is complete (or the client left): no deadline from here on
                body_complete = True
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._error()
            return message

        async def answer(exc: Exception) -> Response | None:
            # Usually the app's GatewayError handler has already answered; this covers apps without one.
            return error_response(exc) if isinstance(exc, _BodyTooLarge | _BodyTimeout) else None

        async def send_closing_if_unread(message: Message) -> None:
            # An answer given before the whole body arrived (401, 404, 413...) closes the connection: kept
            # alive, the server would read and drop the rest of the body for as long as the client trickles
            # it, with no deadline running (the body deadline ends with the response).
            if message["type"] == "http.response.start" and not body_complete:
                headers = message.get("headers", [])
                if not any(name.lower() == b"connection" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await answer_early_errors(self.app, scope, limited_receive, send_closing_if_unread, answer)


# Names that only ever mean this machine: localhost and its subdomains (RFC 6761: browsers resolve *.localhost to
# loopback themselves, whatever DNS says), 127.0.0.1 and [::1]; any port. ASCII case-insensitive.
_LOOPBACK_HOST: Final = re.compile(
    rb"(?:localhost|127\.0\.0\.1|\[::1\]|(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+localhost)(?::[0-9]{1,5})?",
    re.IGNORECASE,
)
MISDIRECTED_DETAIL: Final = (
    "this development server answers only requests addressed to localhost, *.localhost, 127.0.0.1 or [::1]"
)
_WS_POLICY_VIOLATION: Final = 1008


def listens_on_loopback_only(host: str) -> bool:
    """Tell whether a server bound to `host` is reachable through loopback only (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name (say, a container's) is served by whatever it resolves to


class LoopbackHostMiddleware:
    """Refuse HTTP and WebSocket requests whose Host is not a loopback name (`dev`'s guard against DNS rebinding).

    A page from evil.example whose name later resolves to 127.0.0.1 reaches a loopback server from the
    developer's own browser, same-origin to that page, so the browser lets it read every answer; the one thing
    that gives it away is `Host: evil.example`. The answer is 421 Misdirected Request (RFC 9110 15.5.20): the
    request is well formed (400 would say otherwise) but addressed to an authority this server will not answer
    for, and a client can fix it by using a loopback name.
    """

    def __init__(self, app: ASGIApp, *, record_refusals: bool = False) -> None:
        """Wrap `app`; with `record_refusals` (the gateway's) a 421 is logged and counted as every refusal is."""
        self.app = app
        self.record_refusals = record_refusals

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        hosts = [value for name, value in scope["headers"] if name == b"host"]
        # Exactly one Host, all of it a loopback name: a missing or a second Host is no address to trust.
        if len(hosts) == 1 and _LOOPBACK_HOST.fullmatch(hosts[0]):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the upgrade with 403; the app never sees it.
            await send({"type": "websocket.close", "code": _WS_POLICY_VIOLATION})
            return
        # The Host is not echoed (it is the attacker's text); the body is never read, so the connection closes.
        headers = {**dict(_API_SECURITY_HEADERS), "Connection": "close"}
        if self.record_refusals:
            # Answered in front of the gateway app, whose middleware logs and counts every other request: a
            # rebinding attempt must leave the same trace as a 408 or 431 (an access line, a count, an id).
            offered = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
            request_id = request_id_for(offered.decode("latin-1") if offered is not None else None)
            headers[REQUEST_ID_HEADER] = request_id
            state = scope.get("state")
            services = state.get("services") if isinstance(state, dict) else None
            client = scope.get("client")
            # Before the bytes leave, as below the app: a client holding the 421 finds its line and count.
            record_refused_request(
                services.metrics if isinstance(services, Services) else None,
                method=str(scope.get("method", "")),
                status=421,
                request_id=request_id,
                seconds=None,  # answered at once: no header block was timed, as for a 400 in a body
                client_ip=str(client[0]) if client else None,
            )
        response = problem_response(
            421, "misdirected_request", "Misdirected request", MISDIRECTED_DETAIL, headers=headers
        )
        await response(scope, receive, send)
