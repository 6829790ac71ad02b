"""JWKS key cache: prefetch, background refresh, unknown-`kid` refetch with cooldown, one fetch in flight.

Keys come only from the configured URL (never from a token's `jku`/`x5u`). A failed refresh keeps the
last good key set, so an identity provider outage does not log everybody out. Refetches are conditional
(`If-None-Match` / `If-Modified-Since` from the last good response): a `304` renews the set's lifetime
without a body, as RFC 9111 revalidation does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from jwt.exceptions import PyJWTError

from service.errors import ServiceUnavailable
from service.settings import Secret, is_loopback_host, safe_url

logger = logging.getLogger("service.jwks")

MIN_TTL_SECONDS = 300.0
MAX_TTL_SECONDS = 86_400.0
DEFAULT_TTL_SECONDS = 3_600.0
MAX_JWKS_BYTES = 256 * 1024
MAX_KEYS = 100
MIN_RSA_BITS = 2048
# Refresh a little before the advertised max-age runs out, so the set never goes stale while the IdP is up.
REFRESH_FRACTION = 0.9
FAILURE_RETRY_MIN_SECONDS = 5.0
FAILURE_RETRY_MAX_SECONDS = 300.0
# Until a first key set has loaded the gateway is not ready, and an unready pod gets no traffic that could
# trigger an unknown-kid refetch: only this retry can make it ready once the JWKS is back.
UNLOADED_RETRY_MAX_SECONDS = 30.0

# The key family each algorithm must be verified with: this pairing is what stops algorithm confusion.
ALGORITHM_FAMILIES: Mapping[str, str] = {
    "HS256": "oct",
    "RS256": "RSA",
    "RS384": "RSA",
    "RS512": "RSA",
    "PS256": "RSA",
    "ES256": "EC:P-256",
    "ES384": "EC:P-384",
    "EdDSA": "OKP:Ed25519",
}
ASYMMETRIC_FAMILIES = frozenset(f for f in ALGORITHM_FAMILIES.values() if f != "oct")


@dataclass(frozen=True, slots=True)
class VerificationKey:
    """One public key usable for verification: its family, optional `kid` and optional pinned `alg`."""

    family: str
    key: Any  # a cryptography public key object
    kid: str | None = None
    alg: str | None = None

    def accepts(self, algorithm: str) -> bool:
        """Tell whether this key may verify a token signed with `algorithm`."""
        if ALGORITHM_FAMILIES.get(algorithm) != self.family:
            return False
        return self.alg is None or self.alg == algorithm


class JwksFetchFailed(ServiceUnavailable):
    """The JWKS endpoint could not be fetched or returned an unusable key set."""

    code = "jwks_unavailable"


def key_family(key: Any) -> str | None:
    """Return the family name (`RSA`, `EC:P-256`, ...) of a cryptography public key, or None."""
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA" if key.key_size >= MIN_RSA_BITS else None
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": "EC:P-256", "secp384r1": "EC:P-384"}.get(key.curve.name)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "OKP:Ed25519"
    return None


def ttl_from_cache_control(header: str | None, age: str | None = None) -> float:
    """Return the key set lifetime from Cache-Control, less the response's Age, clamped to 5 min .. 24 h."""
    ttl = DEFAULT_TTL_SECONDS
    for directive in (header or "").split(","):
        name, _, value = directive.strip().partition("=")
        name = name.strip().lower()
        if name in ("no-store", "no-cache"):
            # Wherever it stands: a later max-age must not turn "do not reuse" into a day of reuse.
            return MIN_TTL_SECONDS
        if name == "max-age":
            try:
                ttl = float(int(value.strip().strip('"')))
            except ValueError:
                continue
    # RFC 9111 section 4.2.3: a copy a cache in front of the IdP has held for Age seconds is that much
    # closer to stale. Age is delta-seconds; anything else is ignored.
    current_age = (age or "").strip()
    if current_age.isascii() and current_age.isdigit():
        ttl -= int(current_age)
    return min(MAX_TTL_SECONDS, max(MIN_TTL_SECONDS, ttl))


