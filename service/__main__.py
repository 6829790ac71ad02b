"""The `convai-gateway` command line: serve, dev, emulator, token, check-config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import resource
import secrets
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypedDict
from urllib.parse import urlsplit

from service import __version__
from service.settings import ConfigError, Settings, load_settings, safe_url

EXIT_CONFIG = 2
EXIT_STARTUP = 3  # uvicorn's: the server could not start (address in use, the app failed to load)
DEV_AGENT_ID = "agent_demo"
DEV_USER = "alice"
# The web example (deploy/examples/web) is mounted by `dev` only, never by the production app.
EXAMPLE_DIR = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "web"
EXAMPLE_PREFIX = "/example"
EXAMPLE_CLIENT_BUNDLE = "node_modules/@elevenlabs/client/dist/lib.iife.js"
# The client's AudioWorklet processors, served from the page's origin: loaded from the blob: or data: URLs the
# client makes by default, they would need script-src to allow those.
EXAMPLE_WORKLETS = {
    "raw-audio-processor.js": "node_modules/@elevenlabs/client/worklets/rawAudioProcessor.js",
    "audio-concat-processor.js": "node_modules/@elevenlabs/client/worklets/audioConcatProcessor.js",
}
EXAMPLE_SUBJECT = re.compile(r"[A-Za-z0-9_.@-]{1,64}")

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.types import ASGIApp


def _fail(message: str) -> int:
    print(f"convai-gateway: {message}", file=sys.stderr)
    return EXIT_CONFIG


def _settings_or_exit() -> Settings | None:
    try:
        return load_settings()
    except ConfigError as exc:
        print(f"convai-gateway: {exc}", file=sys.stderr)
        return None


class ServerOptions(TypedDict):
    """The uvicorn options the gateway always runs with."""

    proxy_headers: bool
    server_header: bool
    log_config: None
    access_log: bool
    http: type[asyncio.Protocol]
    ws: Literal["none"]


def gateway_server_options() -> ServerOptions:
    """Return the uvicorn options `serve` and `dev` both run the gateway with."""
    from service.server_protocol import HeaderDeadlineProtocol

    return {
        # Client IPs come from TRUSTED_PROXIES only (service.client_ip); uvicorn's default let any client that
        # reaches the port rewrite its IP with X-Forwarded-For.
        "proxy_headers": False,
        "server_header": False,
        "log_config": None,
        "access_log": False,  # one structured line per request comes from the app itself
        # uvicorn's httptools protocol with a request-header deadline and header limits: oversized, slow or
        # malformed requests get the gateway's problems, not uvicorn's plain text.
        "http": HeaderDeadlineProtocol,
        # The gateway serves no WebSocket: with uvicorn's WebSocket protocol on, an upgrade request skipped the
        # app's access log and uvicorn logged its raw path and query, tokens included. Now it is a plain request.
        "ws": "none",
    }


def cmd_serve(args: argparse.Namespace) -> int:
    """Run the production server (uvicorn) from the environment."""
    settings = _settings_or_exit()
    if settings is None:
        return EXIT_CONFIG
    import uvicorn

    from service.observability import claim_multiprocess_dir, configure_logging, serve_metrics_port
    from service.supervisor import DrainingMultiprocess

    configure_logging(settings.log_level)
    file_limit_problem = raise_open_file_limit(settings.max_connections)
    if file_limit_problem is not None:
        logging.getLogger("service.server").warning(file_limit_problem)
    workers = args.workers
    if (workers > 1 or settings.metrics_port) and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Several processes share one set of metrics only through prometheus-client's multiprocess files.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="convai-metrics-")
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if metrics_dir and not (os.path.isdir(metrics_dir) and os.access(metrics_dir, os.W_OK | os.X_OK)):
        # Otherwise each worker fails at start with a traceback, and the supervisor restarts it for ever.
        return _fail(f"PROMETHEUS_MULTIPROC_DIR: {metrics_dir} is not a writable directory")
    if metrics_dir and not claim_multiprocess_dir(metrics_dir):
        return _fail(
            f"PROMETHEUS_MULTIPROC_DIR: {metrics_dir} is in use by another running gateway; give each its own"
        )
    if settings.metrics_port:
        try:
            serve_metrics_port(
                settings.host if args.host is None else args.host,
                settings.metrics_port,
                process_metrics=workers == 1,  # with one worker, the listener's process is the server
            )
        except OSError as exc:
            return _fail(f"METRICS_PORT: cannot listen on port {settings.metrics_port}: {exc.strerror}")
    config = uvicorn.Config(
        "service.app:app_from_environment",
        factory=True,
        host=args.host or settings.host,
        port=args.port or settings.port,
        workers=workers,
        lifespan="on",
        timeout_graceful_shutdown=args.graceful_timeout,
        # Behind a proxy this must outlast the proxy's idle timeout: a connection the gateway closes first can
        # meet a request the proxy has just sent on it, and the client gets a 502.
        timeout_keep_alive=args.keep_alive_timeout or settings.keep_alive_timeout_seconds,
        **gateway_server_options(),
    )
    if workers > 1:
        # What uvicorn.run does for workers, with a supervisor that stops listening when shutdown begins.
        DrainingMultiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    server = uvicorn.Server(config)
    # uvicorn re-raises the SIGTERM it caught once it has drained, which under the default handler ends the
    # process as killed (exit status 143) after a clean shutdown; this handler makes that re-raise exit 0.
    # Before uvicorn installs its own handler (while starting), a SIGTERM also exits 0 at once.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with contextlib.suppress(KeyboardInterrupt):  # SIGINT (Ctrl+C), re-raised by uvicorn as well
        server.run()
    return 0 if server.started else EXIT_STARTUP


# Open files a gateway process needs besides its client connections: the upstream pool (200), Redis connections,
# the metrics port's (16), JWKS fetches, multiprocess metric files and the interpreter's own.
FILE_DESCRIPTOR_RESERVE = 512


def raise_open_file_limit(max_connections: int) -> str | None:
    """Raise the soft open-file limit to the hard one; return a warning if MAX_CONNECTIONS still cannot fit."""
    # Many systems start processes at a soft limit of 1024 under a far higher hard one (Go raises it the same
    # way at start). Past the limit, accept() fails with EMFILE: uvicorn logs an error per attempt and the
    # client gets a reset instead of the 503 MAX_CONNECTIONS answers with.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    needed = max_connections + FILE_DESCRIPTOR_RESERVE
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    return (
        f"MAX_CONNECTIONS {max_connections} needs about {needed} open files, but this process may open only "
        f"{soft}: connections beyond about {max(soft - FILE_DESCRIPTOR_RESERVE, 0)} will fail at accept; "
        "raise the open-file limit (ulimit -n) or lower MAX_CONNECTIONS"
    )


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _integer_between(low: int, high: int) -> Callable[[str], int]:
    """Return an argparse type accepting the integers from `low` to `high` (as settings check PORT)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}, got {number}")
        return number

    return parse


