"""The parts of the conversation protocol `@elevenlabs/client` relies on: subprotocol, voice turns, feedback."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from service.emulator.conversation_ws import BYTES_PER_SECOND
from tests.emulator.conftest import AUTH
from tests.support.servers import ServedApp


@pytest.fixture
async def http(served: ServedApp) -> AsyncIterator[httpx.AsyncClient]:
    """Yield a client for the served emulator."""
    async with httpx.AsyncClient(base_url=served.url, headers=AUTH, timeout=5) as client:
        yield client


async def signed_url(http: httpx.AsyncClient) -> str:
    """Mint a signed URL through the upstream endpoint."""
    response = await http.get("/v1/convai/conversation/get-signed-url", params={"agent_id": "agent_demo"})
    url: str = response.json()["signed_url"]
    return url


async def receive(ws: ClientConnection) -> dict[str, Any]:
    """Return the next server event."""
    event: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), timeout=5))
    return event


async def start(ws: ClientConnection, **client_data: Any) -> str:
    """Send the SDK's opening event and return the conversation id from the metadata."""
    await ws.send(json.dumps({"type": "conversation_initiation_client_data", **client_data}))
    metadata = await receive(ws)
    conversation_id: str = metadata["conversation_initiation_metadata_event"]["conversation_id"]
    return conversation_id


async def details_when_done(http: httpx.AsyncClient, conversation_id: str) -> dict[str, Any]:
    """Poll the details until the server has processed the close (it happens after the client returns)."""
    deadline = time.monotonic() + 5
    while True:
        details: dict[str, Any] = (await http.get(f"/v1/convai/conversations/{conversation_id}")).json()
        if details.get("status") == "done" or time.monotonic() > deadline:
            return details
        await asyncio.sleep(0.01)


async def test_the_convai_subprotocol_is_selected_when_the_client_offers_it(http: httpx.AsyncClient) -> None:
    # Browsers fail a handshake whose offered subprotocol the server does not select.
    async with connect(await signed_url(http), subprotocols=["convai"]) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "convai"
    async with connect(await signed_url(http)) as ws:
        assert ws.subprotocol is None


async def test_a_second_of_audio_makes_a_voice_turn_with_transcript_reply_and_audio(
    http: httpx.AsyncClient,
) -> None:
    chunk = base64.b64encode(bytes(BYTES_PER_SECOND // 4)).decode()
    async with connect(await signed_url(http)) as ws:
        conversation_id = await start(
            ws, user_id="alice", source_info={"source": "js_sdk", "version": "1.25.0"}
        )
        for _ in range(3):
            await ws.send(json.dumps({"user_audio_chunk": chunk}))
        # Three quarters of a second is not a turn yet: the next event is the answer to this ping.
        await ws.send(json.dumps({"type": "ping", "ping_event": {"event_id": 7}}))
        assert await receive(ws) == {"type": "pong", "event_id": 7}
        await ws.send(json.dumps({"user_audio_chunk": chunk}))
        transcript, reply, audio = await receive(ws), await receive(ws), await receive(ws)
        await ws.send(json.dumps({"user_audio_chunk": "not base64!"}))
        await ws.send(json.dumps({"type": "feedback", "score": "like", "event_id": 2}))
    assert transcript == {
        "type": "user_transcript",
        "user_transcription_event": {"user_transcript": "(1.0 s of speech)", "event_id": 1},
    }
    assert reply == {
        "type": "agent_response",
        "agent_response_event": {"agent_response": "I heard 1.0 seconds of audio.", "event_id": 2},
    }
    assert audio["type"] == "audio" and audio["audio_event"]["event_id"] == 2
    pcm = base64.b64decode(audio["audio_event"]["audio_base_64"])
    assert len(pcm) == BYTES_PER_SECOND // 4 and any(pcm)
    details = await details_when_done(http, conversation_id)
    assert details["status"] == "done"
    assert details["metadata"]["feedback"]["overall_score"] == "like"
    assert details["conversation_initiation_client_data"]["source_info"]["source"] == "js_sdk"
    assert details["analysis"]["call_summary_title"] == "Voice conversation"
    assert [(t["role"], t["message"], t["source_medium"]) for t in details["transcript"]] == [
        ("user", "(1.0 s of speech)", "audio"),
        ("agent", "I heard 1.0 seconds of audio.", "audio"),
    ]


async def test_text_replies_carry_increasing_event_ids_and_bad_feedback_is_ignored(
    http: httpx.AsyncClient,
) -> None:
    async with connect(await signed_url(http)) as ws:
        conversation_id = await start(ws, user_id="bob", source_info={"source": "not_a_real_sdk"})
        ids = []
        for text in ("one", "two"):
            await ws.send(json.dumps({"type": "user_message", "text": text}))
            ids.append((await receive(ws))["agent_response_event"]["event_id"])
        await ws.send(json.dumps({"type": "feedback", "score": "dislike", "event_id": ids[-1]}))
        await ws.send(json.dumps({"type": "feedback", "score": "meh", "event_id": ids[-1]}))
    assert ids == [1, 2]
    details = await details_when_done(http, conversation_id)
    assert details["metadata"]["feedback"]["overall_score"] == "dislike"
    # An unknown source is not recorded: upstream's ConversationInitiationSource is an enum.
    assert details["conversation_initiation_client_data"]["source_info"]["source"] == "js_sdk"
    assert details["analysis"]["call_summary_title"] == "Text conversation"