def parse_jwk(jwk: Mapping[str, Any]) -> VerificationKey | None:
    """Build a VerificationKey from one JWK, or None when it is unusable for signature verification."""
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    alg = jwk.get("alg")
    use = jwk.get("use")
    if kid is not None and not isinstance(kid, str):
        return None
    if use is not None and use != "sig":
        return None
    # RFC 7517 section 4.3: a key whose key_ops leave out "verify" (an encryption key) must not verify tokens.
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        return None
    # A non-string alg (a list, say) is unusable like an unknown one; the table lookup would raise on it.
    if alg is not None and (not isinstance(alg, str) or alg not in ALGORITHM_FAMILIES or alg == "HS256"):
        return None
    # A published private key is an IdP misconfiguration; never treat it as a verification key.
    if "d" in jwk:
        return None
    key: Any
    try:
        if kty == "RSA":
            key = RSAAlgorithm.from_jwk(dict(jwk))
        elif kty == "EC":
            key = ECAlgorithm.from_jwk(dict(jwk))
        elif kty == "OKP":
            key = OKPAlgorithm.from_jwk(dict(jwk))
        else:
            return None  # `oct` (symmetric) keys in a JWKS would reopen HS/RS confusion
    except (PyJWTError, ValueError, TypeError, KeyError):
        return None
    family = key_family(key)
    if family is None:
        return None
    if alg is not None and ALGORITHM_FAMILIES[alg] != family:
        return None
    return VerificationKey(family=family, key=key, kid=kid, alg=alg)


def parse_jwks(body: bytes) -> tuple[VerificationKey, ...]:
    """Validate a JWKS document and return its usable keys; raise JwksFetchFailed if none are usable."""
    try:
        document = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise JwksFetchFailed("JWKS response is not valid JSON") from exc
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise JwksFetchFailed("JWKS response has no `keys` list")
    keys: list[VerificationKey] = []
    seen: set[tuple[str, str]] = set()
    for entry in document["keys"][:MAX_KEYS]:
        if not isinstance(entry, dict):
            continue
        key = parse_jwk(entry)
        if key is None:
            continue
        if key.kid is not None:
            # RFC 7517 section 4.5 lets keys of different types share a kid (the token's alg tells them apart);
            # two of one type under one kid are ambiguous and must not let a token pick between them.
            if (key.kid, key.family) in seen:
                continue
            seen.add((key.kid, key.family))
        keys.append(key)
    if not keys:
        raise JwksFetchFailed("JWKS response has no usable signing keys")
    return tuple(keys)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"invalid JSON constant {name}")


def _validators_of(headers: httpx.Headers) -> dict[str, str]:
    """Return the conditional-request headers that revalidate a response with these headers."""
    validators: dict[str, str] = {}
    etag = headers.get("etag")
    if etag:
        validators["If-None-Match"] = etag
    last_modified = headers.get("last-modified")
    if last_modified:
        validators["If-Modified-Since"] = last_modified
    return validators


