"""Fixtures for the authentication tests: session keys, a loopback JWKS server and a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.auth.support import FakeClock, JwksServerState, Keys, generate_keys, jwks_app, public_jwk
from tests.support.servers import serve


@dataclass
class JwksServer:
    """The running JWKS server: its URL and mutable state."""

    url: str
    state: JwksServerState


@pytest.fixture(scope="session")
def keys() -> Keys:
    """Generate the test key pairs once."""
    return generate_keys()


@pytest.fixture(scope="session")
def _jwks_server_session() -> Iterator[JwksServer]:
    state = JwksServerState()
    with serve(jwks_app(state), ws="none") as served:
        yield JwksServer(url=f"{served.url}/jwks.json", state=state)


@pytest.fixture
def jwks(_jwks_server_session: JwksServer, keys: Keys) -> JwksServer:
    """Return the JWKS server, reset to publish the RSA (k-rsa), EC (k-ec) and Ed25519 (k-ed) keys."""
    server = _jwks_server_session
    server.state.reset()
    server.state.keys = [
        public_jwk(keys.rsa, "k-rsa", "RS256", use="sig"),
        public_jwk(keys.ec, "k-ec"),
        public_jwk(keys.ed, "k-ed"),
    ]
    return server


@pytest.fixture
def clock() -> FakeClock:
    """Return a fake clock at the test epoch."""
    return FakeClock()
