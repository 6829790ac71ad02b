"""JWT authentication: verify bearer tokens into a Principal, and the ASGI middleware that enforces it.

Keys are chosen only by configuration: the issuer is picked by the token's `iss` among the configured
ones, the key by `kid` inside that issuer's own key set, and the token's `alg` must be on that issuer's
allowlist and match the key's type. Nothing in a token (`jku`, `x5u`, `jwk`, ...) can point at a key.
Failures raise `AuthenticationFailed(reason)` with a short fixed reason, never the token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import httpx
import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import (
    ActAsNotAllowed,
    AgentNotAllowed,
    AuthenticationFailed,
    GatewayError,
    InvalidRequest,
    MissingScope,
    error_response,
)
from service.jwks import ALGORITHM_FAMILIES, JwksCache, VerificationKey, key_family
from service.observability import audit
from service.settings import ACT_AS_SCOPE, IssuerConfig, Settings, safe_url
from service.validation import is_text

logger = logging.getLogger("service.auth")

MAX_TOKEN_BYTES = 8 * 1024
TOKEN_CACHE_SIZE = 10_000
MAX_USER_ID_LENGTH = 256
MAX_KIDLESS_CANDIDATES = 3
# Header parameters that would let a token choose or smuggle its own key, or demand semantics we ignore.
FORBIDDEN_HEADERS = ("jku", "x5u", "x5c", "jwk", "crit", "b64")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_ON_BEHALF_OF = re.compile(r"[\x21-\x7e]{1,128}")
_ASYMMETRIC_DEFAULTS = ("RS256", "ES256", "EdDSA")


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated caller: whose data the request touches, with the token's scopes and agents."""

    user_id: str
    scopes: frozenset[str]
    agents: frozenset[str] | None
    issuer: str | None
    expires_at: int
    actor: str | None = None
    # The issuer's user_id_prefix ("" without one): already in `user_id`, and given to X-On-Behalf-Of targets.
    user_id_prefix: str = ""

    def require_scope(self, scope: str) -> None:
        """Raise MissingScope unless the token carries `scope`."""
        if scope not in self.scopes:
            raise MissingScope(scope)

    def allowed_agents(self, allowed: frozenset[str]) -> frozenset[str]:
        """Return the workspace allowlist narrowed by the token's `agents` claim."""
        return allowed if self.agents is None else allowed & self.agents

    def require_agent(self, agent_id: str, allowed: frozenset[str]) -> None:
        """Raise AgentNotAllowed unless `agent_id` is in the workspace allowlist and the token's agents."""
        if agent_id not in self.allowed_agents(allowed):
            raise AgentNotAllowed("this agent is not allowed for this caller")


@dataclass(slots=True)
class _Issuer:
    """One configured issuer with its resolved keys."""

    config: IssuerConfig
    algorithms: frozenset[str]
    hs_secret: bytes | None
    static_key: VerificationKey | None
    jwks: JwksCache | None
    allowed_scopes: frozenset[str] | None
    user_id_prefix: str
    # The claim may be this long: the user id, prefix included, is at most MAX_USER_ID_LENGTH.
    max_claim_length: int
    # For an issuer without a prefix, the other issuers' prefixes: a user id starting with one is theirs.
    foreign_prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Verified:
    """A verified token's Principal, and the JWKS key set (with its generation) that verified it."""

    principal: Principal
    valid_until: float
    jwks: JwksCache | None = None
    generation: int = 0

    def usable(self, now: float) -> bool:
        """Tell whether the cached result still holds: before exp, and its key set unchanged."""
        return now < self.valid_until and (self.jwks is None or self.jwks.generation == self.generation)


@dataclass(frozen=True, slots=True)
class _Token:
    """A token split and decoded, not yet verified."""

    header: dict[str, Any]
    claims: dict[str, Any]


