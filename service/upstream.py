"""The typed async client for the 7 upstream ElevenLabs convai endpoints.

One `httpx.AsyncClient` per process (built by `create_http_client`, opened and closed by the app lifespan)
carries the `xi-api-key`; `UpstreamClient` wraps it with per-endpoint shape checks, status mapping onto
`service.errors`, bounded retries for idempotent GETs and streamed audio. It returns the parsed upstream
JSON so the gateway keeps the upstream shapes.

The transport under httpx was chosen by measurement (`tests/perf/transport_compare.py`, 2 cores, wrk):
proxying get-signed-url, httpx-aiohttp's transport served ~1,700 req/s at 10 concurrent clients and
~2,300 at 50, against ~670 and ~580 with httpx's own (2.5x and 3.9x; p99 15 vs 59 ms and 46 vs 477 ms).

Nothing raised or logged here contains the api key, a signed URL or an upstream body.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import functools
import http.cookiejar
import json
import logging
import math
import random as _random
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal, NoReturn
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit

import aiohttp
import httpx
import msgspec
from httpx_aiohttp import AiohttpTransport
from httpx_aiohttp.transport import AiohttpResponseStream

from service import __version__
from service.errors import (
    AudioStreamsBusy,
    GatewayError,
    NotFound,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from service.settings import Secret, Settings, netloc_without_credentials

logger = logging.getLogger("service.upstream")

TransportKind = Literal["aiohttp", "httpx"]
# Measured, not assumed: see tests/perf/transport_compare.py and the README's numbers.
DEFAULT_TRANSPORT: TransportKind = "aiohttp"
# A request extension asking `AiohttpUpstreamTransport` to read the whole response body (decoded, at most
# MAX_JSON_BODY_BYTES) before returning it, all within the connect + read timeouts: every JSON call.
READ_WHOLE_BODY = "convai_gateway.read_whole_body"
# A page of 100 conversations is ~30 KB, a long conversation's details a few hundred KB.
MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
UPSTREAM_LIMITS = httpx.Limits(max_connections=200, max_keepalive_connections=100, keepalive_expiry=30.0)

RETRYABLE_STATUSES = frozenset({502, 503, 504})
BACKOFF_BASE_SECONDS = 0.1
BACKOFF_CAP_SECONDS = 1.0
DEFAULT_RETRY_AFTER_SECONDS = 1
MAX_RETRY_AFTER_SECONDS = 3600

SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
TOKEN_PATH = "/v1/convai/conversation/token"  # noqa: S105 - a path, not a secret
CONVERSATIONS_PATH = "/v1/convai/conversations"

Observer = Callable[[str, str, float], None]


# --- transport -------------------------------------------------------------------------------------


def _no_cookies() -> http.cookiejar.CookieJar:
    # An upstream Set-Cookie must never be replayed on later calls made for other users. (A jar, not
    # httpx.Cookies: httpx copies a Cookies object's cookies into a fresh jar, dropping the policy.)
    return http.cookiejar.CookieJar(policy=http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))


class NoResponse(httpx.RemoteProtocolError):
    """The connection failed after the request was sent and before any byte of a response arrived."""

    # What a pooled connection that upstream had just closed looks like; the request may also have been acted
    # on, so only an idempotent GET may be sent again.


def _httpx_error_for(
    original: BaseException, request: httpx.Request, *, before_response: bool = False
) -> httpx.TransportError:
    """Map an aiohttp failure onto the httpx class that names what actually went wrong."""
    # httpx-aiohttp maps nearly every aiohttp connection error (including read timeouts and a server that
    # hangs up) to httpx.ConnectTimeout, which would make reads look retryable and drops look like 504s.
    message = type(original).__name__
    if isinstance(original, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message, request=request)
    if isinstance(original, TimeoutError):
        return httpx.ReadTimeout(message, request=request)
    if isinstance(original, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message, request=request)
    if before_response and isinstance(original, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return NoResponse(message, request=request)
    if isinstance(original, aiohttp.ServerDisconnectedError | aiohttp.ClientResponseError):
        return httpx.RemoteProtocolError(message, request=request)
    return httpx.ReadError(message, request=request)


class UnreadableBody(httpx.DecodingError):
    """A whole-read answer over its size limit, or in a content coding the gateway does not decode."""


async def _read_whole(
    response: aiohttp.ClientResponse, limit: int, request: httpx.Request
) -> tuple[bytes, Sequence[tuple[bytes, bytes]]]:
    """Read a response body, decoded, refusing one over `limit` bytes; return it with headers whose length is its."""
    length = response.content_length
    if length is not None and length > limit:
        raise UnreadableBody(f"body of {length} bytes is over the limit", request=request)
    if length is not None:
        raw = await response.read()  # the parser stops at Content-Length
    else:
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise UnreadableBody("chunked body is over the limit", request=request)
            chunks.append(chunk)
        raw = b"".join(chunks)
    coding = response.headers.get("Content-Encoding", "").strip().lower()
    if coding in ("", "identity"):
        if length is not None:
            return raw, response.raw_headers
        return raw, [*response.raw_headers, (b"Content-Length", b"%d" % len(raw))]
    # httpx would inflate it whole: a 100 KB gzip body of whitespace is 100 MB of valid JSON.
    body = _inflate(raw, coding, limit, request)
    skipped = (b"content-encoding", b"content-length")
    kept = [(name, value) for name, value in response.raw_headers if name.lower() not in skipped]
    return body, [*kept, (b"Content-Length", b"%d" % len(body))]


def _inflate(raw: bytes, coding: str, limit: int, request: httpx.Request) -> bytes:
    """Decode a gzip or deflate body, stopping as soon as it would exceed `limit` bytes."""
    if coding in ("gzip", "x-gzip"):
        wbits = [zlib.MAX_WBITS | 16]
    elif coding == "deflate":
        # zlib-wrapped as RFC 9110 says, or raw as some servers send it.
        wbits = [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    else:
        raise UnreadableBody(f"unsupported content coding {coding[:32]!r}", request=request)
    for bits in wbits:
        decoder = zlib.decompressobj(bits)
        try:
            body = decoder.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(body) > limit:
            raise UnreadableBody("decoded body is over the limit", request=request)
        if not decoder.eof:
            break
        return body
    raise UnreadableBody(f"invalid {coding} body", request=request)


def _aiohttp_cause(exc: BaseException) -> BaseException | None:
    cause = exc.__cause__ if isinstance(exc, httpx.TransportError) else exc
    if isinstance(cause, aiohttp.ClientError | TimeoutError):
        return cause
    return None


class _AiohttpStream(httpx.AsyncByteStream):
    """A response body from aiohttp whose errors are remapped like the request's."""

    def __init__(self, inner: httpx.AsyncByteStream, request: httpx.Request) -> None:
        self._inner = inner
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                yield chunk
        except (httpx.TransportError, aiohttp.ClientError, TimeoutError) as exc:
            original = _aiohttp_cause(exc)
            if original is None:
                raise
            raise _httpx_error_for(original, self._request) from exc

    async def aclose(self) -> None:
        """Release the aiohttp response (closing its connection if the body was not read to the end)."""
        with contextlib.suppress(aiohttp.ClientError):
            await self._inner.aclose()


