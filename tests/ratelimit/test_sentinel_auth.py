"""The sentinels' own credentials and TLS, against real sentinels (requirepass, an ACL user, TLS only).

Each test starts a master and one sentinel that protects itself, then a gateway built by `create_app` from a
GATEWAY_CONFIG naming only the sentinels. Without the sentinels' credentials (or TLS) the gateway finds no
master: /readyz says Redis is down and one log line says why, naming the sentinel, never a secret. With them
it mints through the master the sentinels name.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio.connection import SSLConnection

from service.ledger import decode_entry, ledger_key
from service.observability import mask_secrets
from service.redis_client import REDIS_ERRORS, close_redis, create_redis
from service.settings import RedisTopology, Secret
from tests.conftest import EMULATOR_API_KEY
from tests.support.gateway import Gateway, run_gateway
from tests.support.servers import RedisServer, SentinelGroup, sentinel_group
from tests.support.tls import TlsFiles

SERVICE = "gwmaster"
SIGNED_URL = "/v1/convai/conversation/get-signed-url"
AGENT = "agent_demo"
# Long enough to be masked as a known secret, and distinctive enough to find in any log line.
PASSWORD = "sentinel-pw-9d41c7be20"
WRONG_PASSWORD = "not-the-pw-51e08ac3f7"
REDIS_TIMEOUT_MS = "500"  # as in test_sentinel: a harness stall must not pass for a Redis timeout
NO_MASTER = "Redis Sentinel: no sentinel named the master"
DEADLINE_SECONDS = 15.0


def write_config(directory: Path, group: SentinelGroup, extra: str = "") -> str:
    """Write a GATEWAY_CONFIG reaching Redis through the group's sentinel only, plus `extra` lines."""
    host, port = group.sentinel.address
    path = directory / "gateway.toml"
    path.write_text(
        f'[redis]\nsentinels = ["{host}:{port}"]\nsentinel_service = "{SERVICE}"\n{extra}', encoding="utf-8"
    )
    return str(path)


@contextlib.asynccontextmanager
async def gateway_on(
    emulator_url: str, group: SentinelGroup, directory: Path, extra: str = "", env: Mapping[str, str] = {}
) -> AsyncIterator[Gateway]:
    """Run a gateway whose Redis is found through the group's sentinel."""
    full = {
        "GATEWAY_CONFIG": write_config(directory, group, extra),
        "OWNERSHIP_MODE": "ledger",  # a mint that succeeds wrote its ledger entry on the master
        "REDIS_TIMEOUT_MS": REDIS_TIMEOUT_MS,
        **env,
    }
    async with run_gateway(emulator_url, EMULATOR_API_KEY, None, full) as gateway:
        yield gateway


def ledger_owner(server: RedisServer, conversation_id: str) -> str | None:
    """Return the user the ledger on `server` records for the conversation, or None."""
    with contextlib.closing(server.client()) as client:
        raw = client.get(ledger_key(conversation_id))
    return None if raw is None else decode_entry(raw).user_id


async def assert_serves_through_the_master(gw: Gateway, group: SentinelGroup) -> None:
    """Assert /readyz is 200 and a mint's ledger entry lands on the group's master."""
    ready = await gw.client.get("/readyz")
    assert ready.status_code == 200, ready.text
    minted = await gw.client.get(SIGNED_URL, params={"agent_id": AGENT}, headers=gw.headers("alice"))
    assert minted.status_code == 200, minted.text
    assert ledger_owner(group.master, minted.json()["conversation_id"]) == "alice"