def _redis_description(settings: Settings) -> str:
    """Describe the configured Redis for a banner: its URL without credentials, or its Sentinels."""
    topology = settings.redis
    if topology.sentinels:
        hosts = ",".join(f"{host}:{port}" for host, port in topology.sentinels)
        return f"Sentinel service {topology.sentinel_service} via {hosts}"
    if topology.url:
        return safe_url(topology.url) + (" (cluster)" if topology.cluster else "")
    return "none (in-process limiter and ledger)"


def _dev_environment(port: int, emulator_port: int) -> dict[str, str]:
    env = {
        "ELEVENLABS_API_KEY": "xi-dev-" + secrets.token_hex(16),
        "ELEVENLABS_BASE_URL": f"http://127.0.0.1:{emulator_port}",
        "JWT_HS256_SECRET": secrets.token_hex(32),
        "ALLOWED_AGENT_IDS": f"{DEV_AGENT_ID},agent_other",
        "CORS_ALLOWED_ORIGINS": f"http://127.0.0.1:{port},http://localhost:{port}",
        "HOST": "127.0.0.1",
        "PORT": str(port),
    }
    # Whatever the developer exported wins, except the upstream: dev always talks to its own emulator.
    for name, value in os.environ.items():
        if name in env and name not in ("ELEVENLABS_BASE_URL", "ELEVENLABS_API_KEY"):
            env[name] = value
    return env


