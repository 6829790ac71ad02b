"""The two token routes: a signed WebSocket URL (recorded in the ownership ledger) and a WebRTC token.

Both answer with `Cache-Control: no-store` (also on errors raised here), check the scope and the agent
before any upstream call, and forward nothing but `agent_id` and an optional `branch_id` upstream.

`GET /v1/convai/conversation/get-signed-url?agent_id=...[&branch_id=...]` returns
`{"signed_url", "conversation_id", "expires_at"}`; `expires_at` is unix seconds (an integer): upstream
signed URLs are valid for 15 minutes. The conversation is recorded as the caller's before the URL is
handed out; if that write fails the request fails (503) - a URL whose conversation nobody owns is never
returned. The upstream `include_conversation_id=true` is accepted (the gateway always asks it upstream);
`false` is a 422, since the gateway cannot hand out the reusable signature it would mean.

`GET /v1/convai/conversation/token?agent_id=...[&branch_id=...]` returns `{"token"}`. The upstream
`participant_name` is always the caller's user id; `participant_name` and `user_id` query parameters
are accepted for compatibility with clients written against the upstream API, and ignored. When upstream
also names the conversation (newer API versions), it is recorded like a signed URL's and returned as
`conversation_id`.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from service import validation
from service.auth import Principal
from service.errors import InvalidRequest, UpstreamError, headers_on_error, upstream_not_found_is_an_error
from service.ledger import LedgerEntry
from service.observability import audit, current_request_id
from service.ratelimit import Decision, enforce
from service.responses import JsonAnswer
from service.settings import SESSION_SCOPE
from service.state import Services, principal_of, services_of

SIGNED_URL_ROUTE = "/v1/convai/conversation/get-signed-url"
WEBRTC_TOKEN_ROUTE = "/v1/convai/conversation/token"  # noqa: S105 - a path, not a secret
SIGNED_URL_LIFETIME_SECONDS = 15 * 60
NO_STORE_HEADERS: Mapping[str, str] = {"Cache-Control": "no-store", "Pragma": "no-cache"}

# Sent by clients written against the upstream API; the gateway decides both itself.
IGNORED_TOKEN_PARAMS = ("participant_name", "user_id")
# Documented upstream on the signed-URL route and sent by the official SDKs; the gateway always sets it to true.
INCLUDE_ID_PARAM = "include_conversation_id"

Handler = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _Admitted:
    """A token request that passed scope, parameters, agent allowlist and rate limit, in that order."""

    services: Services
    principal: Principal
    agent_id: str
    branch_id: str | None
    decision: Decision
    headers: dict[str, str]  # the decision's RateLimit headers, rendered once per request


async def _admit(request: Request, *, ignored: tuple[str, ...] = (), include_id: bool = False) -> _Admitted:
    services, principal = services_of(request), principal_of(request)
    principal.require_scope(SESSION_SCOPE)
    optional = (INCLUDE_ID_PARAM,) if include_id else ()
    singles, _ = validation.strict_query(
        validation.query_params(request.scope["query_string"]),
        single=("agent_id", "branch_id", *optional),
        ignored=ignored,
    )
    agent = validation.agent_id(singles.get("agent_id"))
    branch = _optional_id(singles, "branch_id")
    if include_id and validation.boolean(singles, INCLUDE_ID_PARAM) is False:
        raise InvalidRequest(
            f"{INCLUDE_ID_PARAM} must be true: the gateway always mints single-use URLs and records their"
            " conversation",
            extra={"parameter": INCLUDE_ID_PARAM},
        )
    # Before the limiter and the upstream: a refused agent costs nothing and reaches nobody.
    principal.require_agent(agent, services.settings.allowed_agent_ids)
    decision = await enforce(
        services.limiter, services.settings, "session", user_id=principal.user_id, agent_id=agent
    )
    return _Admitted(services, principal, agent, branch, decision, decision.headers())


def _audit_mint(event: str, request: Request, admitted: _Admitted, conversation_id: str | None) -> None:
    audit(
        event,
        user=admitted.principal.user_id,
        actor=admitted.principal.actor,
        agent_id=admitted.agent_id,
        conversation_id=conversation_id,
        client_ip=getattr(request.state, "client_ip", None),
        request_id=current_request_id(),
    )


def make_routes(clock: Callable[[], float] = time.time) -> list[Route]:
    """Build the token routes; `clock` (unix seconds) stamps ledger entries and `expires_at`."""

    async def get_signed_url(request: Request) -> Response:
        """Mint a signed WebSocket URL and record the caller as the conversation's owner."""
        admitted = await _admit(request, include_id=True)
        with headers_on_error(admitted.headers):
            with upstream_not_found_is_an_error("upstream does not know this agent"):
                body = await admitted.services.upstream.get_signed_url(
                    admitted.agent_id, branch_id=admitted.branch_id
                )
            signed_url = body.get("signed_url") if isinstance(body, dict) else None
            if not isinstance(signed_url, str) or not signed_url:
                raise UpstreamError("upstream returned no signed URL")
            conversation_id = conversation_id_from(body, signed_url)
            minted_at = int(clock())
            entry = LedgerEntry(admitted.principal.user_id, admitted.agent_id, minted_at)
            await _record(admitted.services, conversation_id, entry)
        _audit_mint("session_minted", request, admitted, conversation_id)
        return _json(
            {
                "signed_url": signed_url,
                "conversation_id": conversation_id,
                "expires_at": minted_at + SIGNED_URL_LIFETIME_SECONDS,
            },
            admitted.headers,
        )

    async def get_token(request: Request) -> Response:
        """Mint a WebRTC conversation token whose participant is the caller."""
        admitted = await _admit(request, ignored=IGNORED_TOKEN_PARAMS)
        with headers_on_error(admitted.headers):
            with upstream_not_found_is_an_error("upstream does not know this agent"):
                body = await admitted.services.upstream.get_webrtc_token(
                    admitted.agent_id,
                    participant_name=admitted.principal.user_id,
                    branch_id=admitted.branch_id,
                )
            token = body.get("token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise UpstreamError("upstream returned no token")
            # Newer upstream versions name the conversation with the token; then it is owned like a
            # signed URL's (recorded before the token is handed out). Without an id nothing is recorded
            # and ownership of the WebRTC conversation falls back to its upstream user_id.
            raw_id = body.get("conversation_id")
            conversation_id = raw_id if isinstance(raw_id, str) and validation.is_valid_id(raw_id) else None
            if conversation_id is not None:
                entry = LedgerEntry(admitted.principal.user_id, admitted.agent_id, int(clock()))
                await _record(admitted.services, conversation_id, entry)
        _audit_mint("token_minted", request, admitted, conversation_id)
        content: dict[str, Any] = {"token": token}
        if conversation_id is not None:
            content["conversation_id"] = conversation_id
        return _json(content, admitted.headers)

    return [
        _get_only(Route(SIGNED_URL_ROUTE, _no_store(get_signed_url), methods=["GET"], name="get_signed_url")),
        _get_only(
            Route(WEBRTC_TOKEN_ROUTE, _no_store(get_token), methods=["GET"], name="get_conversation_token")
        ),
    ]


def _get_only(route: Route) -> Route:
    """Take back the HEAD Starlette adds to a GET route: a HEAD would mint what it cannot hand out (405)."""
    # A mint has effects (upstream, ledger, audit, session budget); a HEAD answer would drop the URL or token.
    if route.methods is not None:
        route.methods.discard("HEAD")
    return route


def conversation_id_from(body: Mapping[str, Any], signed_url: str) -> str:
    """Return the conversation id from the upstream body, else from the signed URL's query; 502 if none."""
    from_body = body.get("conversation_id")
    body_id = from_body if isinstance(from_body, str) and validation.is_valid_id(from_body) else None
    # What parse_qs(...).get("conversation_id") gives: parse_qs drops blank values.
    url_values = [
        v for k, v in validation.query_pairs(urlsplit(signed_url).query) if k == "conversation_id" and v
    ]
    url_id = url_values[0] if len(url_values) == 1 and validation.is_valid_id(url_values[0]) else None
    if body_id is not None and url_id is not None and body_id != url_id:
        # Recording either could make the caller the owner of a conversation it is not having.
        raise UpstreamError("upstream returned inconsistent conversation ids")
    found = body_id or url_id
    if found is None:
        raise UpstreamError("upstream returned no conversation id")
    return found


async def _record(services: Services, conversation_id: str, entry: LedgerEntry) -> None:
    try:
        await services.ledger.record(conversation_id, entry)
    except Exception:
        services.metrics.ledger_write("error")
        raise
    services.metrics.ledger_write("ok")


def _optional_id(singles: Mapping[str, str], name: str) -> str | None:
    value = singles.get(name)
    if value is None:
        return None
    if not validation.is_valid_id(value):
        raise InvalidRequest(
            f"{name} must be 1..{validation.MAX_ID_LENGTH} characters of A-Z a-z 0-9 _ -",
            extra={"parameter": name},
        )
    return value


def _no_store(handler: Handler) -> Handler:
    # Token routes must never be cached, errors included (DESIGN section 1). Their answers come from `_json`,
    # which renders the headers with the rest: set here as well, they cost ~1 % of a mint in MutableHeaders.
    async def wrapped(request: Request) -> Response:
        with headers_on_error(NO_STORE_HEADERS):
            return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


def _json(content: dict[str, Any], headers: Mapping[str, str]) -> JsonAnswer:
    return JsonAnswer(content, headers={**headers, **NO_STORE_HEADERS})


routes: list[Route] = make_routes()
