"""Shared parts of the reliability tests: served gateways, raw HTTP, concurrent traffic and ledger checks.

Everything runs on loopback against real parts: the gateway served by uvicorn (or driven through
httpx.ASGITransport), the session's upstream emulator and a real redis-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import uvicorn

from service.app import create_app
from service.dev_tokens import mint_token
from service.ledger import LedgerEntry, decode_entry, encode_entry, ledger_key
from service.settings import Settings, load_settings
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import TEST_JWT_SECRET, LogCapture, capture_logs, gateway_env
from tests.support.servers import ServedApp, serve

SIGNED_URL = "/v1/convai/conversation/get-signed-url"
TOKEN = "/v1/convai/conversation/token"
CONVERSATIONS = "/v1/convai/conversations"
AGENT = "agent_demo"
ALL_SCOPES = "convai:session convai:history convai:delete"
PROBLEM_TYPE = "application/problem+json"

# The test client, the emulator and the gateway share one process (and its GIL): an event-loop stall of
# the harness must not pass for a Redis timeout where a test is not about Redis timeouts.
HARNESS_REDIS_TIMEOUT_MS = "500"

# Limits no test traffic reaches: fault tests count outcomes, not 429s.
GENEROUS_LIMITS: Mapping[str, tuple[int, int]] = {
    "user-session": (1_000_000, 1_000_000),
    "user-history": (1_000_000, 1_000_000),
    "user-feedback": (1_000_000, 1_000_000),
    "user-delete": (1_000_000, 1_000_000),
    "agent-session": (1_000_000, 1_000_000),
    "ip-auth-failure": (1_000_000, 1_000_000),
}


def scale() -> float:
    """Return RELIABILITY_SCALE (default 1): the factor by which the long tests are enlarged."""
    raw = os.environ.get("RELIABILITY_SCALE", "1")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"RELIABILITY_SCALE must be a number, not {raw!r}") from None
    if value < 1:
        raise ValueError("RELIABILITY_SCALE enlarges the bounded default run; it must be >= 1")
    return value


def scaled(amount: float) -> int:
    """Return `amount` multiplied by RELIABILITY_SCALE, at least 1."""
    return max(1, round(amount * scale()))


def write_config(directory: Path, limits: Mapping[str, tuple[int, int]], period_seconds: int = 60) -> str:
    """Write a GATEWAY_CONFIG TOML file with `{policy: (limit, burst)}` and return its path."""
    lines = []
    for name, (limit, burst) in limits.items():
        lines += [
            f"[rate_limits.{name}]",
            f"limit = {limit}",
            f"period_seconds = {period_seconds}",
            f"burst = {burst}",
            "",
        ]
    path = directory / "gateway.toml"
    path.write_text("\n".join(lines), encoding="utf-8")
    return str(path)


def bearer(sub: str, *, scopes: str | None = ALL_SCOPES, **claims: Any) -> dict[str, str]:
    """Return an Authorization header with a real HS256 token for `sub` accepted by test gateways."""
    return {"Authorization": f"Bearer {mint_token(TEST_JWT_SECRET, sub, scopes=scopes, **claims)}"}


# ------------------------------------------------------------------------------------------ served app


@dataclass
class ServedGateway:
    """A gateway served by uvicorn on loopback, with its settings and captured logs."""

    url: str
    port: int
    settings: Settings
    log_capture: LogCapture = field(repr=False)

    @property
    def logs(self) -> list[str]:
        """Return every log line captured so far (all loggers, DEBUG and up)."""
        return self.log_capture.lines

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """Return an httpx client for this gateway (the caller closes it)."""
        kwargs.setdefault("timeout", 15.0)
        # Idle connections are dropped before the server's 5 s keep-alive closes them: with both at 5 s (httpx's
        # default), a request sent on a connection the server is closing fails with RemoteProtocolError,
        # seen once in the load test on a machine starved of CPU.
        kwargs.setdefault(
            "limits",
            httpx.Limits(max_connections=64, max_keepalive_connections=64, keepalive_expiry=2.0),
        )
        return httpx.AsyncClient(base_url=self.url, **kwargs)


@contextlib.contextmanager
def served_gateway(
    emulator_url: str,
    redis_url: str | None,
    env: Mapping[str, str] | None = None,
    *,
    capture: bool = True,
    **more_env: str,
) -> Iterator[ServedGateway]:
    """Serve a real gateway (lifespan included) with uvicorn on a free loopback port.

    The environment is the test default plus `env` and `more_env` ("" removes a variable). With `capture`
    every log record of every logger is kept at DEBUG (for leak checks); a memory measurement turns it
    off, as the capture itself grows with every request.
    """
    overrides = {**(env or {}), **more_env}
    settings = load_settings(gateway_env(emulator_url, EMULATOR_API_KEY, redis_url, **overrides))
    with contextlib.ExitStack() as stack:
        captured = stack.enter_context(capture_logs()) if capture else LogCapture()
        served = stack.enter_context(serve(create_app(settings)))
        yield ServedGateway(served.url, served.port, settings, captured)


class PortServedApp(ServedApp):
    """A ServedApp on a chosen port, so a server can go down and come back at the same address."""

    def __init__(self, app: Any, port: int) -> None:
        """Bind `port` on loopback (SO_REUSEADDR, so it can be bound again right after a stop)."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.port = port
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


