"""The conversation WebSocket at the signed URL, speaking enough of the real protocol for `@elevenlabs/client`.

The event shapes follow the AsyncAPI contracts of `@elevenlabs/types` (0.23): the client opens with
`conversation_initiation_client_data`, the server answers `conversation_initiation_metadata`; then text turns
(`user_message` -> `agent_response`) and voice turns (`{"user_audio_chunk": base64 PCM}` -> `user_transcript`,
`agent_response`, `audio`), in-call `feedback`, and `ping`/`pong`. The call is recorded as a conversation with
the client's `user_id`, in progress while the socket is open and done once it closes.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from service.emulator.model import FEEDBACK_SCORES, Conversation
from service.emulator.samples import build_conversation, make_turn, new_conversation_id
from service.emulator.store import EmulatorStore

POLICY_VIOLATION = 1008
# The browser client asks for this subprotocol; Chromium fails the handshake unless the server selects it.
SUBPROTOCOL = "convai"
AUDIO_FORMAT = "pcm_16000"
SAMPLE_RATE = 16_000
BYTES_PER_SECOND = SAMPLE_RATE * 2  # 16-bit mono PCM
# One second of caller audio makes one voice turn: short enough for a test, long enough to be speech-like.
VOICE_TURN_BYTES = BYTES_PER_SECOND
# ConversationInitiationSource in the upstream schema; anything else is recorded as the default.
KNOWN_SOURCES = frozenset(
    {
        "unknown", "android_sdk", "node_js_sdk", "react_native_sdk", "react_sdk", "js_sdk", "python_sdk",
        "widget", "sip_trunk", "twilio", "genesys", "swift_sdk", "whatsapp", "flutter_sdk",
    }
)  # fmt: skip


def agent_tone(seconds: float = 0.25, frequency: float = 440.0) -> str:
    """Return a short sine tone as base64 16-bit mono PCM at 16 kHz: the agent's spoken reply."""
    count = int(SAMPLE_RATE * seconds)
    samples = (int(8000 * math.sin(2 * math.pi * frequency * i / SAMPLE_RATE)) for i in range(count))
    return base64.b64encode(struct.pack(f"<{count}h", *samples)).decode()


class _Call:
    """One live conversation: replies to client events and appends the exchange to the stored transcript."""

    def __init__(
        self, websocket: WebSocket, store: EmulatorStore, conversation_id: str, started: float
    ) -> None:
        self.websocket = websocket
        self.store = store
        self.conversation_id = conversation_id
        self.started = started
        self.event_id = 0
        self.audio_bytes = 0
        self.voice_turns = 0
        self.text_turns = 0

    def _elapsed(self) -> int:
        return max(0, int(self.store.clock() - self.started))

    def _append(self, turn: dict[str, Any]) -> None:
        self.store.update(self.conversation_id, lambda c: c.transcript.append(turn))

    def _next_event_id(self) -> int:
        self.event_id += 1
        return self.event_id

    async def _reply(self, text: str, medium: str) -> None:
        event_id = self._next_event_id()
        await self.websocket.send_json(
            {"type": "agent_response", "agent_response_event": {"agent_response": text, "event_id": event_id}}
        )
        self._append(make_turn("agent", text, self._elapsed(), source_medium=medium))
        if medium == "audio":
            await self.websocket.send_json(
                {"type": "audio", "audio_event": {"audio_base_64": agent_tone(), "event_id": event_id}}
            )

    async def _user_text(self, text: str) -> None:
        self.text_turns += 1
        self._append(make_turn("user", text, self._elapsed(), source_medium="text"))
        await self._reply(f"You said: {text}", "text")

    async def _user_audio(self, chunk: str) -> None:
        try:
            self.audio_bytes += len(base64.b64decode(chunk, validate=True))
        except (binascii.Error, ValueError):
            return
        if self.audio_bytes < VOICE_TURN_BYTES:
            return
        seconds = self.audio_bytes / BYTES_PER_SECOND
        self.audio_bytes = 0
        self.voice_turns += 1
        heard = f"({seconds:.1f} s of speech)"
        await self.websocket.send_json(
            {
                "type": "user_transcript",
                "user_transcription_event": {"user_transcript": heard, "event_id": self._next_event_id()},
            }
        )
        self._append(make_turn("user", heard, self._elapsed(), source_medium="audio"))
        await self._reply(f"I heard {seconds:.1f} seconds of audio.", "audio")

    def _feedback(self, score: Any) -> None:
        if score is None or score in FEEDBACK_SCORES:

            def change(conversation: Conversation) -> None:
                conversation.feedback_score = score

            self.store.update(self.conversation_id, change)

    async def handle(self, event: dict[str, Any]) -> None:
        """Answer one client event."""
        kind = event.get("type")
        if isinstance(event.get("user_audio_chunk"), str):
            # The SDK sends audio as a bare {"user_audio_chunk": ...} object (UserAudio has no `type`).
            await self._user_audio(event["user_audio_chunk"])
        elif kind == "user_message" and isinstance(event.get("text"), str):
            await self._user_text(event["text"])
        elif kind == "feedback":
            self._feedback(event.get("score"))
        elif kind == "ping":
            # Upstream pings and the client pongs; a client ping is answered too, for simple test clients.
            ping_event = event.get("ping_event")
            event_id = ping_event.get("event_id") if isinstance(ping_event, dict) else None
            await self.websocket.send_json({"type": "pong", "event_id": event_id})
        # Activity, contextual updates, pongs and unknown events need no answer.

    def finish(self) -> None:
        """Mark the stored conversation done with its final duration."""
        kind = "voice" if self.voice_turns else "text"

        def close(conversation: Conversation) -> None:
            users = sum(1 for turn in conversation.transcript if turn.get("role") == "user")
            conversation.status = "done"
            conversation.call_successful = "success"
            conversation.call_duration_secs = self._elapsed()
            conversation.transcript_summary = f"A {kind} conversation with {users} user message(s)."
            conversation.call_summary_title = f"{kind.capitalize()} conversation"

        self.store.update(self.conversation_id, close)


