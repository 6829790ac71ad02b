"""What the benchmark runs: the upstream stand-in, the reference proxies and the gateway, one process each.

Every Python process is uvicorn with the same settings (`UVICORN_SETTINGS`: one worker, uvloop, httptools,
no access log, loopback only); the gateway's httptools protocol is `serve`'s, which adds a request-header deadline. This module is also the entry point of those processes:

    python -m tests.perf.targets --role {standin,bare,naive,gateway} --port N [--upstream URL]

- `standin`: a minimal, fast upstream serving fixed, realistic payloads (built with the emulator's own
  sample model) for get-signed-url, the conversation list, one conversation's details and feedback. The
  full emulator keeps and scans every pending signed-URL session on each mint, so it slows down as a run
  goes on; a stand-in with constant cost per request keeps the comparison fair. nginx serves the same
  payloads when it is installed (`nginx_upstream_conf`): it costs the shared CPUs far less.
- `bare`: reference (a), a one-hop proxy written directly on aiohttp's `ClientSession` as a raw ASGI app:
  no auth, no limits, no logging; the fastest Python hop measured here.
- `naive`: reference (b), what a user would otherwise write (the ElevenLabs example style): Starlette
  routes, a new `httpx.AsyncClient` per request, no caching, no auth.
- `gateway`: the real gateway, `create_app(load_settings())` from the environment with JSON logging
  configured as `convai-gateway serve` does. `BENCH_GATEWAY_LEVERS` (comma-separated) switches one
  measured lever off: `httpx-transport` (httpx's own upstream transport instead of httpx-aiohttp),
  `no-token-cache` (verify every token's signature), `asyncio` (asyncio loop and h11 instead of uvloop
  and httptools), `workers=N` (uvicorn workers), `log-warning` (LOG_LEVEL=WARNING: no access log line),
  `no-redis-pipelining` (REDIS_PIPELINE_LIMIT=0: every Redis command alone), `no-header-deadline` (uvicorn's
  plain httptools protocol instead of `serve`'s `HeaderDeadlineProtocol`, which the gateway runs by default),
  `stock-redis-pool` (redis-py's own pool checkout and return instead of `QuickCheckoutPool`'s),
  `stdlib-json` (answers, log lines and ledger entries through CPython's C encoder instead of orjson),
  `split-head` (each response's head written on its own, as uvicorn does, instead of with the first body bytes),
  `stdlib-parse` (upstream's answers parsed by the stdlib's scanner alone, without msgspec in front).
  Ablations remove a whole component to attribute its cost: `no-logging`, `no-ratelimit`,
  `no-ledger-write`, `no-metrics`, `no-gc-freeze` (measurement only, never a configuration); `skeleton` removes the
  first four at once: what is left (uvicorn, Starlette, the middlewares, the cached JWT check, the upstream call
  through httpx) is the floor no feature work can go below; `before-perf-changes` puts
  back some of the slower code paths the benchmark's changes replaced (secret masking without its fast
  path, metric children looked up per call, one GET per listed conversation, upstream calls through
  AsyncClient.send), for a partial before/after in one run; a full one runs an earlier commit side by side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

API_KEY = "xi-bench-key-0123456789abcdef0123456789"
JWT_SECRET = "bench-secret-0123456789abcdef0123456789abcdef"
AGENT_ID = "agent_demo"
USER_ID = "bench-user"
FEEDBACK_CONVERSATION = "conv_bench0feedback000000000000"
LIST_PAGE_SIZE = 30

SIGNED_URL_PATH = "/v1/convai/conversation/get-signed-url"
LIST_PATH = "/v1/convai/conversations"
CONVERSATION_PATH = f"{LIST_PATH}/{FEEDBACK_CONVERSATION}"
FEEDBACK_PATH = f"{CONVERSATION_PATH}/feedback"

# The same for every Python process under test, so that only the application differs.
UVICORN_SETTINGS: Mapping[str, Any] = {
    "host": "127.0.0.1",
    "workers": 1,
    "loop": "uvloop",
    "http": "httptools",
    "ws": "none",
    "lifespan": "on",
    "access_log": False,
    "proxy_headers": False,
    "server_header": False,
    "timeout_keep_alive": 5,
    "log_level": "warning",
}
LEVERS = (
    "httpx-transport",
    "no-token-cache",
    "asyncio",
    "workers=2",
    "log-warning",
    "no-redis-pipelining",
    "no-header-deadline",
    "stock-redis-pool",
    "stdlib-json",
    "split-head",
    "stdlib-parse",
)
# The gateway runs under `serve`'s HTTP protocol (uvicorn's httptools plus a request-header deadline), so the
# figures are those of what ships; the references keep plain httptools.
GATEWAY_HTTP_PROTOCOL = "service.server_protocol:HeaderDeadlineProtocol"
# Not options: whole components removed, to attribute the per-request cost (`--levers` names them).
ABLATIONS = (
    "no-logging",
    "no-ratelimit",
    "no-ledger-write",
    "no-metrics",
    "no-gc-freeze",
    "skeleton",
    "before-perf-changes",
)
# The features the gateway's issue asks to have on; without them only the request path's frame is left.
SKELETON_REMOVES = ("no-logging", "no-ratelimit", "no-ledger-write", "no-metrics")


# --- upstream payloads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Payloads:
    """The upstream stand-in's fixed answers (JSON bytes), shaped like the real API's."""

    list_page: bytes
    details: bytes
    list_ids: tuple[str, ...]


def build_payloads(now: float | None = None) -> Payloads:
    """Build a full list page and one conversation's details for the bench user with the emulator's model."""
    from service.emulator.samples import build_conversation

    clock = time.time() if now is None else now
    rng = random.Random(8)
    ids = [f"conv_bench{index:04d}{'0' * 16}" for index in range(LIST_PAGE_SIZE)]
    rows = []
    for index, conversation_id in enumerate(ids):
        spec: dict[str, Any] = {"conversation_id": conversation_id, "user_id": USER_ID, "agent_id": AGENT_ID}
        spec["start_time_unix_secs"] = int(clock) - 600 * index
        conversation = build_conversation(spec, now=clock, new_id=lambda: "", rng=rng)
        rows.append(conversation.summary(include_summary=False))
    page = {"conversations": rows, "has_more": True, "next_cursor": "bench-cursor-page-2"}
    spec = {"conversation_id": FEEDBACK_CONVERSATION, "user_id": USER_ID, "agent_id": AGENT_ID}
    details = build_conversation(spec, now=clock, new_id=lambda: "", rng=rng).details()
    return Payloads(
        list_page=json.dumps(page, separators=(",", ":")).encode(),
        details=json.dumps(details, separators=(",", ":")).encode(),
        list_ids=tuple(ids),
    )


def signed_url_body(host: str, agent_id: str, token: str) -> bytes:
    """Return a get-signed-url answer whose conversation id is fresh (derived from `token`)."""
    conversation_id = f"conv_{token}"
    url = (
        f"ws://{host}/v1/convai/conversation?agent_id={agent_id}"
        f"&conversation_signature={token}&conversation_id={conversation_id}"
    )
    return json.dumps({"signed_url": url, "conversation_id": conversation_id}).encode()


# --- (asgi) the upstream stand-in ----------------------------------------------------------------------

Scope = dict[str, Any]


async def _read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        chunk: bytes = message.get("body", b"")
        body += chunk
        if not message.get("more_body", False):
            return body


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _answer(send: Any, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def standin_app(payloads: Payloads, api_key: str = API_KEY) -> Any:
    """Return the raw-ASGI upstream stand-in (used when nginx is not installed)."""
    key = api_key.encode()
    counter = iter(range(1 << 62))

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        await _read_body(receive)
        headers = dict(scope["headers"])
        if headers.get(b"xi-api-key") != key:
            await _answer(send, 401, b'{"detail":{"status":"invalid_api_key","message":"Invalid API key"}}')
            return
        path, method = scope["path"], scope["method"]
        if path == SIGNED_URL_PATH:
            host = headers.get(b"host", b"127.0.0.1").decode()
            token = f"{os.getpid():x}{next(counter):026x}"
            await _answer(send, 200, signed_url_body(host, AGENT_ID, token))
        elif path == LIST_PATH:
            await _answer(send, 200, payloads.list_page)
        elif path == CONVERSATION_PATH and method == "GET":
            await _answer(send, 200, payloads.details)
        elif path == FEEDBACK_PATH and method == "POST":
            await _answer(send, 200, b"{}")
        else:
            await _answer(send, 404, b'{"detail":{"status":"not_found"}}')

    return app


# --- (a) the bare one-hop proxy -------------------------------------------------------------------------


def bare_proxy_app(upstream_url: str, api_key: str = API_KEY) -> Any:
    """Return reference (a): a raw-ASGI one-hop proxy on one aiohttp ClientSession, nothing else."""
    import aiohttp
    from yarl import URL

    session: aiohttp.ClientSession | None = None

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            session = aiohttp.ClientSession(
                headers={"xi-api-key": api_key},
                connector=aiohttp.TCPConnector(limit=200),
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            try:
                await _lifespan(receive, send)
            finally:
                await session.close()
            return
        assert session is not None
        body = await _read_body(receive)
        query = scope["query_string"].decode("latin-1")
        target = URL(upstream_url + scope["path"] + (f"?{query}" if query else ""), encoded=True)
        headers = {"Content-Type": "application/json"} if body else None
        async with session.request(scope["method"], target, data=body or None, headers=headers) as upstream:
            payload = await upstream.read()
            content_type = upstream.headers.get("Content-Type", "application/json").encode("latin-1")
            await _answer(send, upstream.status, payload, content_type)

    return app


# --- (b) the naive implementation -----------------------------------------------------------------------


def naive_app(upstream_url: str, api_key: str = API_KEY) -> Any:
    """Return reference (b): Starlette, a new httpx client per request, no caching, no auth."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def relay(response: httpx.Response) -> JSONResponse:
        if response.status_code != 200:
            return JSONResponse({"error": "upstream failed"}, status_code=502)
        return JSONResponse(response.json())

    async def signed_url(request: Request) -> JSONResponse:
        agent_id = request.query_params.get("agent_id")
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{upstream_url}{SIGNED_URL_PATH}",
                params={"agent_id": agent_id, "include_conversation_id": "true"},
                headers={"xi-api-key": api_key},
            )
        return await relay(response)

    async def conversations(request: Request) -> JSONResponse:
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{upstream_url}{LIST_PATH}",
                params=dict(request.query_params),
                headers={"xi-api-key": api_key},
            )
        return await relay(response)

    async def feedback(request: Request) -> JSONResponse:
        body = await request.json()
        conversation_id = request.path_params["conversation_id"]
        async with httpx.AsyncClient() as client:
            response = await client.post(
                f"{upstream_url}{LIST_PATH}/{conversation_id}/feedback",
                json={"feedback": body.get("feedback")},
                headers={"xi-api-key": api_key},
            )
        return await relay(response)

    return Starlette(
        routes=[
            Route(SIGNED_URL_PATH, signed_url),
            Route(LIST_PATH, conversations),
            Route(LIST_PATH + "/{conversation_id}/feedback", feedback, methods=["POST"]),
        ]
    )


