"""The shared services a request handler reaches through the lifespan state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from service.auth import Authenticator, Principal
    from service.ledger import Ledger
    from service.observability import Metrics
    from service.ratelimit import RateLimiter
    from service.settings import Settings
    from service.upstream import UpstreamClient


@dataclass(slots=True)
class Services:
    """Process-wide clients and components, opened and closed by the app lifespan."""

    settings: Settings
    upstream: UpstreamClient
    authenticator: Authenticator
    limiter: RateLimiter
    ledger: Ledger
    metrics: Metrics
    redis: Any | None  # redis.asyncio.Redis | RedisCluster, or None without REDIS_URL


def services_of(conn: HTTPConnection) -> Services:
    """Return the Services placed in the lifespan state."""
    services: Services = conn.state.services
    return services


def principal_of(conn: HTTPConnection) -> Principal:
    """Return the authenticated Principal the authentication middleware placed in the request state."""
    principal: Principal = conn.state.principal
    return principal
