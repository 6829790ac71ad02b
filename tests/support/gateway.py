"""A whole gateway for tests: real app + lifespan, the emulator over loopback HTTP, real Redis, real JWTs."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from service.app import create_app
from service.dev_tokens import mint_token
from service.settings import Settings, load_settings
from tests.support.lifespan import running

TEST_JWT_SECRET = "test-secret-0123456789abcdef0123456789abcdef"
TEST_AGENTS = "agent_demo,agent_other"


class LogCapture(logging.Handler):
    """Keep every log record, formatted with all its attributes, for leak assertions."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        """Store the message and every extra attribute as text."""
        extras = {k: v for k, v in record.__dict__.items() if k not in ("msg", "args")}
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.lines.append(f"{text} {extras!r}")


_Handler = TypeVar("_Handler", bound=logging.Handler)


@contextlib.contextmanager
def handler_attached(logger: logging.Logger, handler: _Handler, level: int) -> Iterator[_Handler]:
    """Attach `handler` to `logger` at `level` for the duration of the block, then restore the logger."""
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def capture_logs() -> contextlib.AbstractContextManager[LogCapture]:
    """Capture every log record of every logger at DEBUG for the duration of the block."""
    return handler_attached(logging.getLogger(), LogCapture(), logging.DEBUG)


@dataclass
class Gateway:
    """A running gateway and handles on its surroundings."""

    client: httpx.AsyncClient
    emulator: httpx.AsyncClient
    emulator_url: str
    settings: Settings
    app: Any
    log_capture: LogCapture = field(repr=False)

    @property
    def logs(self) -> list[str]:
        """Return every log line captured so far."""
        return self.log_capture.lines

    def token(
        self,
        sub: str,
        *,
        scopes: str | None = "convai:session convai:history",
        agents: list[str] | None = None,
        ttl: int = 300,
        **claims: Any,
    ) -> str:
        """Mint a real HS256 JWT accepted by this gateway."""
        return mint_token(TEST_JWT_SECRET, sub, scopes=scopes, agents=agents, ttl=ttl, **claims)

    def headers(self, sub: str, **kwargs: Any) -> dict[str, str]:
        """Return an Authorization header for `sub`."""
        return {"Authorization": f"Bearer {self.token(sub, **kwargs)}"}

    async def upstream_requests(self) -> list[dict[str, Any]]:
        """Return the calls the emulator received."""
        response = await self.emulator.get("/_emulator/requests")
        response.raise_for_status()
        requests: list[dict[str, Any]] = response.json()
        return requests


def gateway_env(emulator_url: str, api_key: str, redis_url: str | None, **overrides: str) -> dict[str, str]:
    """Build the environment of a test gateway; an override of "" removes the variable."""
    env = {
        "ELEVENLABS_API_KEY": api_key,
        "ELEVENLABS_BASE_URL": emulator_url,
        "JWT_HS256_SECRET": TEST_JWT_SECRET,
        "ALLOWED_AGENT_IDS": TEST_AGENTS,
        "LOG_LEVEL": "DEBUG",
    }
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(overrides)
    return {k: v for k, v in env.items() if v != ""}


@contextlib.asynccontextmanager
async def run_gateway(
    emulator_url: str, api_key: str, redis_url: str | None, env: Mapping[str, str]
) -> AsyncIterator[Gateway]:
    """Run a gateway (lifespan included) in front of the emulator and yield it."""
    settings = load_settings(gateway_env(emulator_url, api_key, redis_url, **env))
    app = create_app(settings)
    with capture_logs() as captured:
        async with (
            running(app) as asgi,
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=asgi, client=("203.0.113.7", 40000)),
                base_url="http://gateway.test",
            ) as client,
            httpx.AsyncClient(base_url=emulator_url) as emulator,
        ):
            yield Gateway(client, emulator, emulator_url, settings, app, captured)