# --- the gateway -------------------------------------------------------------------------------------------


def gateway_environment(
    upstream_url: str, redis_url: str, config_path: Path, log_level: str
) -> dict[str, str]:
    """Return the gateway's environment: everything on, policy limits raised (see `write_gateway_config`)."""
    return {
        "ELEVENLABS_API_KEY": API_KEY,
        "ELEVENLABS_BASE_URL": upstream_url,
        "JWT_HS256_SECRET": JWT_SECRET,
        "ALLOWED_AGENT_IDS": f"{AGENT_ID},agent_other",
        "REDIS_URL": redis_url,
        "GATEWAY_CONFIG": str(config_path),
        "LOG_LEVEL": log_level,
    }


# A billion requests per second with the same burst: the benchmark measures the cost of a Redis-checked
# request, not rejections; the policies still run their full EVALSHA on every request.
RAISED_LIMIT = 1_000_000_000


def write_gateway_config(path: Path) -> None:
    """Write the GATEWAY_CONFIG TOML raising every rate-limit policy the benchmark hits."""
    lines = []
    for name in ("user-session", "agent-session", "user-history", "user-feedback"):
        lines += [
            f"[rate_limits.{name}]",
            f"limit = {RAISED_LIMIT}",
            "period_seconds = 1",
            f"burst = {RAISED_LIMIT}",
            "",
        ]
    path.write_text("\n".join(lines))


