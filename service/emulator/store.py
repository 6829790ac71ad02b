"""The emulator's in-memory state, guarded by one lock so handlers on any thread or task see it consistently."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.emulator.faults import Fault
from service.emulator.model import Conversation

SortKey = tuple[int, str]
SESSION_TTL_SECONDS = 15 * 60


@dataclass(frozen=True)
class PendingSession:
    """A minted, not yet used conversation signature."""

    agent_id: str
    conversation_id: str | None
    expires_at: float


@dataclass
class EmulatorConfig:
    """Switches that change how the emulator answers."""

    signed_url_id_in_body: bool = False
    # Upstream's newer token responses (and the SDK's TokenResponseModel) carry a conversation_id; the
    # reference this project follows documents only `token`, so it is opt-in.
    token_conversation_id: bool = False

    def as_json(self) -> dict[str, bool]:
        """Return the switches as JSON."""
        return {
            "signed_url_id_in_body": self.signed_url_id_in_body,
            "token_conversation_id": self.token_conversation_id,
        }


def sort_key(conversation: Conversation) -> SortKey:
    """Return the key that orders conversations newest first (descending)."""
    return (conversation.start_time_unix_secs, conversation.conversation_id)


class EmulatorStore:
    """Conversations, pending signatures, queued faults, the request log and config, all in memory."""

    def __init__(self, clock: Callable[[], float], request_log_size: int = 500) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._conversations: dict[str, Conversation] = {}
        self._sessions: dict[str, PendingSession] = {}
        self._faults: list[Fault] = []
        self._requests: deque[dict[str, Any]] = deque(maxlen=request_log_size)
        self.config = EmulatorConfig()

    def reset(self) -> None:
        """Forget every conversation, signature, fault, logged request and config change."""
        with self._lock:
            self._conversations.clear()
            self._sessions.clear()
            self._faults.clear()
            self._requests.clear()
            self.config = EmulatorConfig()

    # Conversations

    def add(self, conversation: Conversation) -> bool:
        """Store a conversation; return False when its id is already taken."""
        with self._lock:
            if conversation.conversation_id in self._conversations:
                return False
            self._conversations[conversation.conversation_id] = conversation
            return True

    def details(self, conversation_id: str) -> dict[str, Any] | None:
        """Return the rendered details of a conversation, or None."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            return None if conversation is None else conversation.details()

    def audio_size(self, conversation_id: str) -> int | None:
        """Return the audio size of a conversation, or None when it does not exist."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            return None if conversation is None else conversation.audio_size_bytes

    def update(self, conversation_id: str, change: Callable[[Conversation], None]) -> bool:
        """Apply `change` to a stored conversation under the lock; return False when it does not exist."""
        with self._lock:
            conversation = self._conversations.get(conversation_id)
            if conversation is None:
                return False
            change(conversation)
            return True

    def delete(self, conversation_id: str) -> bool:
        """Remove a conversation; return False when it did not exist."""
        with self._lock:
            return self._conversations.pop(conversation_id, None) is not None

    def page(
        self,
        keep: Callable[[Conversation], bool],
        *,
        before: SortKey | None,
        limit: int,
        include_summary: bool,
    ) -> tuple[list[dict[str, Any]], SortKey | None]:
        """Return up to `limit` matching summary rows newest first after `before`, and the next page's key."""
        with self._lock:
            matching = sorted(
                (
                    c
                    for c in self._conversations.values()
                    if keep(c) and (before is None or sort_key(c) < before)
                ),
                key=sort_key,
                reverse=True,
            )
            rows = [c.summary(include_summary=include_summary) for c in matching[:limit]]
            next_key = sort_key(matching[limit - 1]) if len(matching) > limit else None
            return rows, next_key

    # Signed-URL sessions

    def add_session(self, signature: str, session: PendingSession) -> None:
        """Remember a minted signature and drop the expired ones."""
        now = self.clock()
        with self._lock:
            # Every session lives SESSION_TTL_SECONDS from its mint, so insertion order is expiry order:
            # dropping from the oldest end stops at the first live one (amortised O(1) per mint, where a full
            # scan made each mint slower the longer a load ran). claim_session checks expiry itself anyway.
            while self._sessions:
                oldest = next(iter(self._sessions))
                if self._sessions[oldest].expires_at > now:
                    break
                del self._sessions[oldest]
            self._sessions[signature] = session

    def pending_sessions(self) -> int:
        """Return how many minted signatures are kept (expired ones go as new ones arrive)."""
        with self._lock:
            return len(self._sessions)

    def claim_session(self, signature: str) -> PendingSession | None:
        """Consume a signature: return its session once if it exists and has not expired."""
        with self._lock:
            session = self._sessions.pop(signature, None)
        if session is None or session.expires_at <= self.clock():
            return None
        return session

    # Faults

    def add_fault(self, fault: Fault) -> None:
        """Queue a fault behind the ones already queued."""
        with self._lock:
            self._faults.append(fault)

    def take_fault(self, endpoint: str) -> Fault | None:
        """Consume one use of the first queued fault matching `endpoint`, if any."""
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.matches(endpoint):
                    fault.times -= 1
                    if fault.times <= 0:
                        del self._faults[index]
                    return fault
            return None

    def faults(self) -> list[dict[str, Any]]:
        """Return the queued faults."""
        with self._lock:
            return [fault.as_json() for fault in self._faults]

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        with self._lock:
            self._faults.clear()

    # Request log

    def log_request(self, entry: dict[str, Any]) -> None:
        """Append an upstream request to the bounded log."""
        with self._lock:
            self._requests.append(entry)

    def requests(self) -> list[dict[str, Any]]:
        """Return the logged requests, oldest first."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        """Empty the request log."""
        with self._lock:
            self._requests.clear()
