"""A minimal conversation WebSocket at the signed URL: it greets, echoes text turns and records the call."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from service.emulator.model import Conversation
from service.emulator.samples import build_conversation, make_turn, new_conversation_id
from service.emulator.store import EmulatorStore

POLICY_VIOLATION = 1008


class _Call:
    """One live conversation: replies to client events and appends the exchange to the stored transcript."""

    def __init__(
        self, websocket: WebSocket, store: EmulatorStore, conversation_id: str, started: float
    ) -> None:
        self.websocket = websocket
        self.store = store
        self.conversation_id = conversation_id
        self.started = started

    def _elapsed(self) -> int:
        return max(0, int(self.store.clock() - self.started))

    def _append(self, turn: dict[str, Any]) -> None:
        self.store.update(self.conversation_id, lambda c: c.transcript.append(turn))

    async def handle(self, event: dict[str, Any]) -> None:
        """Answer one client event."""
        kind = event.get("type")
        if kind == "user_message" and isinstance(event.get("text"), str):
            text = event["text"]
            reply = f"You said: {text}"
            self._append(make_turn("user", text, self._elapsed(), source_medium="text"))
            await self.websocket.send_json(
                {"type": "agent_response", "agent_response_event": {"agent_response": reply}}
            )
            self._append(make_turn("agent", reply, self._elapsed(), source_medium="text"))
        elif kind == "ping":
            ping_event = event.get("ping_event")
            event_id = ping_event.get("event_id") if isinstance(ping_event, dict) else None
            await self.websocket.send_json({"type": "pong", "event_id": event_id})
        # Audio chunks, activity, contextual updates, pongs and unknown events need no answer.

    def finish(self) -> None:
        """Mark the stored conversation done with its final duration."""

        def close(conversation: Conversation) -> None:
            users = sum(1 for turn in conversation.transcript if turn.get("role") == "user")
            conversation.status = "done"
            conversation.call_successful = "success"
            conversation.call_duration_secs = self._elapsed()
            conversation.transcript_summary = f"A text conversation with {users} user message(s)."
            conversation.call_summary_title = "Text conversation"

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


async def run_conversation(websocket: WebSocket, store: EmulatorStore, new_id: Callable[[], str]) -> None:
    """Serve one conversation WebSocket: check the signature, then talk until the client closes."""
    signature = websocket.query_params.get("conversation_signature", "")
    agent_id = websocket.query_params.get("agent_id")
    await websocket.accept()
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
    store.add(conversation)
    call = _Call(websocket, store, conversation_id, started)
    try:
        await websocket.send_json(
            {
                "type": "conversation_initiation_metadata",
                "conversation_initiation_metadata_event": {
                    "conversation_id": conversation_id,
                    "agent_output_audio_format": "pcm_16000",
                    "user_input_audio_format": "pcm_16000",
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