def example_csp(gateway_url: str, upstream_url: str) -> str:
    """Return the example page's Content-Security-Policy: its own files, the gateway and upstream's WebSocket only."""
    gateway, upstream = urlsplit(gateway_url), urlsplit(upstream_url)
    # The signed URL is a WebSocket on upstream's host: wss:// for an https upstream, ws:// for the emulator.
    websocket = f"{'wss' if upstream.scheme == 'https' else 'ws'}://{upstream.netloc}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src data:; "
        f"connect-src 'self' {gateway.scheme}://{gateway.netloc} {websocket}; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def example_app(
    web_dir: Path, *, gateway_url: str, upstream_url: str, agent_id: str, mint: Callable[[str], str]
) -> Starlette:
    """Build the dev-only app under /example: the web example page, its config, the client bundle, dev tokens."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
    from starlette.routing import Mount, Route

    from service.http_hygiene import SecurityHeadersMiddleware

    def static(name: str, media_type: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            path = web_dir / name
            if not path.is_file():
                return PlainTextResponse(f"{name} is missing: run `npm ci` in {web_dir}", status_code=404)
            return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})

        return endpoint

    def config(request: Request) -> Response:
        return JSONResponse({"gatewayUrl": gateway_url, "agentId": agent_id})

    def dev_token(request: Request) -> Response:
        sub = request.query_params.get("sub", "")
        if not EXAMPLE_SUBJECT.fullmatch(sub):
            return JSONResponse({"detail": "sub must be 1-64 of A-Z a-z 0-9 _ . @ -"}, status_code=422)
        return JSONResponse({"token": mint(sub)}, headers={"Cache-Control": "no-store"})

    routes = [
        Route("/", static("index.html", "text/html; charset=utf-8")),
        Route("/app.js", static("app.js", "text/javascript; charset=utf-8")),
        Route("/style.css", static("style.css", "text/css; charset=utf-8")),
        Route(
            "/vendor/elevenlabs-client.js", static(EXAMPLE_CLIENT_BUNDLE, "text/javascript; charset=utf-8")
        ),
        *(
            Route(f"/vendor/{name}", static(path, "text/javascript; charset=utf-8"))
            for name, path in EXAMPLE_WORKLETS.items()
        ),
        Route("/config.json", config),
        Route("/dev-token", dev_token),
    ]
    # The page holds a user's JWT: every response under /example gets the gateway's security headers, with a CSP
    # that lets the page run its own scripts and talk to the gateway and upstream only.
    headers = Middleware(
        SecurityHeadersMiddleware, content_security_policy=example_csp(gateway_url, upstream_url)
    )
    return Starlette(routes=[Mount(EXAMPLE_PREFIX, routes=routes)], middleware=[headers])


def with_example(gateway: ASGIApp, example: ASGIApp) -> ASGIApp:
    """Return an ASGI app that sends HTTP under /example to `example` and everything else to `gateway`."""
    from starlette.types import Receive, Scope, Send

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == EXAMPLE_PREFIX or path.startswith(EXAMPLE_PREFIX + "/")):
            await example(scope, receive, send)
        else:
            # The gateway keeps its lifespan, middleware and 404s for everything else.
            await gateway(scope, receive, send)

    return app


def cmd_dev(args: argparse.Namespace) -> int:
    """Run the gateway in front of the embedded emulator and print a dev token and curl lines."""
    import uvicorn

    from service.app import create_app
    from service.dev_tokens import mint_token
    from service.emulator import create_emulator_app
    from service.http_hygiene import LoopbackHostMiddleware
    from service.observability import configure_logging

    env = _dev_environment(args.port, args.emulator_port)
    os.environ.update(env)
    try:
        settings = load_settings()
    except ConfigError as exc:
        return _fail(str(exc))
    configure_logging(settings.log_level)
    if settings.log_level != "DEBUG":
        # Keep the banner readable: uvicorn's start/stop lines add nothing for a newcomer.
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    # Sign with the secret as the gateway read it (an exported one may end in a newline), not the raw value.
    dev_issuer = settings.issuers[0]  # the JWT_* issuer: dev always sets JWT_HS256_SECRET
    if dev_issuer.hs256_secret is None:
        return _fail("dev: JWT_HS256_SECRET must be set")
    secret = dev_issuer.hs256_secret.reveal()
    token = mint_token(
        secret,
        DEV_USER,
        scopes="convai:session convai:history convai:delete",
        ttl=12 * 3600,
        issuer=dev_issuer.issuer,
        audience=(dev_issuer.audiences or (None,))[0],
    )
    base = f"http://127.0.0.1:{args.port}"
    emulator = create_emulator_app(env["ELEVENLABS_API_KEY"], seed=True)
    gateway: ASGIApp = create_app(settings)
    example_line = ""
    if EXAMPLE_DIR.is_dir():

        def mint_dev_token(sub: str) -> str:
            return mint_token(
                secret,
                sub,
                scopes="convai:session convai:history",
                ttl=3600,
                issuer=dev_issuer.issuer,
                audience=(dev_issuer.audiences or (None,))[0],
            )

        page = example_app(
            EXAMPLE_DIR,
            gateway_url=base,
            upstream_url=env["ELEVENLABS_BASE_URL"],
            agent_id=DEV_AGENT_ID,
            mint=mint_dev_token,
        )
        gateway = with_example(gateway, page)
        bundle = (
            "" if (EXAMPLE_DIR / EXAMPLE_CLIENT_BUNDLE).is_file() else f" (first: cd {EXAMPLE_DIR} && npm ci)"
        )
        example_line = f"\nWeb example: http://localhost:{args.port}{EXAMPLE_PREFIX}/{bundle}"
    # Both listen on loopback only, yet a web page can still reach them through DNS rebinding: each answers
    # only requests addressed to a loopback name (LoopbackHostMiddleware). `serve` runs behind whatever hosts
    # production uses and has no such check.
    servers = [
        uvicorn.Server(
            uvicorn.Config(
                LoopbackHostMiddleware(emulator),
                host="127.0.0.1",
                port=args.emulator_port,
                log_config=None,
                ws="websockets-sansio",
            )
        ),
        uvicorn.Server(
            uvicorn.Config(
                LoopbackHostMiddleware(gateway, record_refusals=True),
                host="127.0.0.1",
                port=args.port,
                **gateway_server_options(),  # as in `serve`: what a developer sees is what production answers
            )
        ),
    ]
    banner = f"""
