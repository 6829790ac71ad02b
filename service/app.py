"""`create_app(settings)`: routes, middleware and the lifespan that owns every shared client."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote, urlsplit

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from service.auth import AuthenticationMiddleware, Authenticator
from service.errors import EXCEPTION_HANDLERS, UnhandledErrorMiddleware
from service.http_hygiene import BodyLimitMiddleware, SecurityHeadersMiddleware, cors_middleware
from service.ledger import build_ledger
from service.observability import (
    Metrics,
    RequestContextMiddleware,
    configure_logging,
    mask_known_secret,
    metrics_endpoint,
)
from service.ratelimit import IpAuthFailureGuard, build_rate_limiter
from service.redis_client import REDIS_ERRORS, close_redis, create_redis
from service.routes import conversations, health, sessions
from service.settings import ACT_AS_SCOPE, Settings, load_settings
from service.state import Services
from service.upstream import UpstreamClient, create_http_client, create_transport, split_proxy_url

logger = logging.getLogger("service.app")

MAX_BODY_BYTES = 16 * 1024


def create_app(settings: Settings) -> Starlette:
    """Build the gateway ASGI app from validated settings."""
    _mask_configured_secrets(settings)
    _warn_of_unbounded_issuers(settings)
    metrics = Metrics()
    authenticator = Authenticator(settings, on_jwks_refresh=metrics.jwks_refresh)
    # Redis clients connect lazily, so building them here (outside the event loop) is safe; the lifespan
    # closes them. The limiter must exist before the middleware stack is built: the failed-auth guard uses it.
    redis = (
        create_redis(
            settings.redis,
            timeout=settings.redis_timeout_seconds,
            pipeline_limit=settings.redis_pipeline_limit,
        )
        if settings.redis.configured
        else None
    )
    limiter = build_rate_limiter(
        settings,
        redis,
        observe=metrics.observe_rate_limit,
        on_redis_error=metrics.redis_error,
        on_circuit=metrics.circuit_state,
    )
    ledger = build_ledger(settings, redis)
    guard = IpAuthFailureGuard(
        limiter,
        settings.rate_limits["ip-auth-failure"],
        settings.trusted_proxies,
        ipv6_prefix=settings.rate_limit_ipv6_prefix,
        observe=metrics.observe_rate_limit,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        if redis is not None and settings.redis.cluster:
            # redis-py's async cluster client fails commands that race its first topology discovery;
            # with retries off (the breaker decides) that should happen before traffic, once.
            try:
                await redis.initialize()
            except REDIS_ERRORS as exc:
                # A cluster that is down at start is an outage like any other: the gateway starts, /readyz
                # says so, the limiter degrades per RATE_LIMIT_ON_REDIS_ERROR and discovers the topology later.
                logger.warning("Redis Cluster unreachable at start: %s", type(exc).__name__)
        transport = create_transport(proxy=settings.egress_proxy_url)
        http = create_http_client(settings, transport=transport)
        upstream = UpstreamClient(
            http,
            transport=transport,
            max_retries=settings.upstream_max_retries,
            audio_read_timeout=settings.upstream_audio_read_timeout,
            max_audio_streams=settings.upstream_max_audio_streams,
            observe=metrics.observe_upstream,
        )
        await authenticator.start()
        services = Services(
            settings=settings,
            upstream=upstream,
            authenticator=authenticator,
            limiter=limiter,
            ledger=ledger,
            metrics=metrics,
            redis=redis,
        )
        # Every close runs even when one before it fails (a stack runs them all, then re-raises): a failing
        # authenticator close must not leave the upstream client or the Redis pool open.
        async with contextlib.AsyncExitStack() as closing:
            if redis is not None:
                closing.push_async_callback(close_redis, redis)
            closing.push_async_callback(limiter.aclose)
            closing.push_async_callback(http.aclose)
            closing.push_async_callback(authenticator.aclose)
            yield {"services": services}

    routes: list[Route] = [*health.routes, *sessions.routes, *conversations.routes]
    if settings.metrics_port is None:
        routes.append(Route("/metrics", metrics_endpoint(metrics), methods=["GET"]))

    # Outermost first: request id + access log see everything (500s included, thanks to the error
    # boundary inside them), CORS answers preflights before auth and, outside the error boundary, puts its
    # headers on 500s too (a browser could not read the problem or its request id otherwise).
    middleware = [
        Middleware(RequestContextMiddleware, metrics=metrics, trusted_proxies=settings.trusted_proxies),
        Middleware(SecurityHeadersMiddleware),
    ]
    cors = cors_middleware(settings.cors_allowed_origins)
    if cors is not None:
        middleware.append(cors)
    middleware += [
        Middleware(UnhandledErrorMiddleware),
        Middleware(
            BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES, body_timeout=settings.request_body_timeout_seconds
        ),
        Middleware(AuthenticationMiddleware, authenticator=authenticator, guard=guard),
    ]
    app = Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=lifespan,
    )
    # A trailing-slash redirect would turn `abc%2F` into a 307 to `abc`: an encoded slash must never
    # silently become another conversation id.
    app.router.redirect_slashes = False
    return app


def _mask_configured_secrets(settings: Settings) -> None:
    mask_known_secret(settings.elevenlabs_api_key.reveal())
    for issuer in settings.issuers:
        if issuer.hs256_secret is not None:
            mask_known_secret(issuer.hs256_secret.reveal())
    if settings.redis.sentinel_password is not None:
        mask_known_secret(settings.redis.sentinel_password.reveal())
    proxy_url = settings.egress_proxy_url.reveal() if settings.egress_proxy_url else None
    for url in (proxy_url, settings.redis.url):
        password = urlsplit(url).password if url else None
        if password:
            mask_known_secret(unquote(password))
            mask_known_secret(password)
    if proxy_url is not None:
        # The proxy credentials also travel as `Basic base64(user:password)`, which shows neither literal: masked
        # as the very value the transports send (httpx, for JWKS, encodes them the same way: UTF-8).
        _, authorization = split_proxy_url(proxy_url)
        if authorization is not None:
            mask_known_secret(authorization.removeprefix("Basic "))


def _warn_of_unbounded_issuers(settings: Settings) -> None:
    # With several issuers, one that may grant act-as lets whoever controls it impersonate the users of all
    # the others, and two that share a user id namespace let each name the other's users (OIDC: a `sub` is
    # unique only within its issuer). A lone issuer is left alone: its API gateway's service token needs
    # act-as, and there are no other issuers whose users it could take over.
    if len(settings.issuers) < 2:
        return
    # Several issuers all have a name (settings refuses them otherwise); the name is the iss, never a secret.
    # What act-as reaches is the issuer's namespace (service.auth.act_as): a prefixed issuer's targets get its
    # prefix, an unprefixed one's are taken as they come, "partner:alice" included.
    prefixed_users = any(config.user_id_prefix for config in settings.issuers)
    any_user = "any user, of any issuer" + (", prefixed user ids included" if prefixed_users else "")
    unbounded = [
        f"{config.issuer} ({any_user})"
        if config.user_id_prefix is None
        else f"{config.issuer} (only users under its prefix {config.user_id_prefix!r})"
        for config in settings.issuers
        if config.allowed_scopes is None
    ]
    if unbounded:
        logger.warning(
            "%d token issuers are configured, and %d of them may grant %s without a scope allowlist, each "
            "impersonating the users in brackets: %s; give every issuer allowed_scopes in [[issuers]] "
            "(JWT_ALLOWED_SCOPES for the environment issuer)",
            len(settings.issuers),
            len(unbounded),
            ACT_AS_SCOPE,
            ", ".join(unbounded),
        )
    # Prefixes are unique (settings refuses a shared one), so only issuers without one can share a namespace.
    unprefixed = [str(config.issuer) for config in settings.issuers if config.user_id_prefix is None]
    if len(unprefixed) >= 2:
        logger.warning(
            "%d token issuers are configured, and %s share one user id namespace: a token of one may name a user "
            "of another (the same sub is the same user, whatever the issuer); give each issuer but one a "
            "user_id_prefix in [[issuers]] (JWT_USER_ID_PREFIX for the environment issuer)",
            len(settings.issuers),
            ", ".join(unprefixed),
        )


def app_from_environment() -> Starlette:
    """Build the app from the process environment (the `serve` command's uvicorn factory)."""
    settings = load_settings()
    # uvicorn spawns each worker afresh, so the parent's logging set-up does not reach it.
    configure_logging(settings.log_level)
    app = create_app(settings)
    freeze_startup_objects()
    return app


def freeze_startup_objects() -> None:
    """Collect, then move every object alive after start-up out of the garbage collector's scans."""
    # Modules, settings and the app live as long as the process, yet each full collection walked all of
    # them again: gc.freeze() cut ~5-12 % of a request's CPU at 50 concurrent clients (tests/perf).
    gc.collect()
    gc.freeze()
