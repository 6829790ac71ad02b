"""The HTTP/1.1 protocol `serve` runs: uvicorn's httptools protocol plus a deadline for request headers.

uvicorn arms a timer only between keep-alive requests; a new connection, or one that has started a request, may
take as long as it likes to send the header block. A few hundred such slow clients (slowloris) hold as many sockets
and file descriptors for free. Here every request's headers must be complete within
`REQUEST_HEADER_TIMEOUT_SECONDS` of the connection opening (first request) or of its first byte (later requests on
a kept-alive connection); otherwise the client gets `408 Request Timeout` and the connection is closed. The body
has its own deadline (`REQUEST_BODY_TIMEOUT_SECONDS`, `service.http_hygiene`).
"""

from __future__ import annotations

import asyncio
import functools
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.settings import load_settings

logger = logging.getLogger("service.server")

_REQUEST_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: 26\r\nConnection: close\r\n\r\nrequest headers too slow\r\n"
)


@functools.cache
def configured_header_timeout() -> float:
    """Return REQUEST_HEADER_TIMEOUT_SECONDS from this process's environment (read once per process)."""
    # uvicorn builds this protocol inside each worker process, where only the environment carries settings.
    return load_settings().request_header_timeout_seconds


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol that answers 408 and closes when request headers arrive too slowly."""

    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection and start the clock for its first request's headers."""
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        """Start a request; on a kept-alive connection its headers get a fresh deadline."""
        super().on_message_begin()
        if self._header_deadline is None:
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        """Stop the header clock, then hand the request to the app."""
        self._cancel_header_deadline()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the header clock with the connection."""
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(configured_header_timeout(), self._headers_too_slow)

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        logger.info("closed a connection whose request headers did not arrive in time (408)")
        self.transport.write(_REQUEST_TIMEOUT_RESPONSE)
        self.transport.close()
