"""No secret escapes: every route and failure path, with every logger captured at DEBUG.

The `xi-api-key`, every JWT sent (valid or not, whole or just its signature), every signed-URL
signature and every WebRTC token are searched for in the captured logs (all loggers, uvicorn and httpx
included), in the `/metrics` body and in every response (body and headers). The only place a signed
URL or a WebRTC token may appear is the response that mints it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.dev_tokens import mint_token
from tests.conftest import EMULATOR_API_KEY
from tests.reliability.support import (
    AGENT,
    CONVERSATIONS,
    SIGNED_URL,
    TOKEN,
    ServedGateway,
    add_fault,
    bearer,
    seed_conversation,
    served_gateway,
    write_config,
)
from tests.support.gateway import TEST_JWT_SECRET
from tests.support.servers import RedisServer

WRONG_KEY = "xi-wrong-key-5e1d0c9b8a7f6e5d4c3b2a19f8e7d6c5"


@pytest.fixture
def limited_config(tmp_path: Path) -> str:
    """Write a config where the session budget is small enough to reach a 429 quickly."""
    return write_config(
        tmp_path,
        {"user-session": (6, 6), "ip-auth-failure": (1000, 1000), "user-history": (1000, 1000)},
    )


@pytest.fixture
def served(emulator_url: str, redis_url: str, limited_config: str) -> Iterator[ServedGateway]:
    """Serve a gateway with every logger captured at DEBUG and fast upstream failure paths."""
    with served_gateway(
        emulator_url,
        redis_url,
        GATEWAY_CONFIG=limited_config,
        UPSTREAM_MAX_RETRIES="0",
        UPSTREAM_READ_TIMEOUT_SECONDS="0.3",
        REQUEST_BODY_TIMEOUT_SECONDS="0.5",
    ) as gateway:
        yield gateway


def b64url(value: object) -> str:
    """Encode a JSON value as an unpadded base64url segment."""
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def visible(response: httpx.Response) -> str:
    """Return everything a client sees of a response: status line, headers and body."""
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
    return f"{response.status_code}\n{headers}\n{response.text}"


async def test_no_secret_reaches_logs_metrics_or_responses(
    served: ServedGateway, emulator_url: str, redis_server: RedisServer, redis_url: str
) -> None:
    sent_tokens: list[str] = []
    responses: list[tuple[str, httpx.Response]] = []

    def auth(sub: str = "alice", **kwargs: object) -> dict[str, str]:
        header = bearer(sub, **kwargs)  # type: ignore[arg-type]
        sent_tokens.append(header["Authorization"][7:])
        return header

    def raw_auth(token: str) -> dict[str, str]:
        sent_tokens.append(token)
        return {"Authorization": f"Bearer {token}"}

    async with served.client() as client, httpx.AsyncClient(base_url=emulator_url) as emulator:
        await seed_conversation(emulator, "conv_alice", "alice", audio_size_bytes=2048)
        await seed_conversation(emulator, "conv_bob", "bob", audio_size_bytes=2048)

        async def call(label: str, method: str, url: str, **kwargs: object) -> httpx.Response:
            response = await client.request(method, url, **kwargs)  # type: ignore[arg-type]
            responses.append((label, response))
            return response

        alice = auth()
        # Every route, successful.
        minted = await call("mint", "GET", SIGNED_URL, params={"agent_id": AGENT}, headers=alice)
        webrtc = await call("token", "GET", TOKEN, params={"agent_id": AGENT}, headers=alice)
        await call("list", "GET", CONVERSATIONS, params={"page_size": "1"}, headers=alice)
        await call("details", "GET", f"{CONVERSATIONS}/conv_alice", headers=alice)
        await call("audio", "GET", f"{CONVERSATIONS}/conv_alice/audio", headers=alice)
        await call(
            "feedback",
            "POST",
            f"{CONVERSATIONS}/conv_alice/feedback",
            json={"feedback": "like"},
            headers=alice,
        )
        await call(
            "act-as",
            "GET",
            CONVERSATIONS,
            headers={**auth("svc", scopes="convai:history convai:act-as"), "X-On-Behalf-Of": "alice"},
        )
        await call(
            "delete",
            "DELETE",
            f"{CONVERSATIONS}/conv_alice",
            headers=auth(scopes="convai:history convai:delete"),
        )
        for path in ("/healthz", "/readyz", "/openapi.json"):
            await call(path, "GET", path)

        # Authentication and authorisation failures, each with a real token in the request.
        forged = mint_token("another-secret-0123456789abcdef0123456789", "mallory")
        expired = mint_token(TEST_JWT_SECRET, "alice", now=time.time() - 7200, ttl=60)
        unsigned = {"sub": "mallory", "exp": int(time.time()) + 60}
        none_alg = f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url(unsigned)}.forged-signature-bytes"
        await call("no token", "GET", CONVERSATIONS)
        await call("forged", "GET", CONVERSATIONS, headers=raw_auth(forged))
        await call("expired", "GET", CONVERSATIONS, headers=raw_auth(expired))
        await call("alg none", "GET", CONVERSATIONS, headers=raw_auth(none_alg))
        await call("truncated", "GET", CONVERSATIONS, headers=raw_auth(forged[:-5]))
        await call("no scope", "DELETE", f"{CONVERSATIONS}/conv_bob", headers=alice)
        await call("agent", "GET", SIGNED_URL, params={"agent_id": "agent_evil"}, headers=alice)
        await call("act-as denied", "GET", CONVERSATIONS, headers={**alice, "X-On-Behalf-Of": "bob"})
        await call("foreign", "GET", f"{CONVERSATIONS}/conv_bob", headers=alice)
        await call("missing", "GET", f"{CONVERSATIONS}/conv_nope/audio", headers=alice)
        await call("invalid", "GET", CONVERSATIONS, params={"user_id": "bob"}, headers=alice)
        await call(
            "too large",
            "POST",
            f"{CONVERSATIONS}/conv_bob/feedback",
            content=b"{" + b" " * 20000 + b"}",
            headers={**alice, "Content-Type": "application/json"},
        )
        await call(
            "media type",
            "POST",
            f"{CONVERSATIONS}/conv_bob/feedback",
            content=b"like",
            headers={**alice, "Content-Type": "text/plain"},
        )

        # Upstream failures on the token routes (their bodies carry the secrets upstream hands out).
        for fault in (
            {"kind": "status", "status": 500},
            {"kind": "rate_limit", "retry_after": 3},
            {"kind": "slow", "delay_seconds": 1.0},
            {"kind": "malformed_json"},
            {"kind": "drop"},
        ):
            await add_fault(emulator, endpoint="*", **fault)
            await call(
                f"upstream {fault['kind']}",
                "GET",
                SIGNED_URL,
                params={"agent_id": AGENT},
                headers=auth("carol"),
            )
        # Rate limited (6 mints per user), then the ledger down.
        for _ in range(7):
            last = await call(
                "rate limited", "GET", SIGNED_URL, params={"agent_id": AGENT}, headers=auth("dave")
            )
        assert last.status_code == 429
        await asyncio.to_thread(redis_server.stop)
        await call("redis down mint", "GET", SIGNED_URL, params={"agent_id": AGENT}, headers=auth("erin"))
        await call("redis down details", "GET", f"{CONVERSATIONS}/conv_bob", headers=auth("bob"))
        await call("readyz down", "GET", "/readyz")
        await asyncio.to_thread(redis_server.start)
        metrics = await call("metrics", "GET", "/metrics")
        upstream_log = (await emulator.get("/_emulator/requests")).json()

    # A gateway whose upstream key is wrong: upstream's 401 must not echo anything.
    with served_gateway(emulator_url, redis_url, ELEVENLABS_API_KEY=WRONG_KEY) as wrong:
        async with wrong.client() as client:
            rejected = await client.get(SIGNED_URL, params={"agent_id": AGENT}, headers=auth("frank"))
            responses.append(("wrong key", rejected))
        wrong_logs = "\n".join(wrong.logs)

    assert minted.status_code == 200 and webrtc.status_code == 200 and rejected.status_code == 502
    statuses = {label: r.status_code for label, r in responses}
    assert {statuses[k] for k in ("no token", "forged", "expired", "alg none", "truncated")} == {401}
    assert statuses["redis down mint"] == 503 and statuses["upstream slow"] == 504
    signed_url = minted.json()["signed_url"]
    (signature,) = parse_qs(urlsplit(signed_url).query)["conversation_signature"]
    webrtc_token = webrtc.json()["token"]
    secrets: dict[str, str] = {
        "xi-api-key": EMULATOR_API_KEY,
        "wrong xi-api-key": WRONG_KEY,
        "signed-url signature": signature,
        "webrtc token": webrtc_token,
    }
    for index, token in enumerate(sent_tokens):
        secrets[f"jwt #{index}"] = token
        secrets[f"jwt #{index} signature"] = token.rsplit(".", 1)[-1] if token.count(".") == 2 else token
    secrets = {name: value for name, value in secrets.items() if len(value) >= 8}

    logs = "\n".join(served.logs) + "\n" + wrong_logs
    assert len(logs) > 10_000, "the capture must have seen the DEBUG logs"
    assert "session_minted" in logs and "act_as" in logs
    leaks = [f"{name} in logs" for name, value in secrets.items() if value in logs]
    leaks += [f"{name} in /metrics" for name, value in secrets.items() if value in metrics.text]
    for label, response in responses:
        text = visible(response)
        for name, value in secrets.items():
            own = (label == "mint" and name == "signed-url signature") or (
                label == "token" and name == "webrtc token"
            )
            if value in text and not own:
                leaks.append(f"{name} in the {label} response")
    assert leaks == []
    # The caller's Authorization never goes upstream, and every upstream call carries only the api key.
    headers = [call["headers"] for call in upstream_log]
    assert headers and all("authorization" not in h for h in headers)
    assert all(not any(token in json.dumps(h) for token in sent_tokens) for h in headers)
    print(
        f"\nsecrets: {len(responses)} responses, {len(logs)} log characters, {len(secrets)} secrets, 0 leaks"
    )