class Authenticator:
    """Verifies bearer tokens against the configured issuers and caches the verified ones."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        on_jwks_refresh: Callable[[str], None] | None = None,
        token_cache_size: int = TOKEN_CACHE_SIZE,
    ) -> None:
        self._settings = settings
        self._clock = clock
        self._leeway = settings.jwt_leeway_seconds
        self._jws = jwt.PyJWS(options={"enforce_minimum_key_length": True})
        self._cache: OrderedDict[bytes, _Verified] = OrderedDict()
        self._cache_size = token_cache_size
        # Counts signature verifications (cache misses); exposed for metrics and to prove the cache works.
        self.signature_checks = 0
        caches: dict[str, JwksCache] = {}
        self._issuers: list[_Issuer] = []
        prefixes = tuple(config.user_id_prefix for config in settings.issuers if config.user_id_prefix)
        for config in settings.issuers:
            jwks = None
            if config.jwks_url is not None:
                # Issuers sharing a JWKS URL share one cache (and one fetch).
                jwks = caches.get(config.jwks_url)
                if jwks is None:
                    jwks = JwksCache(
                        config.jwks_url,
                        clock=clock,
                        transport=transport,
                        on_refresh=on_jwks_refresh,
                        unknown_kid_cooldown=settings.jwks_unknown_kid_cooldown_seconds,
                        proxy=settings.egress_proxy_url,
                    )
                    caches[config.jwks_url] = jwks
            self._issuers.append(
                _Issuer(
                    config=config,
                    algorithms=frozenset(config.algorithms or _default_algorithms(config)),
                    hs_secret=config.hs256_secret.reveal().encode() if config.hs256_secret else None,
                    static_key=_pem_key(config.public_key_pem) if config.public_key_pem else None,
                    jwks=jwks,
                    allowed_scopes=config.allowed_scopes,
                    user_id_prefix=config.user_id_prefix or "",
                    max_claim_length=MAX_USER_ID_LENGTH - len(config.user_id_prefix or ""),
                    foreign_prefixes=() if config.user_id_prefix else prefixes,
                )
            )
        self._jwks_caches = tuple(caches.values())

    @property
    def jwks_caches(self) -> tuple[JwksCache, ...]:
        """Return the JWKS caches (one per distinct JWKS URL), for diagnostics."""
        return self._jwks_caches

    async def start(self) -> None:
        """Prefetch every JWKS (never raising when one is down) and start their background refresh."""
        await asyncio.gather(*(cache.start() for cache in self._jwks_caches))

    async def aclose(self) -> None:
        """Stop the background refresh tasks and close the JWKS HTTP clients."""
        await asyncio.gather(*(cache.aclose() for cache in self._jwks_caches))

    def readiness(self) -> tuple[bool, str]:
        """Tell whether keys are loaded for every configured issuer, with a human-readable detail."""
        if not self._issuers:
            return False, "no token issuers configured"
        missing = [
            f"{safe_url(cache.url)}: {cache.last_error or 'not fetched yet'}"
            for cache in self._jwks_caches
            if not cache.loaded
        ]
        if missing:
            return False, "JWKS not loaded: " + "; ".join(missing)
        return True, f"keys loaded for {len(self._issuers)} issuer(s)"

    async def authenticate(self, authorization: str | None, on_behalf_of: str | None = None) -> Principal:
        """Verify the `Authorization: Bearer` value and return the Principal (acting for a user if asked)."""
        token = _bearer_token(authorization)
        principal = await self._verified(token)
        return principal if on_behalf_of is None else act_as(principal, [on_behalf_of])

    async def _verified(self, token: str) -> Principal:
        digest = hashlib.sha256(token.encode("ascii")).digest()
        now = self._clock()
        hit = self._cache.get(digest)
        if hit is not None:
            if hit.usable(now):
                self._cache.move_to_end(digest)
                return hit.principal
            # Expired, or its key set changed (a key removed is a key revoked): verify it again.
            del self._cache[digest]
        verified = await self._verify(token, now)
        self._cache[digest] = verified
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return verified.principal

    async def _verify(self, token: str, now: float) -> _Verified:
        parsed = _parse(token)
        algorithm = str(parsed.header["alg"])  # _parse admitted only known algorithms
        for name in FORBIDDEN_HEADERS:
            if name in parsed.header:
                raise AuthenticationFailed(f"forbidden header: {name}")
        kid = parsed.header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationFailed("malformed token")
        issuer = self._select_issuer(parsed.claims)
        if algorithm not in issuer.algorithms:
            raise AuthenticationFailed("unsupported algorithm")
        keys = await self._candidate_keys(issuer, algorithm, kid)
        key = self._check_signature(token, algorithm, keys)
        principal = self._principal(issuer, parsed.claims, now)
        valid_until = principal.expires_at + self._leeway
        if issuer.jwks is None or key is issuer.static_key or not isinstance(key, VerificationKey):
            return _Verified(principal, valid_until)
        # No await since the keys were read, so this is the generation of the set the key came from.
        return _Verified(principal, valid_until, issuer.jwks, issuer.jwks.generation)

    def _select_issuer(self, claims: Mapping[str, Any]) -> _Issuer:
        iss = claims.get("iss")
        if iss is not None and not isinstance(iss, str):
            raise AuthenticationFailed("invalid claim: iss")
        if len(self._issuers) == 1:
            only = self._issuers[0]
            if only.config.issuer is None:
                return only
            if iss is None:
                raise AuthenticationFailed("missing claim: iss")
            if iss != only.config.issuer:
                raise AuthenticationFailed("wrong issuer")
            return only
        if iss is None:
            raise AuthenticationFailed("missing claim: iss")
        for candidate in self._issuers:
            if candidate.config.issuer == iss:
                return candidate
        raise AuthenticationFailed("wrong issuer")

    async def _candidate_keys(
        self, issuer: _Issuer, algorithm: str, kid: str | None
    ) -> list[VerificationKey | bytes]:
        if algorithm == "HS256":
            if issuer.hs_secret is None:
                raise AuthenticationFailed("unknown key")
            return [issuer.hs_secret]
        usable = self._asymmetric_keys(issuer, algorithm, kid)
        if not usable and issuer.jwks is not None:
            # An unknown kid may be a key rotated in since the last fetch: refetch once (cooldown, shared).
            await issuer.jwks.refetch_for_unknown_kid()
            usable = self._asymmetric_keys(issuer, algorithm, kid)
        if not usable:
            raise AuthenticationFailed("unknown key")
        return list(usable)

    @staticmethod
    def _asymmetric_keys(issuer: _Issuer, algorithm: str, kid: str | None) -> list[VerificationKey]:
        keys: list[VerificationKey] = []
        if issuer.jwks is not None and kid is not None:
            key = issuer.jwks.lookup(kid, algorithm)
            if key is not None:
                keys.append(key)
        else:
            if issuer.static_key is not None:
                keys.append(issuer.static_key)
            if issuer.jwks is not None:
                keys.extend(issuer.jwks.keys)
        # Without a kid several keys may fit; trying a few bounds the work a forged token can cause.
        return [k for k in keys if k.accepts(algorithm)][:MAX_KIDLESS_CANDIDATES]

    def _check_signature(
        self, token: str, algorithm: str, keys: list[VerificationKey | bytes]
    ) -> VerificationKey | bytes:
        """Return the key whose signature check passed, or raise AuthenticationFailed."""
        self.signature_checks += 1
        for key in keys:
            material = key.key if isinstance(key, VerificationKey) else key
            try:
                self._jws.decode_complete(token, key=material, algorithms=[algorithm])
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                raise AuthenticationFailed("bad signature") from exc
            return key
        raise AuthenticationFailed("bad signature")

    def _principal(self, issuer: _Issuer, claims: Mapping[str, Any], now: float) -> Principal:
        leeway = self._leeway
        exp = _number(claims, "exp")
        if exp is None:
            raise AuthenticationFailed("missing claim: exp")
        if exp <= now - leeway:
            raise AuthenticationFailed("expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise AuthenticationFailed("not yet valid")
        max_lifetime = self._settings.jwt_max_lifetime_seconds
        iat = _number(claims, "iat")
        if iat is None and max_lifetime is not None:
            raise AuthenticationFailed("missing claim: iat")
        if iat is not None and iat > now + leeway:
            raise AuthenticationFailed("issued in the future")
        if max_lifetime is not None and iat is not None and exp - iat > max_lifetime:
            raise AuthenticationFailed("lifetime too long")
        _check_audience(issuer.config.audiences, claims)
        scopes = _scopes(claims, self._settings.jwt_default_scopes)
        if issuer.allowed_scopes is not None:
            # What the issuer may grant bounds what its tokens claim: a partner's IdP cannot mint act-as.
            # Applied before caching, so a cached token costs nothing more.
            scopes &= issuer.allowed_scopes
        claim = self._settings.jwt_user_claim
        user_id = _user_id(claims, claim, issuer.max_claim_length)
        if issuer.user_id_prefix:
            # The issuer's namespace: its "alice" is no other issuer's "alice". Applied before caching too.
            user_id = issuer.user_id_prefix + user_id
        elif issuer.foreign_prefixes and user_id.startswith(issuer.foreign_prefixes):
            # An issuer without a prefix cannot name a user of a prefixed one ("partner:alice").
            raise AuthenticationFailed(f"invalid claim: {claim}")
        return Principal(
            user_id=user_id,
            scopes=scopes,
            agents=_agents(claims),
            issuer=issuer.config.issuer,
            expires_at=int(exp),
            user_id_prefix=issuer.user_id_prefix,
        )


def act_as(principal: Principal, on_behalf_of: Sequence[str]) -> Principal:
    """Return `principal` acting for the user its `X-On-Behalf-Of` header values name, if it may act."""
    if ACT_AS_SCOPE not in principal.scopes:
        raise ActAsNotAllowed(f"X-On-Behalf-Of requires scope {ACT_AS_SCOPE}")
    if len(on_behalf_of) != 1:
        raise InvalidRequest("X-On-Behalf-Of must be sent once", extra={"parameter": "X-On-Behalf-Of"})
    user_id = on_behalf_of[0]
    if _ON_BEHALF_OF.fullmatch(user_id) is None:
        raise InvalidRequest(
            "X-On-Behalf-Of must be 1..128 printable ASCII characters without spaces",
            extra={"parameter": "X-On-Behalf-Of"},
        )
    # Within the token's own issuer's namespace: a prefixed issuer's act-as reaches only its own users.
    return replace(principal, user_id=principal.user_id_prefix + user_id, actor=principal.user_id)


def _default_algorithms(config: IssuerConfig) -> tuple[str, ...]:
    algorithms: tuple[str, ...] = ("HS256",) if config.hs256_secret else ()
    if config.jwks_url or config.public_key_pem:
        algorithms += _ASYMMETRIC_DEFAULTS
    return algorithms


def _pem_key(pem: str) -> VerificationKey:
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ValueError("JWT public key is not a valid PEM public key") from exc
    family = key_family(key)
    if family is None:
        raise ValueError("JWT public key must be RSA (>= 2048 bits), EC P-256/P-384 or Ed25519")
    return VerificationKey(family=family, key=key)


def _bearer_token(authorization: str | None) -> str:
    if authorization is None:
        raise AuthenticationFailed("missing bearer token", missing=True)
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthenticationFailed("missing bearer token", missing=True)
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthenticationFailed("token too large")
    if not token or not token.isascii():
        raise AuthenticationFailed("malformed token")
    return token


def _b64decode(segment: str) -> bytes:
    if not segment or _SEGMENT.fullmatch(segment) is None or len(segment) % 4 == 1:
        raise AuthenticationFailed("malformed token")
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AuthenticationFailed("malformed token") from exc
    # Non-canonical encodings (stray trailing bits) would let one token have many spellings.
    if base64.urlsafe_b64encode(decoded).rstrip(b"=").decode() != segment:
        raise AuthenticationFailed("malformed token")
    return decoded


def _json_object(segment: str) -> dict[str, Any]:
    decoded = _b64decode(segment)
    # JWT libraries write compact JSON, so a header or claim set starts with `{"` and its segment with "eyJ":
    # the shape by which the log masking recognises a token that strays into a line (a query string, say).
    # Whitespace there is legal JSON, and would let a valid token through unmasked.
    if not decoded.startswith(b'{"'):
        raise AuthenticationFailed("malformed token")
    try:
        value = json.loads(decoded, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise AuthenticationFailed("malformed token") from exc
    if not isinstance(value, dict):
        raise AuthenticationFailed("malformed token")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _parse(token: str) -> _Token:
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthenticationFailed("malformed token")
    header = _json_object(parts[0])
    # The algorithm is judged before the rest, so `alg: none` tokens get their own reason. A list or an object
    # is not a name: without the type check it would reach the table lookup and fail as an unhashable key.
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALGORITHM_FAMILIES:
        raise AuthenticationFailed("unsupported algorithm")
    claims = _json_object(parts[1])
    _b64decode(parts[2])
    return _Token(header=header, claims=claims)


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthenticationFailed(f"invalid claim: {name}")
    try:
        number = float(value)
    except OverflowError:  # a JSON integer past float range (10**400): math.isfinite would raise it too
        raise AuthenticationFailed(f"invalid claim: {name}") from None
    if not math.isfinite(number):
        raise AuthenticationFailed(f"invalid claim: {name}")
    return number


def _check_audience(audiences: tuple[str, ...], claims: Mapping[str, Any]) -> None:
    aud = claims.get("aud")
    if not audiences:
        # RFC 7519 4.1.3: a token meant for a named audience is not for a service that has none configured.
        if aud:
            raise AuthenticationFailed("wrong audience")
        return
    if aud is None:
        raise AuthenticationFailed("missing claim: aud")
    values = [aud] if isinstance(aud, str) else aud
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise AuthenticationFailed("invalid claim: aud")
    if not set(values) & set(audiences):
        raise AuthenticationFailed("wrong audience")


def _user_id(claims: Mapping[str, Any], claim: str, max_length: int = MAX_USER_ID_LENGTH) -> str:
    value = claims.get(claim)
    if value is None or value == "":
        raise AuthenticationFailed(f"missing claim: {claim}")
    if (
        not isinstance(value, str)
        or len(value) > max_length
        or not is_text(value)
        or any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    ):
        # Control characters, C1 ones (NEL) included, would reach audit lines as they are. A lone surrogate
        # (JSON's "\ud800") is no character UTF-8 can carry: Redis keys, logs and the upstream query would
        # each replace it (another user's rate-limit bucket) or fail on it (a 500).
        raise AuthenticationFailed(f"invalid claim: {claim}")
    return value


def _scopes(claims: Mapping[str, Any], default: frozenset[str]) -> frozenset[str]:
    if "scope" in claims:
        scope = claims["scope"]
        if not isinstance(scope, str):
            raise AuthenticationFailed("invalid claim: scope")
        return _space_separated(scope)
    if "scp" in claims:
        scp = claims["scp"]
        if isinstance(scp, str):  # some IdPs (Azure AD) send `scp` space-separated
            return _space_separated(scp)
        if not isinstance(scp, list) or not all(isinstance(s, str) for s in scp):
            raise AuthenticationFailed("invalid claim: scp")
        return frozenset(scp)
    return default


def _space_separated(value: str) -> frozenset[str]:
    # RFC 6749 section 3.3: scope tokens are separated by a space (%x20) only. str.split() would also split
    # at U+00A0 or U+001F, turning one opaque token an IdP let through ("a\u00a0convai:delete") into a grant.
    return frozenset(token for token in value.split(" ") if token)


def _agents(claims: Mapping[str, Any]) -> frozenset[str] | None:
    if "agents" not in claims:
        return None
    agents = claims["agents"]
    if not isinstance(agents, list) or not all(isinstance(a, str) for a in agents):
        raise AuthenticationFailed("invalid claim: agents")
    return frozenset(agents)


class FailureGuard(Protocol):
    """Per-client failed-authentication limiter consulted by the middleware (implemented elsewhere)."""

    async def check(self, scope: Scope) -> GatewayError | None:
        """Return an error to send instead of verifying (e.g. 429 when the client is blocked), or None."""
        ...

    async def record(self, scope: Scope) -> GatewayError | None:
        """Record a failed authentication; return an error to send instead of the 401, or None."""
        ...


class AuthenticationMiddleware:
    """Pure ASGI middleware: authenticates requests under `path_prefix` and stores the Principal."""

    def __init__(
        self,
        app: ASGIApp,
        authenticator: Authenticator,
        *,
        path_prefix: str = "/v1/",
        guard: FailureGuard | None = None,
    ) -> None:
        self.app = app
        self.authenticator = authenticator
        self.path_prefix = path_prefix
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Authenticate the request, or answer with a problem response."""
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(self.path_prefix):
            await self.app(scope, receive, send)
            return
        authorization, on_behalf_of, preflight = _headers(scope)
        if scope.get("method") == "OPTIONS" and preflight:
            await self.app(scope, receive, send)  # CORS preflights carry no credentials
            return
        if self.guard is not None:
            blocked = await self.guard.check(scope)
            if blocked is not None:
                await _send_error(blocked, scope, receive, send)
                return
        try:
            principal = await self.authenticator.authenticate(_authorization(authorization))
            # Only once the token is verified: a request without a valid one is a 401, whatever else it sends.
            if on_behalf_of:
                principal = act_as(principal, on_behalf_of)
        except AuthenticationFailed as exc:
            logger.info("authentication failed: %s", exc.reason)
            error: GatewayError = exc
            if self.guard is not None:
                error = await self.guard.record(scope) or exc
            await _send_error(error, scope, receive, send)
            return
        except GatewayError as exc:
            await _send_error(exc, scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["principal"] = principal
        if principal.actor is not None:
            audit(
                "act_as",
                actor=principal.actor,
                user=principal.user_id,
                client_ip=state.get("client_ip"),
                request_id=state.get("request_id"),
            )
        await self.app(scope, receive, send)


def _headers(scope: Scope) -> tuple[list[str], list[str], bool]:
    """Return the request's Authorization values, its X-On-Behalf-Of values, and whether it is a CORS preflight."""
    # Only the names read here are decoded: a dict of every header cost ~16 k instructions a request.
    authorization: list[str] = []
    on_behalf_of: list[str] = []
    preflight = False  # an Access-Control-Request-Method header is present
    for name, value in scope.get("headers", ()):
        name = name.lower()
        if name == b"authorization":
            authorization.append(value.decode("latin-1"))
        elif name == b"x-on-behalf-of":
            on_behalf_of.append(value.decode("latin-1"))
        elif name == b"access-control-request-method":
            preflight = True
    return authorization, on_behalf_of, preflight


def _authorization(values: Sequence[str]) -> str | None:
    """Return the one Authorization header value, or None; two or more are a malformed token."""
    if not values:
        return None
    if len(values) > 1:
        raise AuthenticationFailed("malformed token")
    return values[0]


async def _send_error(exc: GatewayError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(exc)
    response.headers.setdefault("Cache-Control", "no-store")
    await response(scope, receive, send)