async def no_master_line(gw: Gateway) -> str:
    """Ask /readyz (503: no master) until the sentinel recheck has logged why; return that line."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    while True:
        ready = await gw.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        assert ready.json()["checks"]["redis"]["ok"] is False
        lines = [line for line in gw.logs if NO_MASTER in line]
        if lines:
            return lines[0]
        assert time.monotonic() < deadline, "no log line said why the sentinels named no master"
        await asyncio.sleep(0.05)  # the recheck runs in the background: wait for its log line


def assert_no_secret(gw: Gateway, *secrets: str) -> None:
    """Assert no captured log record (message or any attribute) holds any of `secrets`."""
    leaked = [line for line in gw.logs if any(secret in line for secret in secrets)]
    assert not leaked, leaked


def password_protected_group(**options: Any) -> contextlib.AbstractContextManager[SentinelGroup]:
    """Return a one-master sentinel group whose sentinel requires PASSWORD (`options` go to sentinel_group)."""
    return sentinel_group(
        SERVICE,
        replicas=0,
        sentinel_config=(f"requirepass {PASSWORD}",),
        sentinel_client_options={"password": PASSWORD},
        **options,
    )


# ---------------------------------------------------------------------------------------------- requirepass


async def test_a_sentinel_with_requirepass_names_no_master_without_the_password_and_the_log_says_why(
    emulator_url: str, tmp_path: Path
) -> None:
    with password_protected_group() as group:
        async with gateway_on(emulator_url, group, tmp_path) as gw:
            line = await no_master_line(gw)
            host, port = group.sentinel.address
            assert f"{host}:{port} requires authentication" in line, line
            assert "REDIS_SENTINEL_PASSWORD" in line  # what to set

        password_file = tmp_path / "sentinel-password"
        password_file.write_text(PASSWORD + "\n")
        async with gateway_on(
            emulator_url,
            group,
            tmp_path,
            'sentinel_auth = "password"\n',
            {"REDIS_SENTINEL_PASSWORD_FILE": str(password_file)},
        ) as gw:
            await assert_serves_through_the_master(gw, group)
            assert not [line for line in gw.logs if NO_MASTER in line]
            assert_no_secret(gw, PASSWORD)
            # The configured password is masked wherever a log line might quote it.
            assert PASSWORD not in mask_secrets(f"AUTH {PASSWORD}")


async def test_a_wrong_sentinel_password_is_logged_as_refused_without_showing_it(
    emulator_url: str, tmp_path: Path
) -> None:
    with password_protected_group() as group:
        env = {"REDIS_SENTINEL_PASSWORD": WRONG_PASSWORD}
        async with gateway_on(emulator_url, group, tmp_path, 'sentinel_auth = "password"\n', env) as gw:
            line = await no_master_line(gw)
            assert "refused the credentials" in line, line
            ready = await gw.client.get("/readyz")
            assert WRONG_PASSWORD not in ready.text
            assert_no_secret(gw, WRONG_PASSWORD)


# ------------------------------------------------------------------------- the Bitnami default: one password


async def test_sentinel_auth_redis_url_reuses_the_redis_password_for_the_sentinels(
    emulator_url: str, tmp_path: Path
) -> None:
    # As the Bitnami chart deploys it: master, replicas and sentinels all behind the one Redis password.
    with password_protected_group(password=PASSWORD) as group:
        env = {"REDIS_URL": f"redis://:{PASSWORD}@ignored-host/0"}
        async with gateway_on(emulator_url, group, tmp_path, env=env) as gw:
            # REDIS_URL's password reaches the master only: the sentinels were asked without one.
            line = await no_master_line(gw)
            assert "requires authentication" in line, line
            assert_no_secret(gw, PASSWORD)
        async with gateway_on(emulator_url, group, tmp_path, 'sentinel_auth = "redis_url"\n', env) as gw:
            await assert_serves_through_the_master(gw, group)
            assert_no_secret(gw, PASSWORD)


# -------------------------------------------------------------------------------------------------- ACL user


async def test_a_sentinel_acl_user_is_authenticated_by_name() -> None:
    acl = ("user default off", f"user gwsentinel on >{PASSWORD} ~* &* +@all")
    options = {"username": "gwsentinel", "password": PASSWORD}
    with sentinel_group(SERVICE, replicas=0, sentinel_config=acl, sentinel_client_options=options) as group:
        for username, works in (("gwsentinel", True), ("someone", False)):
            topology = RedisTopology(
                sentinels=(group.sentinel.address,),
                sentinel_service=SERVICE,
                sentinel_auth="password",
                sentinel_username=username,
                sentinel_password=Secret(PASSWORD),
            )
            client = create_redis(topology, timeout=float(REDIS_TIMEOUT_MS) / 1000)
            try:
                if works:
                    await client.set("acl", "1")
                    continue
                with pytest.raises(REDIS_ERRORS) as caught:
                    await client.set("acl", "1")
                assert "refused the credentials" in str(caught.value)
                assert PASSWORD not in str(caught.value)
            finally:
                await close_redis(client)


# ------------------------------------------------------------------------------------------------------ TLS


async def test_a_tls_only_sentinel_is_reached_over_tls_with_the_redis_url_tls_options(
    emulator_url: str, tmp_path: Path, tls_files: TlsFiles
) -> None:
    # The sentinel listens on TLS only (port 0), with client certificates required and a password, and names
    # the master's TLS port: only a TLS connection with REDIS_URL's CA and client certificate gets an answer.
    with password_protected_group(tls=tls_files) as group:
        url = (
            f"rediss://127.0.0.1/0?ssl_ca_certs={tls_files.ca}&ssl_certfile={tls_files.client_cert}"
            f"&ssl_keyfile={tls_files.client_key}&ssl_cert_reqs=required"
        )
        env = {"REDIS_URL": url, "REDIS_SENTINEL_PASSWORD": PASSWORD}
        async with gateway_on(emulator_url, group, tmp_path, 'sentinel_auth = "password"\n', env) as gw:
            line = await no_master_line(gw)  # a plaintext connection: the TLS port gives no answer
            assert "could not be asked" in line, line
            assert_no_secret(gw, PASSWORD)
        extra = 'sentinel_auth = "password"\nsentinel_tls = true\n'
        async with gateway_on(emulator_url, group, tmp_path, extra, env) as gw:
            await assert_serves_through_the_master(gw, group)
            assert_no_secret(gw, PASSWORD)


def test_sentinel_tls_takes_the_redis_url_tls_options_and_credentials_but_not_the_master_ones(
    tls_files: TlsFiles,
) -> None:
    # Built, not used: which of REDIS_URL's options reach the sentinels' connections. A sentinel has no database
    # (SELECT would fail each connection), and the client name and pool size describe the master's connections.
    url = (
        f"rediss://gw:{PASSWORD}@primary/3?ssl_ca_certs={tls_files.ca}&ssl_cert_reqs=required"
        "&ssl_min_version=772&client_name=gw-master&max_connections=7"
    )
    topology = RedisTopology(
        url=url,
        sentinels=(("127.0.0.1", 1),),
        sentinel_service=SERVICE,
        sentinel_auth="redis_url",
        sentinel_tls=True,
    )
    client = create_redis(topology, timeout=0.5)
    sentinel_pool = client._convai_sentinel.sentinels[0].connection_pool
    kwargs = sentinel_pool.connection_kwargs
    assert issubclass(sentinel_pool.connection_class, SSLConnection)
    assert kwargs["ssl_ca_certs"] == str(tls_files.ca) and kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_min_version"] == 772
    assert (kwargs["username"], kwargs["password"]) == ("gw", PASSWORD)
    assert kwargs["db"] == 0 and kwargs.get("client_name") is None  # redis-py's defaults, not the master's
    assert sentinel_pool.max_connections != 7