def gateway_factory() -> Any:
    """Build the gateway from the environment with JSON logging on (the uvicorn factory of `--role gateway`)."""
    from service.observability import configure_logging
    from service.settings import load_settings

    levers = expand_levers(_levers())
    if "httpx-transport" in levers:
        import service.app
        import service.upstream

        original = service.upstream.create_transport

        def httpx_transport(kind: Any = "httpx", **kwargs: Any) -> Any:
            return original("httpx", **kwargs)

        service.upstream.create_transport = httpx_transport
        vars(service.app)["create_transport"] = httpx_transport
    if "no-token-cache" in levers:
        import service.app
        from service.auth import Authenticator

        class Uncached(Authenticator):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, token_cache_size=0, **kwargs)

        vars(service.app)["Authenticator"] = Uncached
    if "stock-redis-pool" in levers:
        stock_redis_pool()
    if "stdlib-json" in levers:
        stdlib_json()
    if "split-head" in levers:
        split_head()
    if "stdlib-parse" in levers:
        stdlib_parse()
    _apply_ablations(levers)
    if "no-redis-pipelining" in levers:
        os.environ["REDIS_PIPELINE_LIMIT"] = "0"
    settings = load_settings()
    configure_logging(settings.log_level)
    if "no-logging" in levers:
        logging.disable(logging.CRITICAL)
    from service.app import create_app, freeze_startup_objects

    app = create_app(settings)
    if "no-gc-freeze" not in levers:
        freeze_startup_objects()  # as `serve` does (service.app.app_from_environment)
    return app