class _NoStaleBytesConnector(aiohttp.TCPConnector):
    """A TCPConnector that never reuses a pooled connection on which bytes arrived while it sat idle."""

    # An idle HTTP/1.1 connection must be silent. Bytes there are a response nobody asked for (a buggy
    # upstream or intermediary); reused, the connection would hand it to the next request as its answer,
    # one user's token to another. aiohttp checks this when a connection is released, not when it is taken
    # from the pool (httpcore does); this closes such connections at that point. Relies on aiohttp 3.14's
    # pool (`_conns`); a test fails if that changes.
    async def _get(self, key: Any, traces: list[Any]) -> Any:
        pooled = self._conns.get(key)
        # aiohttp takes pooled connections from the left: only those it would take next are looked at.
        while pooled and pooled[0][0].should_close:
            protocol, _ = pooled.popleft()
            protocol.close()
        if pooled is not None and not pooled:
            del self._conns[key]
        return await super()._get(key, traces)


class AiohttpUpstreamTransport(httpx.AsyncBaseTransport):
    """httpx-aiohttp's transport with a cookieless session created inside the running loop."""

    def __init__(
        self,
        limits: httpx.Limits = UPSTREAM_LIMITS,
        *,
        proxy: str | None = None,
        max_body_bytes: int = MAX_JSON_BODY_BYTES,
    ) -> None:
        """Pool with `limits`, send through `proxy` (http://[user:password@]host:port), cap read-whole bodies."""
        self._limits = limits
        self._max_body_bytes = max_body_bytes
        self._proxy: str | None = None
        self._proxy_headers: dict[str, str] | None = None
        if proxy is not None:
            self._proxy, authorization = split_proxy_url(proxy)
            if authorization is not None:
                self._proxy_headers = {"Proxy-Authorization": authorization}
        # The transport calls `_new_session` on its first request, so the aiohttp session (bound to an
        # event loop) is created inside the loop that uses it, never at import or construction time.
        self._inner = AiohttpTransport(limits=limits, trust_env=False, client=self._new_session)

    def _new_session(self) -> aiohttp.ClientSession:
        connector = _NoStaleBytesConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry or 15.0,
            ssl=self._inner.ssl_context,
        )
        session = aiohttp.ClientSession(
            connector=connector, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False, auto_decompress=False
        )
        # aiohttp silently sends an idempotent request (GET, DELETE...) a second time when the connection drops
        # before the status line. DESIGN 6 allows no retry of a DELETE: upstream may have acted on the first,
        # and the second's 404 would tell the caller nothing was deleted. UpstreamClient retries GETs itself
        # (`NoResponse`), within its retry count. No public switch exists (aiohttp 3.14); tested.
        session._retry_connection = False
        return session

    @property
    def session(self) -> aiohttp.ClientSession | None:
        """Return the aiohttp session once the first request created it."""
        client = self._inner.client
        return client if isinstance(client, aiohttp.ClientSession) else None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request through aiohttp and return an httpx response with a remapped body stream."""
        # The same call httpx-aiohttp's transport makes (minus its proxy options, which this transport never
        # sets), inlined: going through it built a second httpx.Response per call and mapped every error
        # twice, a measurable share of the gateway's CPU per request (see tests/perf/bench.py).
        inner = self._inner
        session = inner.client
        if not isinstance(session, aiohttp.ClientSession):
            session = inner.client = inner.get_client()
        timeout: Mapping[str, float | None] = request.extensions.get("timeout", {})
        read_whole = bool(request.extensions.get(READ_WHOLE_BODY))
        total: float | None = None
        if read_whole and timeout.get("read") is not None:
            # The read timeout bounds each socket read; an upstream sending a byte now and then would never
            # meet it. A whole answer (status, headers, body) must arrive within connect + read.
            total = (timeout.get("connect") or 0.0) + (timeout.get("read") or 0.0)
        data: bytes | httpx.AsyncByteStream | None
        try:
            data = request.content or None
        except httpx.RequestNotRead:
            data = request.stream  # type: ignore[assignment]
            request.headers.pop("transfer-encoding", None)  # aiohttp frames the body itself
        headers: Sequence[tuple[str, str]] = _header_pairs(tuple(request.headers.raw))
        if self._proxy_headers is not None and request.url.scheme == "http":
            # A plain-http request goes to the proxy itself, so its credentials ride on it; aiohttp sends
            # proxy_headers only on the CONNECT that tunnels an https request.
            headers = [*headers, *self._proxy_headers.items()]
        try:
            response = await session.request(
                method=request.method,
                url=str(request.url),
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                compress=False,
                timeout=_client_timeout(
                    total, timeout.get("connect"), timeout.get("read"), timeout.get("pool")
                ),
                server_hostname=request.extensions.get("sni_hostname"),
                proxy=self._proxy,
                proxy_headers=self._proxy_headers,
            ).__aenter__()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _httpx_error_for(exc, request, before_response=True) from exc
        # No reason phrase: nothing reads it, and one with obs-text bytes (RFC 9112 allows them) would not
        # encode back to bytes.
        extensions = {"http_version": b"HTTP/1.1"}
        if read_whole:
            # Read in one call instead of streamed through four async-generator layers (aiohttp,
            # httpx-aiohttp, the error remapper, httpx's decoders): ~40 us of a JSON call.
            try:
                body, raw_headers = await _read_whole(response, self._max_body_bytes, request)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise _httpx_error_for(exc, request) from exc
            finally:
                response.release()
            whole = httpx.Response(
                status_code=response.status,
                headers=raw_headers,
                stream=httpx.ByteStream(body),
                request=request,
                extensions=extensions,
            )
            # What Response(content=body) ends with, without running the body through httpx's decoders and
            # chunkers (nothing left to decode; ~10 us a call). `_content` is where httpx keeps a read body
            # (tested: `content` would raise ResponseNotRead if that changed).
            whole._content = body
            whole.is_stream_consumed = whole.is_closed = True
            return whole
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_AiohttpStream(AiohttpResponseStream(response), request),
            request=request,
            extensions=extensions,
        )

    async def aclose(self) -> None:
        """Close the aiohttp session and its connections."""
        await self._inner.aclose()


def split_proxy_url(url: str) -> tuple[str, str | None]:
    """Split a proxy URL into the URL without credentials and its Proxy-Authorization value, if any."""
    # Credentials travel as Proxy-Authorization only, never inside a URL that an error message could show.
    parts = urlsplit(url)
    authorization = None
    if parts.username is not None:
        authorization = aiohttp.encode_basic_auth(unquote(parts.username), unquote(parts.password or ""))
    return urlunsplit((parts.scheme, netloc_without_credentials(parts), "", "", "")), authorization


@functools.lru_cache(maxsize=256)
def _header_pairs(raw: tuple[tuple[bytes, bytes], ...]) -> tuple[tuple[str, str], ...]:
    """Decode request headers as iterating httpx.Headers would; a client's requests repeat the same few sets."""
    # Each request holds its own copy of the client's headers, so httpx would work out their encoding (a decode
    # of every name and value) and decode them again on every call.
    encoding = httpx.Headers(list(raw)).encoding
    return tuple((name.decode(encoding), value.decode(encoding)) for name, value in raw)