convai-gateway {__version__} (dev) on {base}, upstream emulator on http://127.0.0.1:{args.emulator_port}
Redis: {_redis_description(settings)}

Dev token for user {DEV_USER!r} (12 h, scopes convai:session convai:history convai:delete):

export TOKEN={token}

curl -s -H "Authorization: Bearer $TOKEN" "{base}/v1/convai/conversation/get-signed-url?agent_id={DEV_AGENT_ID}"
curl -s -H "Authorization: Bearer $TOKEN" "{base}/v1/convai/conversation/token?agent_id={DEV_AGENT_ID}"
curl -s -H "Authorization: Bearer $TOKEN" "{base}/v1/convai/conversations?page_size=5"

More tokens: JWT_HS256_SECRET={secret} convai-gateway token --sub bob{example_line}
Press Ctrl+C to stop.
"""

    async def run_both() -> None:
        tasks = [asyncio.create_task(server.serve()) for server in servers]
        # Print the token only once both servers listen, so the curl lines work the moment they appear.
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.02)
        else:
            print(banner, flush=True)
        await asyncio.gather(*tasks)

    asyncio.run(run_both())
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    """Run the upstream emulator alone."""
    import uvicorn

    from service.emulator import create_emulator_app
    from service.http_hygiene import LoopbackHostMiddleware, listens_on_loopback_only

    api_key = os.environ.get("ELEVENLABS_API_KEY", "").strip()
    if not api_key:
        # `emulator --port N` works in a clean environment (DESIGN section 8): a fresh dev-only key, shown once
        # so a gateway or curl can be pointed at it. It is the emulator's, never a workspace key.
        api_key = "xi-emulator-" + secrets.token_hex(16)
        print(
            f"emulator: accepting xi-api-key {api_key} (set ELEVENLABS_API_KEY to choose the key)", flush=True
        )
    app: ASGIApp = create_emulator_app(api_key, seed=not args.empty)
    if listens_on_loopback_only(args.host):
        # As under `dev`: a web page can reach a loopback server through DNS rebinding, and the control API
        # (/_emulator/...) needs no key. Bound to other addresses (docker compose's 0.0.0.0, where the gateway
        # calls it as http://emulator:9000) it serves whatever names reach it.
        app = LoopbackHostMiddleware(app)
    uvicorn.run(app, host=args.host, port=args.port, server_header=False, ws="websockets-sansio")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """Print a dev JWT signed with JWT_HS256_SECRET."""
    from service.dev_tokens import mint_token
    from service.settings import MIN_HS256_SECRET_BYTES, load_env_issuer

    # The same reader as the gateway's (values stripped, ...), so the token verifies there; the rest of
    # the configuration (API key, agents) is not needed to sign one.
    try:
        issuer = load_env_issuer()
    except ConfigError as exc:
        return _fail(f"token: {exc}")
    if issuer is None or issuer.hs256_secret is None:
        return _fail(f"token: JWT_HS256_SECRET must be set to at least {MIN_HS256_SECRET_BYTES} bytes")
    if args.ttl <= 0:
        return _fail("token: --ttl must be a positive number of seconds")
    agents = [a.strip() for a in args.agents.split(",") if a.strip()] if args.agents else None
    allowed = issuer.allowed_scopes
    dropped = sorted(set(args.scope.split()) - allowed) if allowed is not None else []
    if allowed is not None and dropped:
        # Minted as asked (a test of the narrowing may want it), but the caller should not be surprised by 403s.
        print(
            f"token: the gateway will drop {', '.join(dropped)}: JWT_ALLOWED_SCOPES allows only "
            f"{', '.join(sorted(allowed))}",
            file=sys.stderr,
        )
    if issuer.user_id_prefix:
        # The token carries the bare sub; the conversations, limits and logs are the prefixed user's.
        print(
            f"token: the gateway will see user id {issuer.user_id_prefix + args.sub!r} "
            f"(JWT_USER_ID_PREFIX {issuer.user_id_prefix!r} + sub)",
            file=sys.stderr,
        )
    print(
        mint_token(
            issuer.hs256_secret.reveal(),
            args.sub,
            scopes=args.scope,
            ttl=args.ttl,
            agents=agents,
            issuer=issuer.issuer,
            audience=(issuer.audiences or (None,))[0],
        )
    )
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the environment: exit 0 when valid, else print every problem and exit 2."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print("configuration is invalid:", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        return EXIT_CONFIG
    redis = "in-process (single replica)"
    if settings.redis.cluster:
        redis = "cluster"
    elif settings.redis.sentinels:
        # How the sentinels themselves are reached, never with what: no username, no password.
        reached = [f"{settings.redis.sentinel_auth} auth"] if settings.redis.sentinel_auth != "none" else []
        reached += ["TLS"] if settings.redis.sentinel_tls else []
        redis = f"sentinel ({settings.redis.sentinel_service}{'; sentinels: ' if reached else ''}{', '.join(reached)})"
    elif settings.redis.url:
        redis = "standalone"
    print(
        "configuration OK: "
        f"upstream {safe_url(settings.elevenlabs_base_url)}, {len(settings.issuers)} token issuer(s), "
        f"{len(settings.allowed_agent_ids)} allowed agent(s), redis {redis}, ownership {settings.ownership_mode}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="convai-gateway", description="ElevenLabs convai backend-for-frontend"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the production server from the environment")
    serve.add_argument("--host", default=None, help="bind address (default: HOST or 127.0.0.1)")
    serve.add_argument(
        "--port", type=_integer_between(1, 65535), default=None, help="port (default: PORT or 8080)"
    )
    serve.add_argument(
        "--workers", type=_integer_between(1, 64), default=1, help="worker processes (default 1, at most 64)"
    )
    serve.add_argument(
        "--graceful-timeout",
        type=_integer_between(0, 3600),
        default=20,
        help="seconds to finish in-flight requests (default 20)",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=_integer_between(1, 3600),
        default=None,
        help="seconds an idle connection is kept open (default: KEEP_ALIVE_TIMEOUT_SECONDS or 5); "
        "behind a proxy, longer than its idle timeout",
    )
    serve.set_defaults(handler=cmd_serve)

    dev = sub.add_parser("dev", help="run the gateway with the embedded emulator and print a dev token")
    dev.add_argument("--port", type=_integer_between(1, 65535), default=8080)
    dev.add_argument("--emulator-port", type=_integer_between(1, 65535), default=8090)
    dev.set_defaults(handler=cmd_dev)

    emulator = sub.add_parser("emulator", help="run the upstream emulator alone")
    emulator.add_argument("--port", type=_integer_between(1, 65535), required=True)
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--empty", action="store_true", help="start without sample conversations")
    emulator.set_defaults(handler=cmd_emulator)

    token = sub.add_parser("token", help="print a dev JWT signed with JWT_HS256_SECRET")
    token.add_argument("--sub", required=True, help="user id (the sub claim)")
    token.add_argument("--scope", default="convai:session convai:history", help="space-separated scopes")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.add_argument("--agents", default=None, help="comma-separated agents claim")
    token.set_defaults(handler=cmd_token)

    check = sub.add_parser("check-config", help="validate the environment (exit 0) or list problems (exit 2)")
    check.set_defaults(handler=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = build_parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