def stock_redis_pool() -> None:
    """Give the gateway's Redis pools redis-py's own checkout and return back (lock, records, event)."""
    from redis.asyncio.connection import ConnectionPool

    from service.redis_client import QuickCheckoutPool

    QuickCheckoutPool.get_connection = ConnectionPool.get_connection  # type: ignore[method-assign]
    QuickCheckoutPool.release = ConnectionPool.release  # type: ignore[method-assign]


def split_head() -> None:
    """Write each response's head as uvicorn does, on its own, before the body (serve's protocol joins them)."""
    from service import server_protocol

    def unchanged(transport: Any) -> Any:
        return transport

    vars(server_protocol)["HeadWithBodyTransport"] = unchanged


def stdlib_parse() -> None:
    """Parse upstream's answers with the stdlib's scanner alone, without msgspec in front."""
    from service import upstream

    vars(upstream)["parse_json"] = upstream.parse_json_with_stdlib


def plain_json_users() -> list[str]:
    """Return the gateway's modules that render JSON with `compact_json.plain_json` (each holds its own name)."""
    import sys

    import service.app  # noqa: F401  (imports every module a request runs)
    from service import compact_json

    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("service.")
        and module is not compact_json
        and vars(module).get("plain_json") is compact_json.plain_json
    )


def stdlib_json() -> None:
    """Send everything the gateway renders with orjson through its fallback, CPython's C encoder."""
    import importlib

    from service.compact_json import NotPlainJson

    def refuse(value: Any) -> bytes:
        raise NotPlainJson("the stdlib-json lever")

    for name in plain_json_users():
        vars(importlib.import_module(name))["plain_json"] = refuse


def _apply_ablations(levers: set[str]) -> None:
    """Remove whole components (not options a user has): to measure what each one costs per request."""
    if "no-ratelimit" in levers:
        import service.app
        from service.ratelimit import ALLOW_ALL, Decision

        class AllowAll:
            async def acquire(self, hits: Any) -> Decision:
                return ALLOW_ALL

            async def aclose(self) -> None:
                return None

        vars(service.app)["build_rate_limiter"] = lambda *args, **kwargs: AllowAll()
    if "no-ledger-write" in levers:
        from service.ledger import RedisLedger

        async def record(self: Any, conversation_id: str, entry: Any) -> None:
            return None

        RedisLedger.record = record  # type: ignore[method-assign]
    if "before-perf-changes" in levers:
        _restore_slow_paths()
    if "no-metrics" in levers:
        from service.observability import Metrics

        def nothing(self: Any, *args: Any) -> None:
            return None

        for name in ("observe_request", "observe_upstream", "observe_rate_limit", "ledger_write"):
            setattr(Metrics, name, nothing)


