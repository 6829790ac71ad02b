"""Metrics, structured logs, audit events and the per-request context (request id, access log).

Nothing here ever records a token, key, signed URL, query string or raw path: routes are labelled by their
template, users by a short hash, and a redaction filter masks anything secret-looking that slips into a log line.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import fcntl
import hashlib
import logging
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
    multiprocess,
    values,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.gc_collector import GCCollector
from prometheus_client.metrics_core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.client_ip import client_ip
from service.compact_json import NotPlainJson, compact_encoder, plain_json
from service.errors import routes_matching_path
from service.settings import IPNetwork

ACCESS_LOGGER: Final = "convai_gateway.access"
AUDIT_LOGGER: Final = "convai_gateway.audit"
REQUEST_ID_HEADER: Final = "X-Request-ID"
_REQUEST_ID_RAW: Final = REQUEST_ID_HEADER.lower().encode("latin-1")
MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
# The route of a request no route matched, as of one refused below the app (no route was ever chosen).
UNMATCHED_ROUTE: Final = "unmatched"

CIRCUIT_STATES: Final = ("closed", "open", "half_open")
# Methods outside this set share one label value: the method is client-controlled and would otherwise
# let any caller create unbounded label series.
_KNOWN_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_REQUEST_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_UPSTREAM_BUCKETS: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_REQUEST_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# W3C Trace Context `traceparent`, version 00 only: lower-case hex trace id and parent id (neither all zeros,
# checked apart) and flags. Anything else is client input of unknown meaning and is ignored, never logged.
_TRACEPARENT_RE: Final = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID: Final = b"0" * 32
_ZERO_PARENT_ID: Final = b"0" * 16

_AnyMetric = TypeVar("_AnyMetric", Counter, Gauge, Histogram)


def _method_label(method: str) -> str:
    """Return `method` as logs and metrics name it: itself when a known method, else OTHER."""
    return method if method in _KNOWN_METHODS else "OTHER"


# Set in a request's scope state by the server protocol when the client's connection closes before the response
# has ended (`mark_client_gone`): a route that never reads `receive` again would otherwise not know.
CLIENT_GONE: Final = "convai_client_gone"

# The current request's id, so that any log line written while handling it can name it.
_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("convai_request_id", default=None)


class Metrics:
    """The gateway's Prometheus metrics, in their own registry (multi-worker safe via PROMETHEUS_MULTIPROC_DIR)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create every metric in `registry` (a new one by default)."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess_dir = os.environ.get(MULTIPROC_ENV) or None
        _sync_value_class(self.multiprocess_dir is not None)
        if self.multiprocess_dir is None:
            # In multiprocess mode these would report only the scraping worker, so they are left out there.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        reg = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.http_requests = Counter(
            "convai_gateway_http_requests",
            "HTTP requests handled, by method, route template and status.",
            ("method", "route", "status"),
            registry=reg,
        )
        self.http_duration = Histogram(
            "convai_gateway_http_request_duration_seconds",
            "Time from request start to the end of the response body, by method and route template.",
            ("method", "route"),
            buckets=_REQUEST_BUCKETS,
            registry=reg,
        )
        self.upstream_requests = Counter(
            "convai_gateway_upstream_requests",
            "Calls to the upstream API, by endpoint and outcome.",
            ("endpoint", "outcome"),
            registry=reg,
        )
        self.upstream_duration = Histogram(
            "convai_gateway_upstream_request_duration_seconds",
            "Upstream call latency, by endpoint.",
            ("endpoint",),
            buckets=_UPSTREAM_BUCKETS,
            registry=reg,
        )
        self.rate_limit_decisions = Counter(
            "convai_gateway_rate_limit_decisions",
            "Rate-limit decisions, by policy and outcome (allowed, limited, shadow_limited, near_limit).",
            ("policy", "outcome"),
            registry=reg,
        )
        self.redis_errors = Counter(
            "convai_gateway_redis_errors", "Redis errors and timeouts seen by the gateway.", registry=reg
        )
        # livemax: across live workers, 1 for a state means at least one worker's breaker is in it.
        self.circuit = Gauge(
            "convai_gateway_redis_circuit_state",
            "Redis circuit breaker state of the rate limiter (1 for the current state, 0 for the others).",
            ("state",),
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.jwks_refreshes = Counter(
            "convai_gateway_jwks_refreshes",
            "JWKS fetches, by outcome (ok, error).",
            ("outcome",),
            registry=reg,
        )
        self.ledger_writes = Counter(
            "convai_gateway_ledger_writes",
            "Ownership ledger writes, by outcome (ok, error).",
            ("outcome",),
            registry=reg,
        )

    def _child(self, metric: _AnyMetric, *labels: str) -> _AnyMetric:
        # `labels()` validates, locks and looks up on every call (~4 us, about 7 times per request); the
        # children it returns are stable, and every label here comes from a bounded set.
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one HTTP request and record its duration under its route template."""
        label = _method_label(method.upper())
        self._child(self.http_requests, label, route, str(status)).inc()
        self._child(self.http_duration, label, route).observe(max(0.0, seconds))

    def count_refused_request(self, method: str, status: int) -> None:
        """Count one request refused below the app (408, 431, 400, 503; dev's 421) under the route `unmatched`."""
        # Counted, not timed: a 408's duration is the header deadline at the client's pace, and a slowloris
        # burst of them would page as a slow gateway (ConvaiGatewaySlow) although no served request was slow.
        self._child(self.http_requests, _method_label(method), UNMATCHED_ROUTE, str(status)).inc()

    def observe_upstream(self, endpoint: str, outcome: str, seconds: float) -> None:
        """Count one upstream call and record its latency."""
        self._child(self.upstream_requests, endpoint, outcome).inc()
        self._child(self.upstream_duration, endpoint).observe(max(0.0, seconds))

    def observe_rate_limit(self, policy: str, outcome: str) -> None:
        """Count one rate-limit decision for a policy."""
        self._child(self.rate_limit_decisions, policy, outcome).inc()

    def redis_error(self) -> None:
        """Count one Redis error or timeout."""
        self.redis_errors.inc()

    def circuit_state(self, state: str) -> None:
        """Set the Redis circuit breaker gauge to `state` (closed, open or half_open)."""
        if state not in CIRCUIT_STATES:
            raise ValueError(f"unknown circuit state {state!r}; expected one of {', '.join(CIRCUIT_STATES)}")
        for name in CIRCUIT_STATES:
            self.circuit.labels(name).set(1 if name == state else 0)

    def jwks_refresh(self, outcome: str) -> None:
        """Count one JWKS refresh (ok or error)."""
        self.jwks_refreshes.labels(outcome).inc()

    def ledger_write(self, outcome: str) -> None:
        """Count one ledger write (ok or error)."""
        self._child(self.ledger_writes, outcome).inc()

    def render(self) -> tuple[bytes, str]:
        """Render all metrics in the Prometheus text format, aggregated across workers in multiprocess mode."""
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            _ReapingCollector(registry, self.multiprocess_dir)
            return generate_latest(registry), CONTENT_TYPE_PLAIN_0_0_4
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _sync_value_class(multiprocess_mode: bool) -> None:
    # prometheus-client picks file-backed values once, when it is first imported; a process that set
    # PROMETHEUS_MULTIPROC_DIR after that import (the CLI does, before uvicorn) would otherwise keep
    # in-memory values that no scrape of the shared directory ever sees.
    if multiprocess_mode != (values.ValueClass is not values.MutexValue):
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def mark_process_dead(pid: int) -> None:
    """Drop a dead worker's live gauges in multiprocess mode (call from a process manager's child-exit hook)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        with os.scandir(path) as entries:
            files = [entry.path for entry in entries if _live_gauge_pid(entry.name) == pid]
        _remove_files(files)


_DIR_LOCK_FILE: Final = "convai-gateway.lock"
# Open descriptors of the directories this process holds: a lock lasts as long as its descriptor.
_held_dirs: list[int] = []


def claim_multiprocess_dir(path: str) -> bool:
    """Hold the metrics directory `path` for this process's life; return False if another gateway holds it."""
    # Every scrape adds up all the files there: a second gateway writing into the same directory would make
    # both report the sum of their traffic. flock ends with the process, however it ends, so a restarted
    # gateway (a container restarted in the same pod) gets the directory back.
    fd = os.open(os.path.join(path, _DIR_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _held_dirs.append(fd)
    return True


_LIVE_GAUGE_FILE: Final = re.compile(r"gauge_live[a-z]+_(\d+)\.db")


def _live_gauge_pid(name: str) -> int | None:
    match = _LIVE_GAUGE_FILE.fullmatch(name)
    return int(match.group(1)) if match is not None else None


def _remove_files(files: Iterable[str]) -> None:
    for file in files:
        # Another scrape (a second Prometheus, another worker's /metrics) or the exit hook may reap the same
        # dead worker at the same time; prometheus-client's mark_process_dead then failed that scrape.
        with contextlib.suppress(FileNotFoundError):
            os.remove(file)


def reap_dead_workers(path: str) -> list[int]:
    """Drop the live gauges of every worker whose process is gone from `path`; return their pids."""
    # uvicorn's supervisor replaces a crashed worker without any child-exit hook, so a dead worker's
    # livemax/livesum files (the circuit breaker state) would otherwise be aggregated forever.
    dead: dict[int, list[str]] = {}
    alive: set[int] = set()
    with os.scandir(path) as entries:
        for entry in entries:
            pid = _live_gauge_pid(entry.name)
            if pid is None or pid in alive:
                continue
            if pid in dead or not _process_exists(pid):
                dead.setdefault(pid, []).append(entry.path)
            else:
                alive.add(pid)
    for files in dead.values():
        _remove_files(files)
    return sorted(dead)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class _ReapingCollector(multiprocess.MultiProcessCollector):
    """Aggregate every worker's metric files, first dropping the live gauges of workers that are gone."""

    def __init__(self, registry: CollectorRegistry, path: str) -> None:
        super().__init__(registry, path=path)  # type: ignore[no-untyped-call]
        self._reap_path = path

    def collect(self) -> Iterable[Metric]:
        """Reap dead workers' live gauges, then collect the files that remain."""
        reap_dead_workers(self._reap_path)
        collected: Iterable[Metric] = super().collect()  # type: ignore[no-untyped-call]
        return collected


# A scrape reads one short request: a connection idle this long is dropped (Prometheus's scrape timeout is
# at most its interval, 10 s by default), and no more connections than this are served at once. Each holds a
# thread, in the serving process itself when there is one worker.
METRICS_IDLE_TIMEOUT_SECONDS: Final = 10.0
METRICS_MAX_CONNECTIONS: Final = 16


class _MetricsRequestHandler(WSGIRequestHandler):
    """Answer one scrape, without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing: scrapes are routine, and the access log is the app's."""


class _MetricsHTTPServer(ThreadingWSGIServer):
    """prometheus-client's threaded server, with a bounded number of connections and quiet socket errors."""

    def __init__(
        self,
        address: tuple[str, int],
        family: socket.AddressFamily,
        idle_timeout: float,
        max_connections: int,
    ) -> None:
        """Bind `address` in `family`; drop connections idle `idle_timeout` s, serve `max_connections` at once."""
        self.address_family = family
        self._slots = threading.BoundedSemaphore(max_connections)
        # The handler applies its class's `timeout` to every socket read and write.
        handler = type("_TimedMetricsRequestHandler", (_MetricsRequestHandler,), {"timeout": idle_timeout})
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve the connection in its own thread, or close it at once when every slot is taken."""
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve one connection, then free its slot."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Ignore a client that went silent or away; log anything else as JSON, not as text on stderr."""
        if not isinstance(sys.exc_info()[1], OSError):
            logging.getLogger("service.metrics").exception("metrics request failed")


@dataclass(frozen=True)
class MetricsServer:
    """A running metrics listener on its own port."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """Return the port the listener is bound to."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop the listener and wait for its thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics_port(
    host: str,
    port: int,
    *,
    process_metrics: bool = False,
    idle_timeout: float = METRICS_IDLE_TIMEOUT_SECONDS,
    max_connections: int = METRICS_MAX_CONNECTIONS,
) -> MetricsServer:
    """Serve every worker's metrics on `host:port` from a thread; `process_metrics` adds this process's own."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        # The app's registry lives in the workers; only the shared directory can be read from here.
        raise RuntimeError(f"a separate metrics port needs {MULTIPROC_ENV} to be set")
    registry = CollectorRegistry()
    _ReapingCollector(registry, path)
    if process_metrics:
        # With one worker the listener runs in the serving process itself: its memory, CPU and file
        # descriptors are the server's, which the multiprocess files cannot carry.
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    # prometheus-client's start_http_server gave every connection a thread with no socket timeout: a client
    # that connected and sent nothing held one for ever, and any number of them could be opened.
    family, _, _, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    server = _MetricsHTTPServer((str(sockaddr[0]), port), family, idle_timeout, max_connections)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-listener", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


def metrics_endpoint(metrics: Metrics) -> Callable[[Request], Awaitable[Response]]:
    """Return a Starlette endpoint serving `metrics` in the Prometheus text format."""

    async def endpoint(request: Request) -> Response:
        # Aggregating many workers' files is disk I/O: keep it off the event loop.
        if metrics.multiprocess_dir is not None:
            body, content_type = await run_in_threadpool(metrics.render)
        else:
            body, content_type = metrics.render()
        return Response(body, headers={"Content-Type": content_type, "Cache-Control": "no-store"})

    return endpoint


# ---------------------------------------------------------------------------------------------- logging

_MASK: Final = "[REDACTED]"


def _mask_basic_credentials(match: re.Match[str]) -> str:
    # RFC 7617 credentials are base64 of `user-id:password`, and the colon is mandatory: a token that does
    # not decode to one is an ordinary word ("basic auth", "Basic checks") and stays readable.
    # ValueError covers binascii.Error and the non-ASCII letters (?i) lets in (U+017F, U+212A).
    try:
        decoded = base64.b64decode(match.group(2), validate=True)
    except ValueError:
        return match.group(0)
    return match.group(1) + _MASK if b":" in decoded else match.group(0)


_SECRET_PATTERNS: Final[tuple[tuple[re.Pattern[str], str | Callable[[re.Match[str]], str]], ...]] = (
    # JWS (3 parts) and JWE (5 parts) compact serialisations.
    (re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*){0,2}"), _MASK),
    # `xi-api-key: v`, `"xi-api-key": "v"`, `xi_api_key=v`, a header pair `('xi-api-key', 'v')`, and the
    # same inside JSON-escaped text (`\"xi-api-key\": \"v\"`).
    (
        re.compile(r"""(?i)(xi[-_]api[-_]key\\?["']?\s*[:=,]\s*(?:b?\\?["'])?)[^\s"',;&}\])\\]+"""),
        r"\g<1>" + _MASK,
    ),
    (re.compile(r"(?i)(conversation_signature=)[^\s&\"'#]+"), r"\g<1>" + _MASK),
    (re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+"), r"\g<1>" + _MASK),
    # `Basic <base64>` credentials (a Proxy-Authorization or Authorization value), whatever the header's name.
    (re.compile(r"(?i)(\bbasic\s+)([A-Za-z0-9+/]{4,}={0,2})(?![A-Za-z0-9+/=])"), _mask_basic_credentials),
    # ElevenLabs API keys.
    (re.compile(r"\bsk_[A-Fa-f0-9]{32,}\b"), _MASK),
)


# Literal values masked wherever they appear, whatever surrounds them (`mask_known_secret`).
_known_secrets: list[str] = []
_MIN_KNOWN_SECRET_CHARS: Final = 8


def mask_known_secret(value: str) -> None:
    """Mask `value` literally in every log line from now on (the configured API key, a proxy password)."""
    # Patterns catch secrets by their shape or label; the configured values themselves are known, so they
    # are masked even where neither shows (an exception quoting the key bare, say).
    if len(value) >= _MIN_KNOWN_SECRET_CHARS and value not in _known_secrets:
        _known_secrets.append(value)


def _may_hold_secret(text: str) -> bool:
    """Return False only when `mask_secrets` would leave `text` unchanged (a cheap test, no regex)."""
    for secret in _known_secrets:
        if secret in text:
            return True
    # Every pattern needs one of these substrings, ignoring ASCII case. Only for ASCII text: (?i) also
    # folds a few non-ASCII letters (e.g. U+017F) onto ASCII.
    if not text.isascii():
        return True
    lowered = text.lower()
    return (
        "eyj" in lowered
        or "api" in lowered
        or "bearer" in lowered
        or "basic" in lowered
        or "sk_" in lowered
        or "conversation_signature=" in lowered
    )


def mask_secrets(text: str) -> str:
    """Replace known secrets, JWTs, xi-api-key values, bearer and basic credentials and signatures in `text`."""
    # Fast path: most log lines hold nothing secret-looking.
    if not _may_hold_secret(text):
        return text
    for secret in _known_secrets:
        if secret in text:
            text = text.replace(secret, _MASK)
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_RESERVED_ATTRS: Final = frozenset(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured duplicate of msg
}


class SecretMaskFilter(logging.Filter):
    """Mask secret-looking values in a record's message, arguments and string extras (defence in depth)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place with secrets masked; never drop it."""
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # A broken format string: logging reports it with the raw parts, so mask those instead.
            if isinstance(record.msg, str):
                record.msg = mask_secrets(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(mask_secrets(a) if isinstance(a, str) else a for a in record.args)
            message = None
        strings = {
            key: value
            for key, value in record.__dict__.items()
            if key not in _RESERVED_ATTRS and isinstance(value, str)
        }
        # One cheap test of all the texts at once: whatever any of them would need masked shows in their join.
        if _may_hold_secret("\n".join([message or "", *strings.values()])):
            if message is not None:
                message = mask_secrets(message)
            for key, value in strings.items():
                setattr(record, key, mask_secrets(value))
        if message is not None:
            record.msg = message
            record.args = None
        return True


class _RequestIdFilter(logging.Filter):
    """Stamp records logged while a request is being handled with its id."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _request_id.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


# Built once (json.dumps with any option builds a new encoder per call, ~9 k instructions of a line's ~150 k).
_encode_line: Final = compact_encoder(str, allow_nan=True)
# (whole second, its ISO 8601 text): log lines of one second share the costly part of their timestamp.
_second_text: tuple[int, str] = (-1, "")


def _utc_timestamp(created: float) -> str:
    """Return `created` as ISO 8601 UTC with milliseconds (2026-11-24T06:04:39.478Z)."""
    global _second_text
    second = math.floor(created)
    # Rounded to the microsecond first, as datetime.fromtimestamp does, then cut to milliseconds.
    micro = round((created - second) * 1_000_000)
    if micro == 1_000_000:
        second, micro = second + 1, 0
    cached_second, text = _second_text
    if second != cached_second:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        # One tuple assignment: a thread reading it sees the old pair or the new one, never half of each.
        _second_text = (second, text)
    return f"{text}.{micro // 1000:03d}Z"


class JsonFormatter(logging.Formatter):
    """Format records as one JSON object per line: ts, level, logger, msg and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as a single JSON line, secrets masked."""
        payload: dict[str, Any] = {
            "ts": _utc_timestamp(record.created),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED_ATTRS:
                payload.setdefault(key, value)
        # Exception and stack text are not covered by the filter's message pass: masked here before JSON
        # escaping (a quoted key inside them would read \"xi-api-key\" after it), then the whole line again.
        if record.exc_info:
            payload["exc"] = mask_secrets(self.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = mask_secrets(self.formatStack(record.stack_info))
        try:
            line = plain_json(payload).decode()
        except NotPlainJson:  # e.g. a field of a type orjson leaves out: the C encoder calls str() on it
            line = "".join(_encode_line(payload, 0))
        return mask_secrets(line)


class _StderrHandler(logging.Handler):
    """Write to whatever sys.stderr is at emit time (so redirection after configuration still works)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


_HANDLER_MARK: Final = "_convai_gateway_handler"


def configure_logging(level: str) -> None:
    """Send all logs to stderr as JSON lines with secrets masked; calling it again replaces the setup."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()
    handler = _StderrHandler()
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(SecretMaskFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    # The JSON lines carry none of these record fields; the logging HOWTO's "Optimization" switches stop
    # every record from walking the stack for its caller and looking up thread and process names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # uvicorn's own access log prints raw paths with query strings; ours replaces it. Its other loggers
    # go through the JSON handler instead of their own plain-text ones.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # httpx logs every request URL at INFO; the gateway's own upstream metrics and logs cover that.
    logging.getLogger("httpx").setLevel(max(numeric, logging.WARNING))
    logging.getLogger("httpcore").setLevel(max(numeric, logging.WARNING))
    # Audit events are kept whatever LOG_LEVEL says.
    logging.getLogger(AUDIT_LOGGER).setLevel(logging.INFO)


def _safe_extra(fields: Mapping[str, Any]) -> dict[str, Any]:
    # LogRecord refuses extra keys that shadow its own attributes; keep them under a suffixed name.
    return {(f"{key}_" if key in _RESERVED_ATTRS else key): value for key, value in fields.items()}


# Looked up once: getLogger takes logging's module lock on every call, and a logger lives as long as the process.
_audit_logger: Final = logging.getLogger(AUDIT_LOGGER)


def audit(event: str, **fields: Any) -> None:
    """Write one audit event (session_minted, token_minted, conversation_deleted, feedback_sent, act_as)."""
    _audit_logger.info(event, extra=_safe_extra({"event": event, **fields}))


def user_hash(user_id: str) -> str:
    """Return a short stable hash of a user id for logs (16 hex characters of SHA-256)."""
    return hashlib.sha256(b"convai-gateway/user\x00" + user_id.encode("utf-8")).hexdigest()[:16]


# The bits uuid.uuid4() fixes in its 128-bit value: version 4 (bits 76-79) and the RFC 4122 variant (bits 62-63).
_UUID4_CLEAR: Final = ~(0xF000 << 64 | 0xC000 << 48)
_UUID4_SET: Final = 0x4000 << 64 | 0x8000 << 48


def request_id_for(offered: str | None) -> str:
    """Return `offered` when it is a valid request id (1-64 of A-Z a-z 0-9 . _ -), else a fresh one."""
    if offered is not None and _REQUEST_ID_RE.fullmatch(offered):
        return offered
    # uuid.uuid4().hex, without building the UUID object its validation costs (~9 k instructions of ~16 k).
    return f"{int.from_bytes(os.urandom(16)) & _UUID4_CLEAR | _UUID4_SET:032x}"


def record_refused_request(
    metrics: Metrics | None,
    *,
    method: str,
    status: int,
    request_id: str,
    seconds: float | None,
    client_ip: str | None,
) -> None:
    """Count a request refused below the app and write its access-log line, shaped like every request's."""
    if metrics is not None:
        metrics.count_refused_request(method, status)
    fields: dict[str, Any] = {
        "method": _method_label(method),
        "route": UNMATCHED_ROUTE,
        "status": status,
    }
    if seconds is not None:
        fields["duration_ms"] = round(max(0.0, seconds) * 1000, 3)
    # No user: no request reached authentication. The client is the socket peer: resolving it through
    # TRUSTED_PROXIES would trust X-Forwarded-For lines of a header block that was cut short or never ended.
    fields |= {"request_id": request_id, "user": None, "client_ip": client_ip}
    logging.getLogger(ACCESS_LOGGER).info("request", extra=fields)


def current_request_id() -> str | None:
    """Return the id of the request being handled in this context, if any."""
    return _request_id.get()


# ---------------------------------------------------------------------------------------------- middleware


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    if route is None:
        # Answered before the router ran (401, 403 and auth-failure 429 from the authentication middleware,
        # a 413 on Content-Length): the route is the one the path would have reached, so auth failures stay
        # visible per route instead of mixing with unknown paths.
        route = next(iter(routes_matching_path(scope)), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else "unmatched"


def _client_ip(scope: Scope, state: Mapping[str, Any]) -> str | None:
    # A proxy-aware client IP, when the rate limiter has resolved one, beats the socket peer.
    resolved = state.get("client_ip")
    if isinstance(resolved, str):
        return resolved
    client = scope.get("client")
    return str(client[0]) if client else None


def mark_client_gone(scope: Mapping[str, Any]) -> None:
    """Record in a request's scope state that its client left before the response ended."""
    state = scope.get("state")
    if isinstance(state, dict):
        state[CLIENT_GONE] = True


def _trace_id(traceparent: bytes) -> str | None:
    """Return the trace id of a valid W3C version-00 `traceparent` header value, else None."""
    match = _TRACEPARENT_RE.fullmatch(traceparent)
    if match is None or match.group(1) == _ZERO_TRACE_ID or match.group(2) == _ZERO_PARENT_ID:
        return None
    return match.group(1).decode("ascii")


class RequestContextMiddleware:
    """Give every HTTP request an id, then record its metrics and write one access-log line."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        *,
        trusted_proxies: tuple[IPNetwork, ...] = (),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """Wrap `app`; `trusted_proxies` resolve the client IP, `clock` measures durations (monotonic seconds)."""
        self.app = app
        self.metrics = metrics
        self.trusted_proxies = trusted_proxies
        self.clock = clock
        self.logger = logging.getLogger(ACCESS_LOGGER)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI connection."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = self.clock()
        # One pass over the raw headers for both (ASGI servers give lower-case names): the first of each wins,
        # as Headers.get would, except that a second traceparent makes it ambiguous and ignored.
        offered: bytes | None = None
        traceparent: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                if offered is None:
                    offered = value
            elif name == b"traceparent":
                traceparent = value if traceparent is None else b""
        request_id = request_id_for(offered.decode("latin-1") if offered is not None else None)
        trace_id = _trace_id(traceparent) if traceparent is not None else None
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # Resolved once here so the access log, audit lines and the auth-failure limit agree on the client.
        state["client_ip"] = client_ip(scope, self.trusted_proxies)
        token = _request_id.set(request_id)
        raw_id = request_id.encode("latin-1")

        status: int | None = None
        ended: float | None = None
        disconnected = False
        undelivered = False  # the client had left before the response started

        async def receive_wrapper() -> Message:
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        async def send_wrapper(message: Message) -> None:
            nonlocal status, ended, disconnected, undelivered
            if message["type"] == "http.response.start":
                status = int(message["status"])
                undelivered = CLIENT_GONE in state
                # Appended raw: the id header is the gateway's alone, no route sets it.
                message = {**message, "headers": [*message.get("headers", ()), (_REQUEST_ID_RAW, raw_id)]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = self.clock()
            try:
                await send(message)
            except OSError:
                disconnected = True
                raise

        try:
            await self.app(scope, receive_wrapper, send_wrapper)
        finally:
            finished = ended if ended is not None else self.clock()
            if CLIENT_GONE in state:
                disconnected = True
            if status is None:
                # No response started: either the app failed (the server answers 500) or the client left (499).
                final_status = 499 if disconnected else 500
            else:
                # A response started after the client left reached no one (uvicorn drops it without an error).
                final_status = 499 if undelivered else status
            # Started but never finished (an upstream stream that failed mid-way, a stalled listener cut off, a
            # client gone): the status alone would read like a complete response.
            incomplete = status is not None and ended is None
            self._record(
                scope, state, request_id, trace_id, final_status, finished - started, disconnected, incomplete
            )
            _request_id.reset(token)

    def _record(
        self,
        scope: Scope,
        state: Mapping[str, Any],
        request_id: str,
        trace_id: str | None,
        status: int,
        seconds: float,
        disconnected: bool,
        incomplete: bool,
    ) -> None:
        route = _route_template(scope)
        method = str(scope.get("method", ""))
        self.metrics.observe_request(method, route, status, seconds)
        principal = state.get("principal")
        user_id = getattr(principal, "user_id", None)
        fields: dict[str, Any] = {
            "method": _method_label(method),
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "request_id": request_id,
            "user": user_hash(user_id) if isinstance(user_id, str) else None,
            "client_ip": _client_ip(scope, state),
        }
        if trace_id is not None:
            fields["trace_id"] = trace_id
        if disconnected:
            fields["client_disconnected"] = True
        if incomplete:
            fields["incomplete"] = True
        self.logger.info("request", extra=fields)