class JwksCache:
    """The key set of one JWKS URL, kept fresh in the background and refetched on an unknown `kid`."""

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        on_refresh: Callable[[str], None] | None = None,
        unknown_kid_cooldown: float = 30.0,
        max_bytes: int = MAX_JWKS_BYTES,
        timeout: float = 3.0,
        poll_seconds: float = 30.0,
        proxy: Secret | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" and not (parts.scheme == "http" and is_loopback_host(parts.hostname)):
            raise ValueError(f"JWKS URL must use https (plain http only on loopback): {safe_url(url)}")
        self.url = url
        self._clock = clock
        self._transport = transport
        self._proxy = proxy
        self._on_refresh = on_refresh
        self._cooldown = unknown_kid_cooldown
        self._max_bytes = max_bytes
        self._timeout = httpx.Timeout(timeout, connect=min(timeout, 2.0))
        self._poll_seconds = poll_seconds
        self._client: httpx.AsyncClient | None = None
        self._task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._inflight_for_unknown_kid = False  # whether the fetch in flight began for an unknown kid
        self._keys: tuple[VerificationKey, ...] = ()
        self._by_kid: dict[str, tuple[VerificationKey, ...]] = {}
        self._loaded = False
        self._failures = 0
        self._last_unknown_kid_fetch: float | None = None
        # Validators of the key set in use; sent back so an unchanged set costs the IdP no body.
        self._validators: dict[str, str] = {}
        self.last_error: str | None = None
        self.fetched_at: float | None = None
        self.ttl_seconds: float = DEFAULT_TTL_SECONDS
        self.next_refresh_at: float = -math.inf
        # Bumped whenever a fetch brings a different key set, so whatever was verified with the old one
        # (the verified-token cache) can tell it must be checked again.
        self.generation = 0

    @property
    def loaded(self) -> bool:
        """Tell whether a key set has ever been fetched successfully."""
        return self._loaded

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """Return the current (last good) key set."""
        return self._keys

    async def start(self) -> None:
        """Open the HTTP client, prefetch the key set (never raising) and start the background refresh."""
        if self._client is None:
            # Only EGRESS_PROXY_URL reroutes the fetch; proxy variables in the environment are ignored.
            transport = self._transport or httpx.AsyncHTTPTransport(
                trust_env=False, proxy=self._proxy.reveal() if self._proxy is not None else None
            )
            self._client = httpx.AsyncClient(
                transport=transport, timeout=self._timeout, follow_redirects=False, trust_env=False
            )
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"jwks-refresh {safe_url(self.url)}")

    async def aclose(self) -> None:
        """Stop the background refresh and close the HTTP client."""
        for task in (self._task, self._inflight):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = None
        self._inflight = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def lookup(self, kid: str, algorithm: str | None = None) -> VerificationKey | None:
        """Return the key with this `kid` (of the family `algorithm` needs, if given) from the current set."""
        family = ALGORITHM_FAMILIES.get(algorithm) if algorithm is not None else None
        for key in self._by_kid.get(kid, ()):
            if family is None or key.family == family:
                return key
        return None

    async def refresh(self, *, for_unknown_kid: bool = False) -> bool:
        """Fetch the key set now (joining a fetch already in flight); return whether it succeeded."""
        inflight = self._in_flight()
        if inflight is None:
            inflight = self._inflight = asyncio.create_task(self._fetch_and_store())
            inflight.add_done_callback(self._clear_inflight)
            self._inflight_for_unknown_kid = for_unknown_kid
        return await asyncio.shield(inflight)

    async def refresh_if_due(self) -> bool:
        """Refresh when the schedule says so; return whether a fetch was made."""
        if self._clock() < self.next_refresh_at:
            return False
        await self.refresh()
        return True

    async def refetch_for_unknown_kid(self) -> None:
        """Refetch after a token named an unknown `kid`: share a fetch in flight, else respect the cooldown."""
        inflight = self._in_flight()
        if inflight is not None:
            started_for_unknown_kid = self._inflight_for_unknown_kid
            await asyncio.shield(inflight)
            if started_for_unknown_kid:
                return
            # A scheduled refresh may have read the key set just before the new key was published (a rotation
            # while it was in flight): it does not answer for this kid, a fetch of its own (cooldown permitting)
            # does. Callers that found one already started for an unknown kid share it.
            inflight = self._in_flight()
            if inflight is not None and self._inflight_for_unknown_kid:
                await asyncio.shield(inflight)
                return
        now = self._clock()
        if self._last_unknown_kid_fetch is not None and now - self._last_unknown_kid_fetch < self._cooldown:
            return
        self._last_unknown_kid_fetch = now
        await self.refresh(for_unknown_kid=True)

    def _in_flight(self) -> asyncio.Task[bool] | None:
        """Return the fetch still running, if any."""
        # A fetch that has finished but whose done callback has not run yet (later in this loop turn) is
        # over: joining it would answer a new request with keys read before it, and without a fetch.
        if self._inflight is None or self._inflight.done():
            return None
        return self._inflight

    def _clear_inflight(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch_and_store(self) -> bool:
        try:
            keys, ttl, validators = await self._fetch()
        except Exception as exc:
            reason = exc.detail if isinstance(exc, JwksFetchFailed) else f"unexpected {type(exc).__name__}"
            self._failures += 1
            self.last_error = reason
            cap = FAILURE_RETRY_MAX_SECONDS if self._loaded else UNLOADED_RETRY_MAX_SECONDS
            retry = min(cap, FAILURE_RETRY_MIN_SECONDS * 2 ** (self._failures - 1))
            self.next_refresh_at = self._clock() + retry
            logger.warning(
                "JWKS refresh from %s failed: %s; keeping %d cached keys",
                safe_url(self.url),
                reason,
                len(self._keys),
                exc_info=not isinstance(exc, JwksFetchFailed),
            )
            self._notify("error")
            return False
        now = self._clock()
        if keys is not None:
            if keys != self._keys:
                self.generation += 1
            self._keys = keys
            by_kid: dict[str, tuple[VerificationKey, ...]] = {}
            for key in keys:
                if key.kid is not None:
                    by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
            self._by_kid = by_kid
            self._validators = validators
        self._loaded = True
        self._failures = 0
        self.last_error = None
        self.fetched_at = now
        self.ttl_seconds = ttl
        self.next_refresh_at = now + ttl * REFRESH_FRACTION
        self._notify("ok")
        return True

    def _notify(self, outcome: str) -> None:
        if self._on_refresh is not None:
            try:
                self._on_refresh(outcome)
            except Exception:  # a metrics callback must never break key refresh
                logger.exception("JWKS refresh callback failed")

    async def _fetch(self) -> tuple[tuple[VerificationKey, ...] | None, float, dict[str, str]]:
        """Return the fetched keys (None when a 304 confirmed the current set), their lifetime, validators."""
        if self._client is None:
            raise JwksFetchFailed("JWKS client is not started")
        headers = {"Accept": "application/json, application/jwk-set+json"}
        # Only with a set in hand: a 304 must always mean "the keys you hold are still current".
        conditional = self._loaded and bool(self._validators)
        if conditional:
            headers.update(self._validators)
        try:
            async with self._client.stream("GET", self.url, headers=headers) as response:
                ttl = ttl_from_cache_control(
                    response.headers.get("cache-control"), response.headers.get("age")
                )
                if response.status_code == 304 and conditional:
                    return None, ttl, self._validators
                if response.status_code != 200:
                    raise JwksFetchFailed(f"JWKS endpoint answered HTTP {response.status_code}")
                declared = response.headers.get("content-length")
                if declared is not None and declared.isdigit() and int(declared) > self._max_bytes:
                    raise JwksFetchFailed(f"JWKS response is larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body.extend(chunk)
                    if len(body) > self._max_bytes:
                        raise JwksFetchFailed(f"JWKS response is larger than {self._max_bytes} bytes")
                validators = _validators_of(response.headers)
        except httpx.TimeoutException as exc:
            raise JwksFetchFailed("JWKS endpoint timed out") from exc
        except httpx.HTTPError as exc:
            raise JwksFetchFailed(f"JWKS endpoint unreachable ({type(exc).__name__})") from exc
        return parse_jwks(bytes(body)), ttl, validators

    async def _run(self) -> None:
        while True:
            delay = self.next_refresh_at - self._clock()
            if delay > 0:
                # Sleep in slices so a wall-clock jump (or an injected clock) is noticed promptly.
                await asyncio.sleep(min(delay, self._poll_seconds))
                continue
            await self.refresh()  # never raises: failures are recorded and rescheduled
