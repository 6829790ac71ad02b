"""Fixtures for the emulator tests: an unseeded emulator in-process, served on loopback, and a settable clock."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from service.emulator import Emulator, create_emulator_app
from tests.support.servers import ServedApp, serve

API_KEY = "xi-emulator-test-key-0123456789abcdef"
AUTH = {"xi-api-key": API_KEY}


class Clock:
    """A wall clock that tests can move forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        """Return the current (possibly advanced) time."""
        return time.time() + self.offset

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.offset += seconds


@pytest.fixture
def clock() -> Clock:
    """Return a clock the app under test reads."""
    return Clock()


@pytest.fixture
def app(clock: Clock) -> Starlette:
    """Return an emulator without sample data."""
    return create_emulator_app(API_KEY, seed=False, clock=clock)


@pytest.fixture
def emulator(app: Starlette) -> Emulator:
    """Return the Emulator behind `app`."""
    emulator: Emulator = app.state.emulator
    return emulator


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """Yield an httpx client calling the emulator in-process."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator.test") as http:
        yield http


@pytest.fixture
def served(app: Starlette) -> Iterator[ServedApp]:
    """Serve the emulator on loopback with uvicorn."""
    # The legacy "websockets" implementation warns on import, which filterwarnings=error turns into a failure.
    with serve(app, ws="websockets-sansio") as server:
        yield server


async def create(client: httpx.AsyncClient, **spec: Any) -> dict[str, Any]:
    """Create a conversation through the control API and return its details."""
    response = await client.post("/_emulator/conversations", json=spec)
    assert response.status_code == 200, response.text
    details: dict[str, Any] = response.json()
    return details
