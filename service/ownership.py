"""Who may see a conversation (DESIGN section 3): the pure decision and the fetch that applies it.

The upstream `user_id` of a conversation is chosen by the client that started it, so on its own it proves
nothing; the ownership ledger (written when the gateway mints a signed URL) does. `grants` combines the two
per `OWNERSHIP_MODE`. `owned_conversation` (details) always asks upstream before deciding, so a missing and
a foreign conversation cost about the same time and end in the same 404. `authorize_conversation` (audio,
feedback, delete) skips that upstream call only when the ledger alone grants the caller the conversation:
every refusal still goes through the same upstream call, so refusals keep one shape whatever their cause.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from service.errors import NotFound, UpstreamError
from service.settings import OwnershipMode
from service.validation import conversation_id as valid_conversation_id

if TYPE_CHECKING:
    from service.auth import Principal
    from service.ledger import LedgerEntry
    from service.state import Services

NOT_FOUND_DETAIL = "conversation not found"


def conversation_not_found() -> NotFound:
    """Return the one 404 used for missing and foreign conversations alike (same body, same headers)."""
    return NotFound(NOT_FOUND_DETAIL)


@contextlib.contextmanager
def uniform_not_found() -> Iterator[None]:
    """Turn an upstream 404 raised in the block into the one conversation 404."""
    # Also for an action on a conversation the ledger granted that upstream does not know (a URL minted but
    # never used, or one deleted meanwhile): its 404 must be the same as every other "not found".
    try:
        yield
    except NotFound as exc:
        raise conversation_not_found() from exc


def grants(
    mode: OwnershipMode, caller: str, ledger_entry: LedgerEntry | None, upstream_user_id: str | None
) -> bool:
    """Decide whether `caller` owns a conversation, given its ledger entry and its upstream `user_id`."""
    if not caller:
        return False
    if mode == "user_id":
        return upstream_user_id == caller
    if ledger_entry is not None:
        # The ledger is authoritative when it knows the conversation: a spoofed upstream user_id gains nothing.
        return ledger_entry.user_id == caller
    if mode == "ledger":
        return False
    return upstream_user_id == caller


def agent_visible(principal: Principal, allowed_agent_ids: frozenset[str], agent_id: Any) -> bool:
    """Tell whether a conversation of `agent_id` may be shown to a token that may narrow the agents."""
    if principal.agents is None:
        return True
    return isinstance(agent_id, str) and agent_id in principal.allowed_agents(allowed_agent_ids)


def upstream_user_id(details: Mapping[str, Any]) -> str | None:
    """Return the upstream `user_id` of conversation details, or None when absent or not a string."""
    value = details.get("user_id")
    if value is None:
        client_data = details.get("conversation_initiation_client_data")
        if isinstance(client_data, Mapping):
            value = client_data.get("user_id")
    return value if isinstance(value, str) and value else None


async def authorize_conversation(
    services: Services, principal: Principal, conversation_id: str
) -> str | None:
    """Check that the caller may act on a conversation; return its agent id (uniform NotFound otherwise)."""
    valid_conversation_id(conversation_id)
    settings = services.settings
    entry = await _ledger_entry(services, conversation_id)
    # A ledger entry alone decides (DESIGN section 3), and it names the agent the URL was minted for:
    # the owner's audio, feedback or delete costs one upstream call instead of two.
    if (
        entry is not None
        and grants(settings.ownership_mode, principal.user_id, entry, None)
        and agent_visible(principal, settings.allowed_agent_ids, entry.agent_id)
    ):
        return entry.agent_id
    agent_id = (await _granted_details(services, principal, conversation_id, entry)).get("agent_id")
    return agent_id if isinstance(agent_id, str) else None


async def owned_conversation(
    services: Services, principal: Principal, conversation_id: str
) -> dict[str, Any]:
    """Return the upstream details of the caller's conversation, or raise the uniform NotFound."""
    valid_conversation_id(conversation_id)
    # The ledger is read first (a failure is a 503: fail closed) and upstream is always asked afterwards,
    # so "foreign" and "missing" take the same path and time.
    entry = await _ledger_entry(services, conversation_id)
    return await _granted_details(services, principal, conversation_id, entry)


async def _ledger_entry(services: Services, conversation_id: str) -> LedgerEntry | None:
    if services.settings.ownership_mode == "user_id":
        return None
    return await services.ledger.lookup(conversation_id)


async def _granted_details(
    services: Services, principal: Principal, conversation_id: str, entry: LedgerEntry | None
) -> dict[str, Any]:
    settings = services.settings
    with uniform_not_found():
        details = await services.upstream.get_conversation(conversation_id)
    if not isinstance(details, dict):
        raise UpstreamError("upstream returned conversation details that are not an object")
    if details.get("conversation_id", conversation_id) != conversation_id:
        raise UpstreamError("upstream returned details of another conversation")
    if not grants(settings.ownership_mode, principal.user_id, entry, upstream_user_id(details)):
        raise conversation_not_found()
    if not agent_visible(principal, settings.allowed_agent_ids, details.get("agent_id")):
        raise conversation_not_found()
    return details