async def _receive_event(websocket: WebSocket) -> dict[str, Any] | None:
    """Return the next client event as a dict, None for a frame that is not a JSON object; raise on close."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    raw = message.get("text") or message.get("bytes") or ""
    try:
        event = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return event if isinstance(event, dict) else None


def _client_user_id(client_data: dict[str, Any]) -> str | None:
    user_id = client_data.get("user_id")
    variables = client_data.get("dynamic_variables")
    if user_id is None and isinstance(variables, dict):
        user_id = variables.get("user_id")
    return None if user_id is None else str(user_id)


def _client_source(client_data: dict[str, Any]) -> str | None:
    source_info = client_data.get("source_info")
    source = source_info.get("source") if isinstance(source_info, dict) else None
    return source if source in KNOWN_SOURCES else None


async def run_conversation(websocket: WebSocket, store: EmulatorStore, new_id: Callable[[], str]) -> None:
    """Serve one conversation WebSocket: check the signature, then talk until the client closes."""
    signature = websocket.query_params.get("conversation_signature", "")
    agent_id = websocket.query_params.get("agent_id")
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    session = store.claim_session(signature) if signature else None
    if session is None or (agent_id is not None and agent_id != session.agent_id):
        await websocket.close(code=POLICY_VIOLATION, reason="Invalid or expired conversation signature")
        return
    conversation_id = session.conversation_id or new_id()
    try:
        first = await _receive_event(websocket)
    except WebSocketDisconnect:
        return
    client_data = (
        first if first is not None and first.get("type") == "conversation_initiation_client_data" else {}
    )
    variables = client_data.get("dynamic_variables")
    started = store.clock()
    conversation = build_conversation(
        {
            "conversation_id": conversation_id,
            "agent_id": session.agent_id,
            "user_id": _client_user_id(client_data),
            "start_time_unix_secs": int(started),
            "call_duration_secs": 0,
            "status": "in-progress",
            "call_successful": "unknown",
            "transcript": [],
            "transcript_summary": "",
            "call_summary_title": None,
            "dynamic_variables": dict(variables) if isinstance(variables, dict) else {},
        },
        now=started,
        new_id=new_conversation_id,
    )
    source = _client_source(client_data)
    if source is not None:
        conversation.source = source
    store.add(conversation)
    call = _Call(websocket, store, conversation_id, started)
    try:
        await websocket.send_json(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": conversation_id,
                    "agent_output_audio_format": AUDIO_FORMAT,
                    "user_input_audio_format": AUDIO_FORMAT,
                },
            }
        )
        if first is not None and not client_data:
            await call.handle(first)
        while True:
            event = await _receive_event(websocket)
            if event is not None:
                await call.handle(event)
    except WebSocketDisconnect:
        pass
    finally:
        call.finish()
