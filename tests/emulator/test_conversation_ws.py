"""The conversation WebSocket at the signed URL, driven by the `websockets` client over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.emulator.conftest import AUTH, Clock
from tests.support.servers import ServedApp


@pytest.fixture
async def http(served: ServedApp) -> AsyncIterator[httpx.AsyncClient]:
    """Yield a client for the served emulator."""
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=5) as client:
        yield client


async def signed_url(
    http: httpx.AsyncClient, *, include_id: bool = True, agent_id: str = "agent_demo"
) -> str:
    """Mint a signed URL through the upstream endpoint."""
    params = {"agent_id": agent_id, "include_conversation_id": "true" if include_id else "false"}
    response = await http.get("/v1/convai/conversation/get-signed-url", params=params)
    url: str = response.json()["signed_url"]
    return url


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """Return the next server event."""
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout=5))
    return event


async def details_when(http: httpx.AsyncClient, conversation_id: str, status: str) -> dict[str, Any]:
    """Poll the details until the server has recorded `status` (the close is processed asynchronously)."""
    deadline = time.monotonic() + 5
    while True:
        details: dict[str, Any] = (await http.get(f"/v1/convai/conversations/{conversation_id}")).json()
        if details.get("status") == status or time.monotonic() > deadline:
            return details
        await asyncio.sleep(0.01)


async def test_conversation_is_recorded_with_the_clients_user_id(http: httpx.AsyncClient) -> None:
    url = await signed_url(http)
    minted_id = parse_qs(urlsplit(url).query)["conversation_id"][0]
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "conversation_initiation_client_data", "user_id": "alice"}))
        metadata = await receive(ws)
        assert metadata == {
            "type": "conversation_initiation_metadata",
            "conversation_initiation_metadata_event": {
                "conversation_id": minted_id,
                "agent_output_audio_format": "pcm_16000",
                "user_input_audio_format": "pcm_16000",
            },
        }
        await ws.send(json.dumps({"type": "user_message", "text": "Where is my order?"}))
        reply = await receive(ws)
        assert reply["type"] == "agent_response"
        assert "Where is my order?" in reply["agent_response_event"]["agent_response"]
        for ignored in ("user_audio_chunk", "user_activity", "contextual_update", "pong"):
            await ws.send(
                json.dumps({"type": ignored, "user_audio_chunk": "AAAA", "text": "x", "event_id": 1})
            )
        await ws.send("not json")
        await ws.send(json.dumps({"type": "ping", "ping_event": {"event_id": 42}}))
        assert await receive(ws) == {"type": "pong", "event_id": 42}
        live = (await http.get("/v1/convai/conversations", params={"user_id": "alice"})).json()[
            "conversations"
        ]
        assert [(row["conversation_id"], row["status"]) for row in live] == [(minted_id, "in-progress")]
    details = await details_when(http, minted_id, "done")
    assert details["status"] == "done"
    assert (details["agent_id"], details["user_id"]) == ("agent_demo", "alice")
    assert [(turn["role"], turn["message"]) for turn in details["transcript"]] == [
        ("user", "Where is my order?"),
        ("agent", reply["agent_response_event"]["agent_response"]),
    ]


async def test_user_id_may_come_from_dynamic_variables(http: httpx.AsyncClient) -> None:
    async with connect(await signed_url(http, include_id=False)) as ws:
        init = {
            "type": "conversation_initiation_client_data",
            "dynamic_variables": {"user_id": "bob", "secret__token": "t"},
        }
        await ws.send(json.dumps(init))
        conversation_id = (await receive(ws))["conversation_initiation_metadata_event"]["conversation_id"]
    details = await details_when(http, conversation_id, "done")
    assert details["user_id"] == "bob"
    assert details["conversation_initiation_client_data"]["dynamic_variables"]["secret__token"] == "t"


async def test_first_message_other_than_client_data_is_still_answered(http: httpx.AsyncClient) -> None:
    async with connect(await signed_url(http)) as ws:
        await ws.send(json.dumps({"type": "user_message", "text": "hello"}))
        assert (await receive(ws))["type"] == "conversation_initiation_metadata"
        assert (await receive(ws))["type"] == "agent_response"


async def expect_policy_violation(url: str) -> None:
    """Connect to `url` and assert the server closes with code 1008."""
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008


async def test_a_signature_works_only_once(http: httpx.AsyncClient) -> None:
    url = await signed_url(http)
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "conversation_initiation_client_data", "user_id": "alice"}))
        await receive(ws)
    await expect_policy_violation(url)


@pytest.mark.parametrize("mutate", ["signature", "agent", "missing"])
async def test_a_forged_signature_is_a_policy_violation(http: httpx.AsyncClient, mutate: str) -> None:
    url = await signed_url(http)
    query = parse_qs(urlsplit(url).query)
    base = url.split("?")[0]
    if mutate == "signature":
        url = f"{base}?agent_id=agent_demo&conversation_signature=forged"
    elif mutate == "agent":
        url = f"{base}?agent_id=agent_other&conversation_signature={query['conversation_signature'][0]}"
    else:
        url = f"{base}?agent_id=agent_demo"
    await expect_policy_violation(url)


async def test_an_expired_signature_is_a_policy_violation(http: httpx.AsyncClient, clock: Clock) -> None:
    url = await signed_url(http)
    clock.advance(15 * 60 + 1)
    await expect_policy_violation(url)
