"""Fixtures of the reliability tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.servers import RedisServer


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """Start a private redis-server with an fsync-always append-only file, stopped and restarted by tests.

    With `appendfsync always` Redis syncs every write before acknowledging it, so an ownership record the
    gateway saw acknowledged survives a Redis restart: what the outage tests may then demand of the ledger.
    """
    server = RedisServer(extra_args=("--appendonly", "yes", "--appendfsync", "always"))
    server.start()
    try:
        yield server
    finally:
        server.close()
