"""The emulator's in-memory store: pending signed-URL sessions expire oldest first."""

from __future__ import annotations

from service.emulator.store import SESSION_TTL_SECONDS, EmulatorStore, PendingSession


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def _mint(store: EmulatorStore, clock: _Clock, signature: str) -> None:
    store.add_session(
        signature, PendingSession("agent_demo", f"conv_{signature}", clock.now + SESSION_TTL_SECONDS)
    )


def test_expired_sessions_are_dropped_when_new_ones_are_minted() -> None:
    clock = _Clock()
    store = EmulatorStore(clock)
    for second, signature in enumerate(("a", "b", "c")):
        clock.now = 1_000.0 + second
        _mint(store, clock, signature)
    assert store.pending_sessions() == 3
    clock.now = 1_000.0 + SESSION_TTL_SECONDS + 1  # a and b have expired, c has not
    _mint(store, clock, "d")
    assert store.pending_sessions() == 2
    assert store.claim_session("c") is not None
    assert store.claim_session("d") is not None
    assert store.claim_session("a") is None


def test_a_session_is_claimed_once_and_never_after_it_expires() -> None:
    clock = _Clock()
    store = EmulatorStore(clock)
    _mint(store, clock, "once")
    _mint(store, clock, "late")
    claimed = store.claim_session("once")
    assert claimed is not None and claimed.conversation_id == "conv_once"
    assert store.claim_session("once") is None
    clock.now += SESSION_TTL_SECONDS
    assert store.claim_session("late") is None


def test_sustained_minting_keeps_only_the_live_window() -> None:
    clock = _Clock()
    store = EmulatorStore(clock)
    # One mint per second for three lifetimes: at most one lifetime's worth stays pending.
    for index in range(3 * int(SESSION_TTL_SECONDS)):
        clock.now = 1_000.0 + index
        _mint(store, clock, f"s{index}")
    assert store.pending_sessions() == int(SESSION_TTL_SECONDS)