def _restore_slow_paths() -> None:
    """Put back the code paths the benchmark's performance changes replaced, for a side-by-side before/after."""
    import service.observability
    from service.ledger import RedisLedger, decode_entry, ledger_key
    from service.observability import _SECRET_PATTERNS, Metrics
    from service.upstream import UpstreamClient

    def mask_every_pattern(text: str) -> str:
        for pattern, replacement in _SECRET_PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def labels_every_time(self: Any, metric: Any, *labels: str) -> Any:
        return metric.labels(*labels)

    async def pipelined_gets(self: Any, conversation_ids: Any) -> Any:
        unique = list(dict.fromkeys(conversation_ids))
        if not unique:
            return {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for conversation_id in unique:
                pipe.get(ledger_key(conversation_id))
            values = await pipe.execute()
        return {cid: decode_entry(raw) for cid, raw in zip(unique, values, strict=True) if raw is not None}

    async def through_client_send(self: Any, request: Any, *, stream: bool) -> Any:
        return await self._http.send(request, stream=stream)

    vars(service.observability)["mask_secrets"] = mask_every_pattern
    UpstreamClient._dispatch = through_client_send  # type: ignore[method-assign]
    Metrics._child = labels_every_time  # type: ignore[method-assign]
    RedisLedger.lookup_many = pipelined_gets  # type: ignore[method-assign]


def expand_levers(levers: set[str]) -> set[str]:
    """Return `levers` with `skeleton` replaced by the ablations it stands for."""
    if "skeleton" not in levers:
        return set(levers)
    return (levers - {"skeleton"}) | set(SKELETON_REMOVES)


def _levers() -> set[str]:
    return {lever for lever in os.environ.get("BENCH_GATEWAY_LEVERS", "").split(",") if lever}


def uvicorn_settings(role: str) -> dict[str, Any]:
    """Return the uvicorn settings of a role (the gateway's levers may change loop, parser and workers)."""
    settings = dict(UVICORN_SETTINGS)
    if role != "gateway":
        return settings
    settings["log_config"] = None  # configure_logging (JSON lines) owns logging, as under `serve`
    levers = _levers()
    if "no-header-deadline" not in levers:
        settings["http"] = GATEWAY_HTTP_PROTOCOL
    if "asyncio" in levers:
        settings.update(loop="asyncio", http="h11")
    for lever in levers:
        if lever.startswith("workers="):
            settings["workers"] = int(lever.partition("=")[2])
    return settings


def serve(role: str, port: int, upstream_url: str) -> None:
    """Serve one role in this process until terminated."""
    import uvicorn

    settings = uvicorn_settings(role)
    if role == "gateway":
        uvicorn.run("tests.perf.targets:gateway_factory", factory=True, port=port, **settings)
        return
    if role == "standin":
        app = standin_app(build_payloads())
    elif role == "bare":
        app = bare_proxy_app(upstream_url)
    elif role == "naive":
        app = naive_app(upstream_url)
    else:
        raise ValueError(f"unknown role {role!r}")
    uvicorn.run(app, port=port, **settings)


# --- (c) nginx ---------------------------------------------------------------------------------------------

_NGINX_COMMON = """daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    server_tokens off;
{body}
}}
"""


def nginx_upstream_conf(directory: Path, port: int, payloads: Payloads, api_key: str = API_KEY) -> str:
    """Return an nginx config serving the stand-in's payloads (files under `directory`) on loopback."""
    (directory / "list.json").write_bytes(payloads.list_page)
    (directory / "details.json").write_bytes(payloads.details)
    signed = (
        '{"signed_url":"ws://$host/v1/convai/conversation?agent_id=$arg_agent_id'
        '&conversation_signature=$request_id&conversation_id=conv_$request_id",'
        '"conversation_id":"conv_$request_id"}'
    )
    body = f"""    default_type application/json;
    server {{
        listen 127.0.0.1:{port};
        if ($http_xi_api_key != "{api_key}") {{ return 401 '{{"detail":{{"status":"invalid_api_key"}}}}'; }}
        location = {SIGNED_URL_PATH} {{ return 200 '{signed}'; }}
        location = {LIST_PATH} {{ alias {directory}/list.json; }}
        location = {CONVERSATION_PATH} {{ alias {directory}/details.json; }}
        location = {FEEDBACK_PATH} {{ return 200 '{{}}'; }}
        location / {{ return 404 '{{"detail":{{"status":"not_found"}}}}'; }}
    }}"""
    return _NGINX_COMMON.format(dir=directory, body=body)


def nginx_proxy_conf(directory: Path, port: int, upstream_url: str, api_key: str = API_KEY) -> str:
    """Return an nginx config for reference (c): a one-hop keep-alive proxy adding the api key."""
    upstream = upstream_url.removeprefix("http://")
    body = f"""    upstream convai {{
        server {upstream};
        keepalive 200;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://convai;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "";
            proxy_set_header xi-api-key "{api_key}";
        }}
    }}"""
    return _NGINX_COMMON.format(dir=directory, body=body)


def main(argv: list[str] | None = None) -> None:
    """Parse `--role/--port/--upstream` and serve."""
    parser = argparse.ArgumentParser(description="serve one benchmark process")
    parser.add_argument("--role", required=True, choices=("standin", "bare", "naive", "gateway"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", default="")
    args = parser.parse_args(argv)
    serve(args.role, args.port, args.upstream)


if __name__ == "__main__":
    main()
