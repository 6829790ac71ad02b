"""The ownership decision of each mode, and the helpers the routes share."""

from __future__ import annotations

import pytest

from service.auth import Principal
from service.errors import NotFound, error_response
from service.ledger import LedgerEntry
from service.ownership import agent_visible, conversation_not_found, grants, upstream_user_id
from service.settings import OWNERSHIP_MODES, OwnershipMode

ALICE_ENTRY = LedgerEntry(user_id="alice", agent_id="agent_demo", minted_at=1_700_000_000)
WORKSPACE = frozenset({"agent_demo", "agent_other"})

# (mode, ledger entry, upstream user_id) -> does alice own it?  Every combination, written out.
CASES: list[tuple[OwnershipMode, LedgerEntry | None, str | None, bool]] = [
    # ledger_or_user_id: the ledger decides when it knows the conversation, else upstream user_id.
    ("ledger_or_user_id", ALICE_ENTRY, "alice", True),
    ("ledger_or_user_id", ALICE_ENTRY, "bob", True),
    ("ledger_or_user_id", ALICE_ENTRY, None, True),
    ("ledger_or_user_id", None, "alice", True),
    ("ledger_or_user_id", None, "bob", False),
    ("ledger_or_user_id", None, None, False),
    # ledger: the entry only.
    ("ledger", ALICE_ENTRY, "alice", True),
    ("ledger", ALICE_ENTRY, "bob", True),
    ("ledger", None, "alice", False),
    ("ledger", None, None, False),
    # user_id: upstream user_id only.
    ("user_id", ALICE_ENTRY, "alice", True),
    ("user_id", ALICE_ENTRY, "bob", False),
    ("user_id", None, "alice", True),
    ("user_id", None, None, False),
]


@pytest.mark.parametrize(("mode", "entry", "upstream", "expected"), CASES)
def test_grants_follows_the_mode_table(
    mode: OwnershipMode, entry: LedgerEntry | None, upstream: str | None, expected: bool
) -> None:
    assert grants(mode, "alice", entry, upstream) is expected


@pytest.mark.parametrize("mode", OWNERSHIP_MODES)
def test_spoofed_upstream_user_id_never_beats_a_ledger_entry(mode: OwnershipMode) -> None:
    # Minted for alice; bob's client claimed user_id=bob upstream.
    expected = mode == "user_id"
    assert grants(mode, "bob", ALICE_ENTRY, "bob") is expected


@pytest.mark.parametrize("mode", OWNERSHIP_MODES)
def test_an_empty_caller_owns_nothing(mode: OwnershipMode) -> None:
    assert grants(mode, "", LedgerEntry("", "agent_demo", 0), "") is False


def test_upstream_user_id_reads_top_level_then_client_data_and_ignores_junk() -> None:
    assert upstream_user_id({"user_id": "alice"}) == "alice"
    assert (
        upstream_user_id({"user_id": None, "conversation_initiation_client_data": {"user_id": "bob"}})
        == "bob"
    )
    assert upstream_user_id({"user_id": 7}) is None
    assert upstream_user_id({"user_id": ""}) is None
    assert upstream_user_id({"conversation_initiation_client_data": "x"}) is None
    assert upstream_user_id({}) is None


def _principal(agents: frozenset[str] | None) -> Principal:
    return Principal(
        user_id="alice", scopes=frozenset({"convai:history"}), agents=agents, issuer=None, expires_at=0
    )


def test_agent_visible_only_narrows_tokens_with_an_agents_claim() -> None:
    unrestricted = _principal(None)
    assert agent_visible(unrestricted, WORKSPACE, "agent_demo")
    assert agent_visible(unrestricted, WORKSPACE, "agent_retired")
    narrowed = _principal(frozenset({"agent_demo"}))
    assert agent_visible(narrowed, WORKSPACE, "agent_demo")
    assert not agent_visible(narrowed, WORKSPACE, "agent_other")
    assert not agent_visible(narrowed, WORKSPACE, None)
    outside_workspace = _principal(frozenset({"agent_x"}))
    assert not agent_visible(outside_workspace, WORKSPACE, "agent_x")


def test_not_found_is_one_body_for_every_reason() -> None:
    first, second = conversation_not_found(), conversation_not_found()
    assert isinstance(first, NotFound)
    assert error_response(first).body == error_response(second).body
    assert error_response(first).status_code == 404