@functools.lru_cache(maxsize=64)
def _client_timeout(
    total: float | None, connect: float | None, read: float | None, pool: float | None
) -> aiohttp.ClientTimeout:
    """Return aiohttp's (immutable) timeouts for httpx's: built once per set instead of per request."""
    return aiohttp.ClientTimeout(total=total, sock_connect=connect, sock_read=read, connect=pool)


def create_transport(
    kind: TransportKind = DEFAULT_TRANSPORT,
    *,
    limits: httpx.Limits = UPSTREAM_LIMITS,
    proxy: Secret | None = None,
) -> httpx.AsyncBaseTransport:
    """Build the upstream transport: httpx-aiohttp (`aiohttp`) or httpx's own (`httpx`), through `proxy` if set."""
    proxy_url = proxy.reveal() if proxy is not None else None
    if kind == "aiohttp":
        return AiohttpUpstreamTransport(limits, proxy=proxy_url)
    return httpx.AsyncHTTPTransport(limits=limits, trust_env=False, proxy=proxy_url)


def create_http_client(
    settings: Settings, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """Build the process-wide upstream httpx client carrying the api key; close it with `aclose()`."""
    timeout = httpx.Timeout(
        connect=settings.upstream_connect_timeout,
        read=settings.upstream_read_timeout,
        write=settings.upstream_read_timeout,
        pool=settings.upstream_connect_timeout,
    )
    return httpx.AsyncClient(
        base_url=settings.elevenlabs_base_url,
        timeout=timeout,
        transport=transport if transport is not None else create_transport(),
        headers={
            "xi-api-key": settings.elevenlabs_api_key.reveal(),
            "user-agent": f"convai-gateway/{__version__}",
        },
        cookies=_no_cookies(),
        follow_redirects=False,
        # Proxies and CA bundles from the environment would silently reroute the api key.
        trust_env=False,
    )


# --- client --------------------------------------------------------------------------------------------


def _retry_after_seconds(value: str | None, now: float) -> int:
    """Parse a Retry-After header (seconds or an HTTP date) into whole seconds, at least 1."""
    if not value:
        return DEFAULT_RETRY_AFTER_SECONDS
    value = value.strip()
    seconds: float
    if value.isdigit():
        seconds = int(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return DEFAULT_RETRY_AFTER_SECONDS
        if when.tzinfo is None:
            return DEFAULT_RETRY_AFTER_SECONDS
        seconds = when.timestamp() - now
    return max(1, min(MAX_RETRY_AFTER_SECONDS, math.ceil(seconds)))


def _status_class(status: int) -> str:
    return f"error_{status // 100}xx"


class _Failure:
    """An attempt's failure: the error to raise, its outcome label and whether a GET may retry it."""

    __slots__ = ("error", "outcome", "retryable")

    def __init__(self, error: GatewayError, outcome: str, *, retryable: bool) -> None:
        self.error = error
        self.outcome = outcome
        self.retryable = retryable


def _transport_failure(exc: httpx.TransportError) -> _Failure:
    if isinstance(exc, httpx.ConnectTimeout):
        # Nothing reached upstream, so another try is safe.
        return _Failure(UpstreamTimeout("upstream connection timed out"), "timeout", retryable=True)
    if isinstance(exc, httpx.TimeoutException):
        return _Failure(UpstreamTimeout("upstream did not answer in time"), "timeout", retryable=False)
    if isinstance(exc, httpx.ConnectError):
        return _Failure(UpstreamError("upstream is unreachable"), "connect_error", retryable=True)
    if isinstance(exc, NoResponse):
        return _Failure(UpstreamError("upstream connection failed"), "transport_error", retryable=True)
    return _Failure(UpstreamError("upstream connection failed"), "transport_error", retryable=False)


class AudioStream:
    """An upstream audio response being streamed: its content type, length and chunks."""

    def __init__(self, response: httpx.Response, *, on_error: Callable[[_Failure], None]) -> None:
        self._response = response
        self._on_error = on_error
        self.content_type: str = response.headers.get("content-type", "application/octet-stream")
        length = response.headers.get("content-length")
        # A length only describes the bytes we pass on when upstream applied no content coding.
        encoded = response.headers.get("content-encoding", "identity").lower() not in ("", "identity")
        self.content_length: int | None = int(length) if length and length.isdigit() and not encoded else None

    @property
    def closed(self) -> bool:
        """Tell whether the upstream response has been closed."""
        return self._response.is_closed

    async def chunks(self) -> AsyncIterator[bytes]:
        """Yield the audio bytes as they arrive from upstream."""
        try:
            async for chunk in self._response.aiter_bytes():
                if chunk:
                    yield chunk
        except httpx.TransportError as exc:
            failure = _transport_failure(exc)
            self._on_error(failure)
            raise failure.error from exc


@dataclasses.dataclass(frozen=True, slots=True)
class _Prepared:
    """What every request of one client shares, and the client state it was prepared from."""

    base_url: httpx.URL
    timeout: httpx.Timeout
    raw: list[tuple[bytes, bytes]]
    prefix: str
    headers: httpx.Headers
    extensions: dict[str, Any]
    api_keys: tuple[bytes, ...]


def _api_keys(headers: httpx.Headers) -> tuple[bytes, ...]:
    """Return the non-empty `xi-api-key` values of request headers, as they go on the wire."""
    return tuple(value for name, value in headers.raw if name.lower() == b"xi-api-key" and value)


class UpstreamClient:
    """Typed calls to the 7 upstream endpoints, with status mapping, retries and metrics hooks.

    `observe(endpoint, outcome, seconds)` is called once per attempt that fails and once per call that
    succeeds; `sleep`/`random` drive the retry backoff, `clock` (monotonic) the retry budget and
    durations, `wall_clock` (unix seconds) the parsing of HTTP-date `Retry-After` values.
    """

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        max_retries: int = 2,
        audio_read_timeout: float = 60.0,
        max_audio_streams: int | None = None,
        observe: Observer | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = http
        self._transport = transport
        self._max_retries = max(0, max_retries)
        self._audio_read_timeout = audio_read_timeout
        self._max_audio_streams = max_audio_streams
        self._audio_streams = 0
        self._observe = observe
        self._sleep = sleep
        self._random = random
        self._clock = clock
        self._wall_clock = wall_clock
        self._prepared: _Prepared | None = None

    # --- endpoints ---

    async def get_signed_url(self, agent_id: str, *, branch_id: str | None = None) -> dict[str, Any]:
        """Mint a signed WebSocket URL (with its conversation id) for an agent."""
        params = [("agent_id", agent_id), ("include_conversation_id", "true")]
        if branch_id is not None:
            params.append(("branch_id", branch_id))
        body: dict[str, Any] = await self._get_json("get_signed_url", SIGNED_URL_PATH, params, _is_signed_url)
        return body

    async def get_webrtc_token(
        self, agent_id: str, *, participant_name: str, branch_id: str | None = None
    ) -> dict[str, Any]:
        """Mint a WebRTC conversation token for an agent and participant."""
        params = [("agent_id", agent_id), ("participant_name", participant_name)]
        if branch_id is not None:
            params.append(("branch_id", branch_id))
        body: dict[str, Any] = await self._get_json("token", TOKEN_PATH, params, _is_token)
        return body

    async def list_conversations(self, params: Sequence[tuple[str, str]]) -> dict[str, Any]:
        """Fetch one page of conversations with the given (already validated) query parameters."""
        body: dict[str, Any] = await self._get_json("list", CONVERSATIONS_PATH, list(params), _is_page)
        return body

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        """Fetch one conversation's details."""
        path = _conversation_path(conversation_id)
        body: dict[str, Any] = await self._get_json("get", path, None, _is_conversation)
        return body

    def stream_audio(self, conversation_id: str) -> AbstractAsyncContextManager[AudioStream]:
        """Open a conversation's audio; errors raise on entering, leaving closes the upstream response."""
        return self._audio(conversation_id)

    async def send_feedback(self, conversation_id: str, feedback: str | None) -> Any:
        """Set (or clear, with None) the user feedback of a conversation."""
        path = _conversation_path(conversation_id) + "/feedback"
        return await self._call_json("feedback", "POST", path, None, {"feedback": feedback}, retryable=False)

    async def delete_conversation(self, conversation_id: str) -> Any:
        """Delete a conversation upstream."""
        path = _conversation_path(conversation_id)
        return await self._call_json("delete", "DELETE", path, None, None, retryable=False)

    # --- machinery ---

    async def _get_json(
        self, endpoint: str, path: str, params: list[tuple[str, str]] | None, valid: Callable[[Any], bool]
    ) -> Any:
        return await self._call_json(endpoint, "GET", path, params, None, retryable=True, valid=valid)

    async def _call_json(
        self,
        endpoint: str,
        method: str,
        path: str,
        params: list[tuple[str, str]] | None,
        json_body: Any,
        *,
        retryable: bool,
        valid: Callable[[Any], bool] | None = None,
    ) -> Any:
        request, api_keys = self._build_request(method, path, params, json_body)
        started = self._clock()
        try:
            response = await self._send(endpoint, request, retryable=retryable, stream=False)
        except httpx.DecodingError as exc:
            # Over the size limit, or a content coding that does not decode.
            self._malformed(endpoint, self._clock() - started, exc)
        if not response.content and method != "GET":
            # Feedback and delete are documented as "any JSON"; an empty body is answered as {}.
            self._record(endpoint, "ok", self._clock() - started)
            return {}
        if any(key in response.content for key in api_keys):
            # An upstream or an intermediary echoing the request's headers: routes pass unknown fields through,
            # so the key would reach the caller. The key this request carried, not one read at construction:
            # the client's headers may have changed since.
            self._malformed(endpoint, self._clock() - started)
        try:
            body = parse_json(response.content)
        except (ValueError, RecursionError) as exc:
            self._malformed(endpoint, self._clock() - started, exc)
        if valid is not None and not valid(body):
            self._malformed(endpoint, self._clock() - started)
        self._record(endpoint, "ok", self._clock() - started)
        return body

    def _build_request(
        self, method: str, path: str, params: list[tuple[str, str]] | None, json_body: Any
    ) -> tuple[httpx.Request, tuple[bytes, ...]]:
        """Build the request `AsyncClient.build_request` would, and the API key(s) it carries."""
        http = self._http
        prepared = self._prepare(http)
        if prepared is None or http.cookies:
            query = httpx.QueryParams(tuple(params)) if params else None
            built = http.build_request(
                method, path, params=query, json=json_body, extensions={READ_WHOLE_BODY: True}
            )
            return built, _api_keys(built.headers)
        headers = prepared.headers
        content = b"" if json_body is None else _JSON_ENCODER.encode(json_body).encode()
        if json_body is not None or method in ("POST", "PUT", "PATCH"):
            # What httpx's encode_json and Request._prepare add for a body (an empty POST says so too).
            headers = httpx.Headers(headers)
            headers.setdefault("Content-Length", str(len(content)))
            if json_body is not None:
                headers.setdefault("Content-Type", "application/json")
        # Given a stream, httpx.Request keeps the headers as they are: without one it would normalise them all
        # again and look up Host and Content-Length to add what `prepared` already holds (~60-70 k instructions
        # per call, 2-3 % of a gateway request).
        request = httpx.Request(
            method,
            _upstream_url(prepared.prefix, path, tuple(params) if params else ()),
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions=prepared.extensions,
        )
        request.read()  # sets `content`: the transport sends it whole
        # The headers were prepared from the client's current ones (`_prepare` re-prepares on any change), so
        # their key is the one sent; the body's headers added above are never an API key.
        return request, prepared.api_keys

    def _prepare(self, http: httpx.AsyncClient) -> _Prepared | None:
        """Return the client's base URL, headers (Host first) and extensions as its requests carry them."""
        cached = self._prepared
        raw = http.headers.raw
        if (
            cached is not None
            and cached.base_url is http.base_url
            and cached.timeout is http.timeout
            and cached.raw == raw
        ):
            return cached
        base_url = http.base_url
        self._prepared = None
        if not base_url.is_absolute_url or base_url.query or base_url.fragment:
            return None  # httpx's merge
        prefix = f"{base_url.scheme}://{base_url.netloc.decode('ascii')}{base_url.raw_path.decode('ascii')}"
        self._prepared = _Prepared(
            base_url=base_url,
            timeout=http.timeout,
            raw=raw,
            prefix=prefix,
            headers=httpx.Headers([(b"Host", base_url.netloc), *raw]),
            extensions={"timeout": http.timeout.as_dict(), READ_WHOLE_BODY: True},
            api_keys=_api_keys(http.headers),
        )
        return self._prepared

    async def _send(
        self, endpoint: str, request: httpx.Request, *, retryable: bool, stream: bool
    ) -> httpx.Response:
        """Send with bounded, jittered retries; return a 2xx response or raise the mapped error."""
        budget = _read_budget(request)
        first = self._clock()
        attempt = 0
        while True:
            started = self._clock()
            try:
                response = await self._dispatch(request, stream=stream)
            except httpx.TransportError as exc:
                failure = _transport_failure(exc)
                cause: BaseException = exc
            else:
                if response.is_success:
                    return response
                await response.aclose()
                failure = self._status_failure(endpoint, response)
                cause = httpx.HTTPStatusError(
                    f"upstream status {response.status_code}", request=request, response=response
                )
            self._record(endpoint, failure.outcome, self._clock() - started)
            if not (retryable and failure.retryable and attempt < self._max_retries):
                raise failure.error from cause
            delay = self._random() * min(BACKOFF_CAP_SECONDS, BACKOFF_BASE_SECONDS * 2**attempt)
            if budget is not None and self._clock() - first + delay > budget:
                # The caller's time budget is spent; another try would only answer later with the same error.
                raise failure.error from cause
            attempt += 1
            logger.info(
                "retrying upstream %s after %s (attempt %d of %d)",
                endpoint, failure.outcome, attempt, self._max_retries,
            )  # fmt: skip
            await self._sleep(delay)

    async def _dispatch(self, request: httpx.Request, *, stream: bool) -> httpx.Response:
        """Send one attempt through the client's transport (when given) or through `AsyncClient.send`."""
        if self._transport is None:
            return await self._http.send(request, stream=stream)
        # What AsyncClient.send adds on top of its transport is machinery this client switches off or must
        # not have: auth flows (none), redirects (never followed), cookie extraction (an upstream cookie must
        # never reach another user's call), event hooks (none) and an elapsed-time stream wrapper. Skipping
        # it saved ~110 us of CPU per upstream call, a tenth of a gateway request (tests/perf/profile.py).
        response = await self._transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()  # reading to the end also closes the response
            except BaseException:
                await response.aclose()
                raise
        return response

    def _status_failure(self, endpoint: str, response: httpx.Response) -> _Failure:
        status = response.status_code
        if status == 404:
            return _Failure(NotFound("no such conversation"), "not_found", retryable=False)
        if status in (401, 403):
            # The body may echo the key, so only the status is logged.
            logger.warning("upstream refused the api key on %s (status %d)", endpoint, status)
            return _Failure(
                UpstreamError("upstream refused the gateway's credentials"), "auth_error", retryable=False
            )
        if status == 429:
            retry_after = _retry_after_seconds(response.headers.get("retry-after"), self._wall_clock())
            limited = UpstreamRateLimited(
                f"upstream rate limit reached; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )
            return _Failure(limited, "rate_limited", retryable=False)
        if status in (400, 422):
            return _Failure(
                UpstreamRejected("upstream rejected the request parameters"), "rejected", retryable=False
            )
        if status >= 500:
            logger.warning("upstream %s failed with status %d", endpoint, status)
        error = UpstreamError(f"upstream answered with status {status}")
        return _Failure(error, _status_class(status), retryable=status in RETRYABLE_STATUSES)

    def _malformed(self, endpoint: str, seconds: float = 0.0, exc: BaseException | None = None) -> NoReturn:
        self._record(endpoint, "malformed", seconds)
        logger.warning("upstream %s returned a malformed response", endpoint)
        raise UpstreamError("malformed upstream response") from exc

    def _record(self, endpoint: str, outcome: str, seconds: float) -> None:
        if self._observe is not None:
            self._observe(endpoint, outcome, seconds)

    @contextlib.asynccontextmanager
    async def _audio(self, conversation_id: str) -> AsyncIterator[AudioStream]:
        # A stream holds its pooled connection for as long as its listener takes; without a cap, slow or
        # paused listeners could take every connection and leave token minting waiting for one.
        if self._max_audio_streams is not None and self._audio_streams >= self._max_audio_streams:
            raise AudioStreamsBusy()  # no upstream request: nothing for the upstream metrics
        self._audio_streams += 1
        try:
            async with self._audio_response(conversation_id) as audio:
                yield audio
        finally:
            self._audio_streams -= 1

    @contextlib.asynccontextmanager
    async def _audio_response(self, conversation_id: str) -> AsyncIterator[AudioStream]:
        default = self._http.timeout
        timeout = httpx.Timeout(
            connect=default.connect, read=self._audio_read_timeout, write=default.write, pool=default.pool
        )
        # identity keeps upstream's Content-Length meaningful for the bytes we pass through.
        request = self._http.build_request(
            "GET", _conversation_path(conversation_id) + "/audio", headers={"accept-encoding": "identity"},
            timeout=timeout,
        )  # fmt: skip
        started = self._clock()
        response = await self._send("audio", request, retryable=True, stream=True)
        failed: list[_Failure] = []
        try:
            yield AudioStream(response, on_error=failed.append)
        finally:
            await response.aclose()
            self._record("audio", failed[0].outcome if failed else "ok", self._clock() - started)


@functools.lru_cache(maxsize=1024)
def _upstream_url(prefix: str, path: str, params: tuple[tuple[str, str], ...]) -> httpx.URL:
    """Join, encode and parse an upstream URL once: mint URLs repeat (one per allowed agent), httpx.URL is immutable."""
    # httpx validates every character and the host on each parse (~30 us), urlencode quotes each name and value.
    # Same merge as httpx's: `base_url.raw_path + path.lstrip("/")`, then the params urlencoded.
    url = prefix + path.lstrip("/")
    if params:
        # httpx.QueryParams groups a repeated key's values under its first occurrence; so does this.
        grouped: dict[str, list[str]] = {}
        for key, value in params:
            grouped.setdefault(key, []).append(value)
        url += "?" + urlencode([(key, value) for key, values in grouped.items() for value in values])
    return httpx.URL(url)


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond a double")
    return value


# As httpx's encode_json, built once: json.dumps builds an encoder on every call that passes options.
_JSON_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
# Built once: json.loads builds a decoder on every call that passes options (~6 us for a list page).
# The scanner calls parse_float only for numbers with a fraction or an exponent (~0.14 us each: a details
# page's latencies), and the check keeps an infinity from reaching a renderer that would write it as null.
_JSON_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


# msgspec reads a valid JSON text to the very values the stdlib scanner does, integers of any size included
# (orjson turns those beyond 64 bits into floats), in ~40 % of its time. It refuses more: NaN, infinities and
# numbers beyond a double, lone surrogates, more than 4,300 digits, deep nesting. Whatever it refuses goes to
# the stdlib scanner, which accepts or refuses it exactly as before.
_FAST_JSON_DECODER = msgspec.json.Decoder()


def parse_json(content: bytes) -> Any:
    """Parse an upstream JSON body (UTF-8, RFC 8259), refusing NaN, infinities and numbers beyond a double."""
    try:
        return _FAST_JSON_DECODER.decode(content)
    except (ValueError, RecursionError):  # msgspec.DecodeError is a ValueError
        pass
    # Outside the handler: the stdlib's own error, if any, is raised without msgspec's as its context.
    return parse_json_with_stdlib(content)


def parse_json_with_stdlib(content: bytes) -> Any:
    """Parse an upstream JSON body with the stdlib's scanner alone, refusing what `parse_json` refuses."""
    # Let through, they would fail only later, when the gateway renders its answer: a 500, not a 502.
    # json.loads reads 1e400 as an infinity; RFC 8259 leaves such numbers to the implementation.
    return _JSON_DECODER.decode(content.decode("utf-8"))


def _is_signed_url(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("signed_url"), str)
        and isinstance(body.get("conversation_id"), str | None)
    )


def _is_token(body: Any) -> bool:
    return isinstance(body, dict) and isinstance(body.get("token"), str)


def _is_page(body: Any) -> bool:
    return (
        isinstance(body, dict)
        and isinstance(body.get("conversations"), list)
        and isinstance(body.get("has_more"), bool)
    )


def _is_conversation(body: Any) -> bool:
    return isinstance(body, dict)


def _conversation_path(conversation_id: str) -> str:
    if conversation_id in ("", ".", ".."):
        # Dot segments survive quoting and would be resolved by URL normalisation onto another endpoint.
        raise NotFound("no such conversation")
    return f"{CONVERSATIONS_PATH}/{quote(conversation_id, safe='')}"


def _read_budget(request: httpx.Request) -> float | None:
    timeout: Mapping[str, float | None] = request.extensions.get("timeout", {})
    return timeout.get("read")