# -------------------------------------------------------------------------------------------- raw HTTP


@dataclass(frozen=True)
class RawResponse:
    """A response read off a raw socket."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def header(self, name: str) -> str | None:
        """Return the first value of header `name` (case-insensitive), or None."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), None)

    def json(self) -> Any:
        """Parse the body as JSON."""
        return json.loads(self.body)


def parse_raw_response(raw: bytes) -> RawResponse:
    """Parse one HTTP/1.x response (Content-Length, chunked or until close)."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"incomplete response head: {raw[:200]!r}")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = tuple(
        (name.strip(), value.strip()) for name, _, value in (line.partition(":") for line in lines[1:])
    )
    response = RawResponse(status, headers, rest)
    if (response.header("transfer-encoding") or "").lower() == "chunked":
        body, data = bytearray(), rest
        while data:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                break
            body += data[:size]
            data = data[size + 2 :]
        return RawResponse(status, headers, bytes(body))
    length = response.header("content-length")
    return RawResponse(status, headers, rest[: int(length)] if length is not None else rest)


async def raw_exchange(port: int, request: bytes, *, timeout: float = 10.0) -> RawResponse:
    """Send raw bytes to 127.0.0.1:`port` and read the response until the server closes the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return parse_raw_response(raw)


def raw_request(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    version: str = "HTTP/1.1",
    host: bool = True,
) -> bytes:
    """Build request bytes exactly as given (no validation, no normalisation), closing the connection."""
    lines = [f"{method} {target} {version}"]
    if host:
        lines.append("Host: 127.0.0.1")
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name.lower() in ("content-length", "transfer-encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# --------------------------------------------------------------------------------------------- traffic


@dataclass(frozen=True)
class Outcome:
    """One request of a traffic run: what was asked, by whom, and what came back."""

    op: str
    user: str
    status: int  # 0 when the request failed below HTTP (connection refused or reset)
    body: Any
    content_type: str
    headers: Mapping[str, str]
    started: float
    ended: float
    error: str | None = None


Op = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


def _parse(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None


class Traffic:
    """Concurrent clients cycling through users and operations until stopped; records every outcome."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        users: Sequence[str],
        ops: Mapping[str, Op],
        *,
        concurrency: int = 8,
        limit: int | None = None,
        keep_body: Callable[[str, int], bool] = lambda op, status: True,
    ) -> None:
        """Run `ops` for `users` with `concurrency` workers; stop by itself after `limit` requests.

        `keep_body(op, status)` says which bodies and headers to keep (a long run keeps only what it checks).
        """
        self.client = client
        self.keep_body = keep_body
        self.users = list(users)
        self.ops = list(ops.items())
        self.concurrency = concurrency
        self.limit = limit
        self.outcomes: list[Outcome] = []
        self.in_flight = 0
        self._issued = 0
        self._stop = asyncio.Event()
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        """Start the workers."""
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.concurrency)]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Stop the workers and wait for the requests in flight."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_done(self) -> None:
        """Wait until the workers have issued `limit` requests and every answer is in."""
        await asyncio.gather(*self._tasks)

    async def _worker(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            if self.limit is not None and self._issued >= self.limit:
                return
            self._issued += 1
            user = self.users[turn % len(self.users)]
            name, op = self.ops[(turn // len(self.users) + index) % len(self.ops)]
            turn += self.concurrency
            await self._one(name, op, user)

    async def _one(self, name: str, op: Op, user: str) -> None:
        started = time.monotonic()
        self.in_flight += 1
        try:
            response = await op(self.client, user)
        except httpx.TransportError as exc:
            outcome = Outcome(name, user, 0, None, "", {}, started, time.monotonic(), type(exc).__name__)
        else:
            keep = self.keep_body(name, response.status_code)
            outcome = Outcome(
                name,
                user,
                response.status_code,
                _parse(response) if keep else None,
                response.headers.get("content-type", ""),
                dict(response.headers) if keep else {},
                started,
                time.monotonic(),
            )
        finally:
            self.in_flight -= 1
        async with self._changed:
            self.outcomes.append(outcome)
            self._changed.notify_all()

    async def until(
        self, predicate: Callable[[Outcome], bool], *, count: int = 1, timeout: float = 20.0
    ) -> Outcome:
        """Wait until `count` outcomes recorded from now on satisfy `predicate`; return the last of them."""
        seen = len(self.outcomes)
        matched: list[Outcome] = []

        def reached() -> bool:
            nonlocal seen
            matched.extend(o for o in self.outcomes[seen:] if predicate(o))
            seen = len(self.outcomes)
            return len(matched) >= count

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(reached), timeout)
        return matched[count - 1]

    async def progress(self, count: int, *, timeout: float = 20.0) -> None:
        """Wait until `count` more requests have completed."""
        await self.until(lambda _: True, count=count, timeout=timeout)

    def by_status(self) -> dict[int, int]:
        """Count this run's outcomes per status (0 = transport error)."""
        return self.by_status_of(self.outcomes)

    @staticmethod
    def by_status_of(outcomes: Iterable[Outcome]) -> dict[int, int]:
        """Count outcomes per status (0 = transport error)."""
        counts: dict[int, int] = {}
        for outcome in outcomes:
            counts[outcome.status] = counts.get(outcome.status, 0) + 1
        return dict(sorted(counts.items()))


def standard_ops(
    headers: Mapping[str, Mapping[str, str]],
    owned: Mapping[str, Sequence[str]] | None = None,
    foreign: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Op]:
    """Return the usual mix: mints, WebRTC tokens, lists, own and foreign details, health."""
    owned = owned or {}
    foreign = foreign or {}
    counters: dict[str, int] = {}

    def pick(table: Mapping[str, Sequence[str]], user: str, kind: str) -> str | None:
        ids = table.get(user) or ()
        if not ids:
            return None
        counters[kind] = counters.get(kind, 0) + 1
        return ids[counters[kind] % len(ids)]

    async def mint(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(SIGNED_URL, params={"agent_id": AGENT}, headers=headers[user])

    async def webrtc(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(TOKEN, params={"agent_id": AGENT}, headers=headers[user])

    async def listing(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get(CONVERSATIONS, params={"page_size": "5"}, headers=headers[user])

    async def details(client: httpx.AsyncClient, user: str) -> httpx.Response:
        conversation = pick(owned, user, "own") or "conv_missing"
        return await client.get(f"{CONVERSATIONS}/{conversation}", headers=headers[user])

    async def snoop(client: httpx.AsyncClient, user: str) -> httpx.Response:
        conversation = pick(foreign, user, "foreign") or "conv_missing"
        return await client.get(f"{CONVERSATIONS}/{conversation}", headers=headers[user])

    async def health(client: httpx.AsyncClient, user: str) -> httpx.Response:
        return await client.get("/healthz")

    return {
        "mint": mint,
        "token": webrtc,
        "list": listing,
        "details": details,
        "foreign": snoop,
        "health": health,
    }


# ---------------------------------------------------------------------------------------- assertions


def problem_violations(outcomes: Iterable[Outcome], allowed: Mapping[int, set[str]]) -> list[str]:
    """Describe every outcome that is a 5xx/transport error outside `allowed` or an error without a problem body.

    `allowed` maps an error status to the problem codes acceptable for it (e.g. {503: {"ledger_unavailable"}}).
    """
    problems = []
    for o in outcomes:
        if o.status < 400 and o.status != 0:
            continue
        where = f"{o.op} by {o.user}: {o.status} {o.error or ''}"
        if o.status == 0 or o.status == 500:
            problems.append(f"{where} (never acceptable)")
            continue
        if not o.content_type.startswith(PROBLEM_TYPE) or not isinstance(o.body, dict):
            problems.append(f"{where}: not a problem+json body")
            continue
        if o.body.get("status") != o.status or not o.body.get("code"):
            problems.append(f"{where}: malformed problem {o.body}")
            continue
        if o.status not in allowed or o.body["code"] not in allowed[o.status]:
            problems.append(f"{where}: unexpected {o.body['code']}")
        if o.status == 429 and "retry-after" not in o.headers:
            problems.append(f"{where}: 429 without Retry-After")
    return problems


def minted(outcomes: Iterable[Outcome]) -> list[Outcome]:
    """Return the successful signed-URL mints (the responses that handed out a signed URL)."""
    return [o for o in outcomes if o.op == "mint" and o.status == 200]


def lost_ledger_entries(client: redis.Redis, outcomes: Iterable[Outcome]) -> list[str]:
    """Return every handed-out conversation whose ledger entry is missing or names another user or agent."""
    lost = []
    for outcome in minted(outcomes):
        conversation_id = outcome.body["conversation_id"]
        raw = client.get(ledger_key(conversation_id))
        if raw is None:
            lost.append(f"{conversation_id} (minted by {outcome.user}): no ledger entry")
            continue
        entry = decode_entry(raw)
        if entry.user_id != outcome.user or entry.agent_id != AGENT:
            lost.append(f"{conversation_id}: ledger says {entry}, minted by {outcome.user}")
    return lost


async def seed_conversation(
    emulator: httpx.AsyncClient, conversation_id: str, user_id: str | None, **spec: Any
) -> None:
    """Create a conversation in the emulator with the given upstream user_id."""
    body = {"conversation_id": conversation_id, "user_id": user_id, "agent_id": AGENT, **spec}
    response = await emulator.post("/_emulator/conversations", json=body)
    response.raise_for_status()


async def add_fault(emulator: httpx.AsyncClient, **fault: Any) -> None:
    """Queue an upstream fault in the emulator."""
    response = await emulator.post("/_emulator/faults", json=fault)
    response.raise_for_status()


async def seed_ownership(
    emulator_url: str, client: redis.Redis, users: Sequence[str]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Seed two conversations per user: one owned through the ledger, one through its upstream user_id.

    The ledger-owned one carries a spoofed upstream user_id naming the next user, who must never get it.
    Returns (owned, foreign): per user, conversations it owns and conversations it must never see.
    """
    owned: dict[str, list[str]] = {}
    count = len(users)
    async with httpx.AsyncClient(base_url=emulator_url) as emulator:
        for i, user in enumerate(users):
            by_ledger, by_user_id = f"conv_{user}_ledger", f"conv_{user}_userid"
            await seed_conversation(emulator, by_ledger, users[(i + 1) % count], audio_size_bytes=4096)
            client.set(ledger_key(by_ledger), encode_entry(LedgerEntry(user, AGENT, int(time.time()))))
            await seed_conversation(emulator, by_user_id, user, audio_size_bytes=4096)
            owned[user] = [by_ledger, by_user_id]
    foreign = {
        user: [f"conv_{users[(i - 1) % count]}_ledger", f"conv_{users[(i + 1) % count]}_userid"]
        for i, user in enumerate(users)
    }
    return owned, foreign


def isolation_violations(outcomes: Sequence[Outcome]) -> list[str]:
    """Describe any foreign conversation served, or any owned conversation denied as missing."""
    bad = [
        f"{o.user} got a foreign conversation: {o.status}"
        for o in outcomes
        if o.op == "foreign" and o.status == 200
    ]
    bad += [
        f"{o.user} was told its own conversation is missing"
        for o in outcomes
        if o.op == "details" and o.status == 404
    ]
    return bad


def rss_bytes() -> int:
    """Return this process's resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")
