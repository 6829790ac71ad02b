"""The HTTP/1.1 protocol `serve` runs: uvicorn's httptools protocol plus a deadline for request headers.

uvicorn arms a timer only between keep-alive requests; a new connection, or one that has started a request, may
take as long as it likes to send the header block. A few hundred such slow clients (slowloris) hold as many sockets
and file descriptors for free. Here every request's headers must be complete within
`REQUEST_HEADER_TIMEOUT_SECONDS` of the connection opening (first request) or of its first byte (later requests on
a kept-alive connection, including bytes such as a lone CRLF that begin no request); otherwise the client gets
`408 Request Timeout` and the connection is closed. The body has its own deadline (`REQUEST_BODY_TIMEOUT_SECONDS`,
`service.http_hygiene`).

httptools sets no limit on the size of a header block, so a client could also push megabytes of headers into the
process within the deadline. A request line and headers over `MAX_HEADER_BYTES`, more than `MAX_HEADER_COUNT`
header lines, or a request target over `MAX_TARGET_BYTES`, get `431 Request Header Fields Too Large` and the
connection is closed (nginx's defaults are smaller: 4 x 8 KiB; a bearer token here is at most 8 KiB). Bytes httptools
cannot parse get a `400 Bad Request` problem instead of uvicorn's plain text. A connection opened while the process
holds more than `MAX_CONNECTIONS` (idle kept-alive ones included) gets `503 too_many_connections` with
`Retry-After: 1` for its first request and is closed: open sockets, and the memory each costs, stay bounded, and the
connections already open are served as before.

A response's status line and headers leave with its first body bytes, in one send (`HeadWithBodyTransport`):
uvicorn alone sends them apart, two TCP segments for every short answer.

Each refusal is visible as every response is: an access-log line in the app's shape (route `unmatched`) naming the
`X-Request-ID` it carries, a count in the process's request metrics (reached through the app's lifespan state, which
uvicorn hands every connection), and the app's CORS headers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import problem_response
from service.http_hygiene import cors_response_headers, security_header_pairs
from service.observability import REQUEST_ID_HEADER, mark_client_gone, record_refused_request, request_id_for
from service.settings import Settings, load_settings
from service.state import Services

MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_COUNT = 100
# httptools' URL parser refuses a longer request target (its offsets are 16-bit): such a request fits the header
# block only without header lines, and is refused as too large rather than as not HTTP.
MAX_TARGET_BYTES = 65535
# Per header line, what on_header's name and value leave out: ": " and CRLF.
_HEADER_LINE_OVERHEAD = 4
# A connection over MAX_CONNECTIONS is refused with this: connections come and go within seconds.
_RETRY_SOON = ((b"retry-after", b"1"),)


def connection_refusal(
    status: int,
    code: str,
    title: str,
    detail: str,
    *,
    request_id: str,
    extra_headers: Sequence[tuple[bytes, bytes]] = (),
) -> bytes:
    """Return a whole HTTP/1.1 problem response that closes the connection, for answers below the app."""
    # The same problem body, request id and security headers as the app's own errors: a client or a log
    # pipeline never meets a second error format.
    response = problem_response(
        status, code, title, detail, headers={"Connection": "close", REQUEST_ID_HEADER: request_id}
    )
    pairs = (*response.raw_headers, *security_header_pairs(), *extra_headers)
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode("ascii")]
    head += [name + b": " + value for name, value in pairs]
    return b"\r\n".join(head) + b"\r\n\r\n" + bytes(response.body)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A response written below the app, with what its access-log line and metrics record."""

    response: bytes
    status: int
    method: str  # as the parser read it, or OTHER before the request line was read
    request_id: str
    started: float | None  # loop time the refused request's header block began, when known


class RequestIdLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger for one request's lines that carries the request id the app gave the request, once it has one."""

    def __init__(self, logger: logging.Logger, scope: Mapping[str, Any]) -> None:
        """Log through `logger`; the id is read, at each line, from the state of the request's `scope`."""
        super().__init__(logger)
        self._scope = scope

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        """Add the request's id to the line's extra fields, when the request got one."""
        state = self._scope.get("state")
        request_id = state.get("request_id") if isinstance(state, Mapping) else None
        if isinstance(request_id, str):
            kwargs["extra"] = {**(kwargs.get("extra") or {}), "request_id": request_id}
        return msg, kwargs


@functools.cache
def worker_settings() -> Settings:
    """Return this process's settings, read from its environment once."""
    # uvicorn builds this protocol inside each worker process, where only the environment carries settings.
    return load_settings()


def configured_header_timeout() -> float:
    """Return REQUEST_HEADER_TIMEOUT_SECONDS of this process."""
    return worker_settings().request_header_timeout_seconds


def configured_max_connections() -> int:
    """Return MAX_CONNECTIONS of this process."""
    return worker_settings().max_connections


class HeadWithBodyTransport(asyncio.Transport):
    """A connection's transport as one response sees it: the response head leaves with the first body bytes.

    uvicorn writes the status line and headers as soon as the app sends `http.response.start`, then each body
    chunk: two sends for a short answer, so two TCP segments and two wake-ups of the client. The ASGI spec lets
    a server hold the head until the first `http.response.body` (Hypercorn and Daphne do; nginx sends a
    proxied answer's head and body in one segment). Bytes are only joined, never dropped or reordered: a close
    sends what is held first. Only for a response whose first write through it is its head.
    """

    __slots__ = ("_head", "_head_received", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        # No BaseTransport.__init__: its `extra` serves get_extra_info, answered here by the connection's transport.
        self._transport = transport
        self._head: bytes | bytearray | memoryview | None = None
        self._head_received = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Hold the response head; send anything after it (with the head, the first time)."""
        if not self._head_received:
            self._head_received = True
            self._head = data
            return
        head = self._head
        if head is None:
            self._transport.write(data)
        else:
            self._head = None
            self._transport.write(bytes(head) + data)

    def close(self) -> None:
        """Send a head still held, then close the connection."""
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head)
        self._transport.close()

    def is_closing(self) -> bool:
        """Return whether the connection is closing or closed."""
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Return the connection's transport information (peer and socket names, the socket...)."""
        return self._transport.get_extra_info(name, default)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that closes with 408 on slow request headers and 431 on oversized ones.

    A pipelined request's header block may run out of time or size while the previous response is still
    being sent; its refusal then waits for that response to end, so no 408 or 431 lands inside it.
    """

    _header_deadline: asyncio.TimerHandle | None = None
    _in_header_block = True  # from the connection's first byte (or a request's end) to its headers' end
    _header_bytes = 0
    _header_count = 0
    _parsed_header_bytes = 0  # request line and header lines as parsed: exact
    _refusal: Refusal | None = None  # a refusal held back until the response in progress ends
    _refused = False  # a request was refused: nothing parsed after it reaches the app or its cycle
    _over_capacity = False  # opened while the process held more than MAX_CONNECTIONS

    def _unsupported_upgrade_warning(self) -> None:
        # `serve` runs without WebSocket support, so an upgrade request is answered as the plain request it
        # also is (401, 404...) and logged by the app. uvicorn would add two warnings per such request, one
        # advising to install a WebSocket library: log noise any client could produce at will.
        return

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection and start the clock for its first request's headers."""
        super().connection_made(transport)
        # Decided once, as it opens: a connection over the limit gets its first request refused, while the ones
        # already open (a proxy's pooled connections) stay served whatever a flood of new ones does.
        self._over_capacity = len(self.connections) > configured_max_connections()
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        """Feed the parser, bounding the header block in time and size."""
        if self.transport.is_closing() or self._refusal is not None:
            return
        if self._header_deadline is None and (self.cycle is None or self.cycle.response_complete):
            # Between requests uvicorn's keep-alive timer is cancelled by any byte, even a CRLF that starts no
            # request: from that byte on, the next request's headers are due within the deadline.
            self._arm_header_deadline()
        counting = self._in_header_block
        super().data_received(data)
        if counting and self._in_header_block:
            # The whole chunk counts while the headers stay incomplete (a chunk that completes them resets
            # the count in on_headers_complete), so the bound is exact to within one read.
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse_headers()

    def on_message_begin(self) -> None:
        """Start a request; on a kept-alive connection its headers get a fresh deadline."""
        if self._refused:
            return
        super().on_message_begin()
        self._in_header_block = True
        self._header_count = 0
        self._parsed_header_bytes = 0
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_url(self, url: bytes) -> None:
        """Collect the request target (in fragments), counting it against the header block's size."""
        self._parsed_header_bytes += len(url)
        if self._parsed_header_bytes <= MAX_HEADER_BYTES:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Keep one header line, unless the block has too many or too large ones (then refused below)."""
        self._header_count += 1
        self._parsed_header_bytes += len(name) + len(value) + _HEADER_LINE_OVERHEAD
        if self._header_count <= MAX_HEADER_COUNT and self._parsed_header_bytes <= MAX_HEADER_BYTES:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """Stop the header clock, then hand the request to the app (or refuse too many headers)."""
        if self._refused:
            # Pipelined in the same read behind a refused request: the connection closes after the refusal,
            # so this request must not run (or be queued to run once the response in progress ends).
            return
        self._in_header_block = False
        self._header_bytes = 0
        if (
            self._header_count > MAX_HEADER_COUNT
            or self._parsed_header_bytes > MAX_HEADER_BYTES
            or len(self.url) > MAX_TARGET_BYTES
        ):
            self._refuse_headers()  # stops the clock once it has read when the block began
            return
        if self._over_capacity:
            self._refuse_over_capacity()
            return
        self._cancel_header_deadline()
        previous = self.cycle
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle is not previous:
            # uvicorn logs a response the app left unfinished ("ASGI callable returned without completing
            # response") or an exception raised after it started ("Exception in ASGI application") only once
            # the app has returned, when the request id's context is gone: the cycle's logger names it instead.
            cycle.logger = RequestIdLogger(cycle.logger, cycle.scope)  # type: ignore[assignment]
            # A HEAD answer writes no body to join its head to, and a 100 Continue is written before the head.
            if not cycle.waiting_for_100_continue and cycle.scope["method"] != "HEAD":
                cycle.transport = HeadWithBodyTransport(cycle.transport)

    def on_body(self, body: bytes) -> None:
        """Pass a body chunk to the request's cycle, unless the request was refused."""
        # A refused request has no cycle of its own: its body would be added to the previous request's, or
        # fail on None (which uvicorn reports as "Invalid HTTP request received.").
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """End the request's body, unless the request was refused."""
        if not self._refused:
            super().on_message_complete()

    def on_response_complete(self) -> None:
        """Finish a response; send a refusal held back meanwhile, or wait for the next header block."""
        self._in_header_block = True
        super().on_response_complete()
        if self._refusal is not None:
            self._send_refusal(self._refusal)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the header clock with the connection; tell the access log if a response was still due."""
        self._cancel_header_deadline()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # uvicorn drops what the app sends from now on without an error: the access log would say 200.
            mark_client_gone(cycle.scope)
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(configured_header_timeout(), self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def send_400_response(self, msg: str) -> None:
        """Answer a request httptools cannot parse with a 400 problem and close (uvicorn's is plain text)."""
        # Like a 408 or 431, it waits for a response still being sent to a request pipelined before it:
        # written at once, it cut that response off, or came before it.
        self._refuse(400, "bad_request", "Bad request", "the request is not valid HTTP/1.1")

    def _refuse_headers(self) -> None:
        detail = (
            f"request line and headers must fit in {MAX_HEADER_BYTES} bytes and {MAX_HEADER_COUNT} lines,"
            f" the request target in {MAX_TARGET_BYTES} bytes"
        )
        self._refuse(431, "request_headers_too_large", "Request header fields too large", detail)

    def _refuse_over_capacity(self) -> None:
        # Like uvicorn's limit_concurrency and nginx's limit_conn, the request is read, then answered 503 and its
        # connection closed: the client gets an answer it can act on, and a connection over the limit costs a
        # file descriptor only until its request's headers are in (or their deadline has passed).
        limit = configured_max_connections()
        detail = f"this gateway process already holds its maximum of {limit} connections; retry shortly"
        self._refuse(503, "too_many_connections", "Too many connections", detail, extra_headers=_RETRY_SOON)

    def _headers_too_slow(self) -> None:
        detail = f"the request headers were not received within {configured_header_timeout():g} s"
        self._refuse(408, "request_timeout", "Request timeout", detail)

    def _refuse(
        self,
        status: int,
        code: str,
        title: str,
        detail: str,
        *,
        extra_headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        # Everything here runs only for a refusal: a request served normally pays for none of it.
        self._refused = True
        deadline = self._header_deadline
        started = None if deadline is None else deadline.when() - configured_header_timeout()
        self._cancel_header_deadline()
        if self.transport.is_closing():
            return
        services = self.app_state.get("services")
        headers = self._received_headers()
        request_id = request_id_for(_first_value(headers, b"x-request-id"))
        cors: list[tuple[bytes, bytes]] = []
        if isinstance(services, Services):
            # A browser reads a refusal (say, the 431 of an oversized token) only under the app's CORS policy.
            cors = cors_response_headers(
                services.settings.cors_allowed_origins, _first_value(headers, b"origin")
            )
        response = connection_refusal(
            status, code, title, detail, request_id=request_id, extra_headers=(*cors, *extra_headers)
        )
        refusal = Refusal(response, status, self._received_method(), request_id, started)
        if self.cycle is not None and not self.cycle.response_complete:
            # Pipelined behind a response still being sent: refuse once it has ended, read nothing more.
            self._refusal = refusal
            return
        self._send_refusal(refusal)

    def _send_refusal(self, refusal: Refusal) -> None:
        if self.transport.is_closing():
            return
        services = self.app_state.get("services")
        # Logged and counted before the bytes leave, so a client holding the refusal finds its line and count.
        record_refused_request(
            services.metrics if isinstance(services, Services) else None,
            method=refusal.method,
            status=refusal.status,
            request_id=refusal.request_id,
            seconds=None if refusal.started is None else self.loop.time() - refusal.started,
            client_ip=self.client[0] if self.client else None,
        )
        self.transport.write(refusal.response)
        self.transport.close()

    def _received_headers(self) -> list[tuple[bytes, bytes]]:
        # uvicorn starts a scope without a method at a request's first byte and adds the method once its headers
        # are complete: while it has none, `headers` holds the refused request's header lines read so far (never
        # the one cut off). Between requests, scope and headers are still the previous request's; before a first
        # request scope is None, although uvicorn's type says it never is.
        scope: Mapping[str, object] | None = self.scope
        if scope is None or "method" in scope:
            return []
        return self.headers

    def _received_method(self) -> str:
        # The parser knows the method once the request target begins, which on_url counts; before that it still
        # holds the previous request's method, or none.
        scope: Mapping[str, object] | None = self.scope
        if scope is None or "method" in scope or self._parsed_header_bytes == 0:
            return "OTHER"
        return bytes(self.parser.get_method()).decode("ascii", "replace")


def _first_value(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    # The first line of a header, as Starlette's Headers.get reads it for the app.
    return next((value.decode("latin-1") for key, value in headers if key == name), None)
