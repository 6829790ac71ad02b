"""JWKS cache against a real loopback server: prefetch, rotation, outages, refetch storms, limits."""

from __future__ import annotations

import asyncio
import json

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm

from service.jwks import MAX_JWKS_BYTES, JwksCache
from tests.auth.conftest import JwksServer
from tests.auth.support import (
    T0,
    FakeClock,
    JwksServerState,
    Keys,
    claims,
    jwks_app,
    jwks_issuer,
    public_jwk,
    rejection,
    settings_for,
    sign,
    started,
)
from tests.support.servers import ServedApp, free_port


async def test_keys_are_prefetched_at_start(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    outcomes: list[str] = []
    async with started(settings_for(jwks_issuer(jwks.url)), clock, on_jwks_refresh=outcomes.append) as auth:
        assert jwks.state.fetches == 1
        assert outcomes == ["ok"]
        ready, detail = auth.readiness()
        assert ready, detail
        await auth.authenticate("Bearer " + sign(claims(), keys.rsa, "RS256", kid="k-rsa"))
        assert jwks.state.fetches == 1


async def test_issuers_sharing_a_jwks_url_share_one_fetch(jwks: JwksServer, clock: FakeClock) -> None:
    issuers = (
        jwks_issuer(jwks.url, issuer="https://a.example"),
        jwks_issuer(jwks.url, issuer="https://b.example"),
    )
    async with started(settings_for(*issuers), clock) as auth:
        assert auth.readiness()[0]
    assert jwks.state.fetches == 1


async def test_jwks_down_at_start_is_not_ready_and_does_not_crash(keys: Keys, clock: FakeClock) -> None:
    url = f"http://127.0.0.1:{free_port()}/jwks.json"
    outcomes: list[str] = []
    async with started(settings_for(jwks_issuer(url)), clock, on_jwks_refresh=outcomes.append) as auth:
        ready, detail = auth.readiness()
        assert not ready
        assert "JWKS not loaded" in detail and "unreachable" in detail
        assert outcomes == ["error"]
        token = sign(claims(), keys.rsa, "RS256", kid="k-rsa")
        assert await rejection(auth, token) == "unknown key"


async def test_jwks_outage_at_start_recovers_without_restart(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    jwks.state.status = 503
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        ready, detail = auth.readiness()
        assert not ready and "HTTP 503" in detail
        jwks.state.status = 200
        principal = await auth.authenticate("Bearer " + sign(claims(), keys.rsa, "RS256", kid="k-rsa"))
        assert principal.user_id == "user-1"
        assert auth.readiness()[0]
        assert jwks.state.fetches == 2


async def test_rotated_in_key_is_picked_up_without_restart(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        jwks.state.keys = [*jwks.state.keys, public_jwk(keys.rsa2, "k-new")]
        principal = await auth.authenticate(
            "Bearer " + sign(claims(sub="rotated"), keys.rsa2, "RS256", kid="k-new")
        )
        assert principal.user_id == "rotated"
        assert jwks.state.fetches == 2


async def test_unknown_kid_refetch_respects_cooldown(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    settings = settings_for(jwks_issuer(jwks.url), jwks_unknown_kid_cooldown_seconds=30.0)
    async with started(settings, clock) as auth:
        unknown = sign(claims(), keys.rsa2, "RS256", kid="k-unknown")
        assert await rejection(auth, unknown) == "unknown key"
        assert jwks.state.fetches == 2
        assert await rejection(auth, unknown) == "unknown key"
        clock.advance(29)
        assert await rejection(auth, unknown) == "unknown key"
        assert jwks.state.fetches == 2
        clock.advance(2)
        jwks.state.keys = [*jwks.state.keys, public_jwk(keys.rsa2, "k-unknown")]
        assert (await auth.authenticate(f"Bearer {unknown}")).user_id == "user-1"
        assert jwks.state.fetches == 3


async def test_refetch_storm_causes_exactly_one_fetch(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    # No cooldown: only the shared in-flight fetch can keep this to one request.
    settings = settings_for(jwks_issuer(jwks.url), jwks_unknown_kid_cooldown_seconds=0.0)
    async with started(settings, clock) as auth:
        tokens = [sign(claims(sub=f"u{i}"), keys.rsa2, "RS256", kid="k-storm") for i in range(100)]
        jwks.state.keys = [*jwks.state.keys, public_jwk(keys.rsa2, "k-storm")]
        principals = await asyncio.gather(*(auth.authenticate(f"Bearer {t}") for t in tokens))
        assert [p.user_id for p in principals] == [f"u{i}" for i in range(100)]
        assert jwks.state.fetches == 2

        missing = [sign(claims(sub=f"m{i}"), keys.rsa2, "RS256", kid="k-missing") for i in range(100)]
        results = await asyncio.gather(
            *(auth.authenticate(f"Bearer {t}") for t in missing), return_exceptions=True
        )
        assert all(getattr(r, "reason", None) == "unknown key" for r in results)
        assert jwks.state.fetches == 3


async def test_refresh_failure_keeps_last_good_keys(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    outcomes: list[str] = []
    async with started(settings_for(jwks_issuer(jwks.url)), clock, on_jwks_refresh=outcomes.append) as auth:
        cache = auth.jwks_caches[0]
        jwks.state.status = 500
        clock.advance(cache.ttl_seconds)
        assert await cache.refresh_if_due()
        assert outcomes == ["ok", "error"]
        assert cache.last_error == "JWKS endpoint answered HTTP 500"
        assert auth.readiness()[0]
        fresh = sign(claims(exp=int(clock.now) + 60), keys.ec, "ES256", kid="k-ec")
        assert (await auth.authenticate(f"Bearer {fresh}")).user_id == "user-1"
        # A failed refresh is retried soon, not after a full max-age.
        assert cache.next_refresh_at <= clock.now + 5


async def test_failed_fetches_back_off_5_s_doubling_to_30_s_unloaded_and_5_min_loaded(
    jwks: JwksServer, clock: FakeClock
) -> None:
    # README: retried with backoff, 5 s doubling to 5 min; to 30 s at most while no key set has ever loaded
    # (an unready pod gets no traffic whose unknown kid could trigger a refetch).
    jwks.state.status = 503
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        cache = auth.jwks_caches[0]
        delays = [cache.next_refresh_at - clock.now]
        for _ in range(5):
            clock.advance(delays[-1])
            assert await cache.refresh_if_due()
            delays.append(cache.next_refresh_at - clock.now)
        assert delays == [5, 10, 20, 30, 30, 30]
        assert not auth.readiness()[0]
        jwks.state.status = 200
        clock.advance(delays[-1])
        assert await cache.refresh_if_due()
        assert auth.readiness()[0]
        jwks.state.status = 503
        delays = []
        for _ in range(9):
            clock.advance(cache.next_refresh_at - clock.now)
            assert await cache.refresh_if_due()
            delays.append(cache.next_refresh_at - clock.now)
        assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]


async def test_jwks_server_gone_later_keeps_cached_keys(keys: Keys, clock: FakeClock) -> None:
    served = ServedApp(jwks_app(JwksServerState(keys=[public_jwk(keys.rsa, "k-rsa")])), ws="none").start()
    try:
        async with started(settings_for(jwks_issuer(f"{served.url}/jwks.json")), clock) as auth:
            served.stop()
            cache = auth.jwks_caches[0]
            clock.advance(cache.ttl_seconds)
            assert await cache.refresh_if_due()
            assert cache.last_error is not None and "unreachable" in cache.last_error
            assert auth.readiness()[0]
            known = sign(claims(exp=int(clock.now) + 60), keys.rsa, "RS256", kid="k-rsa")
            assert (await auth.authenticate(f"Bearer {known}")).user_id == "user-1"
            new_kid = sign(claims(exp=int(clock.now) + 60), keys.rsa2, "RS256", kid="k-new")
            assert await rejection(auth, new_kid) == "unknown key"
    finally:
        served.stop()


@pytest.mark.parametrize(
    ("cache_control", "ttl"),
    [
        ("max-age=60", 300.0),
        ("public, max-age=3600", 3600.0),
        ("max-age=900, must-revalidate", 900.0),
        ("max-age=10000000", 86400.0),
        ("no-cache", 300.0),
        (None, 3600.0),
        ("max-age=garbage", 3600.0),
    ],
)
async def test_max_age_is_honoured_and_clamped(
    jwks: JwksServer, clock: FakeClock, cache_control: str | None, ttl: float
) -> None:
    jwks.state.cache_control = cache_control
    cache = JwksCache(jwks.url, clock=clock)
    await cache.start()
    try:
        assert cache.ttl_seconds == ttl
        assert cache.next_refresh_at == pytest.approx(T0 + ttl * 0.9)
        clock.advance(ttl * 0.9 - 1)
        assert not await cache.refresh_if_due()
        clock.advance(1)
        assert await cache.refresh_if_due()
        assert jwks.state.fetches == 2
    finally:
        await cache.aclose()


@pytest.mark.parametrize(
    ("cache_control", "age", "ttl"),
    [
        # A directive forbidding reuse wins wherever it stands, not only when it comes last.
        ("no-store, max-age=86400", None, 300.0),
        ("max-age=86400, no-cache", None, 300.0),
        # RFC 9111 section 4.2.3: a CDN's copy that is already `Age` old is that much closer to stale.
        ("max-age=3600", "3000", 600.0),
        ("max-age=3600", "3590", 300.0),
        ("max-age=3600", "garbage", 3600.0),
        ("max-age=3600", "-5", 3600.0),
    ],
)
async def test_reuse_forbidding_directives_and_age_shorten_the_lifetime(
    jwks: JwksServer, clock: FakeClock, cache_control: str, age: str | None, ttl: float
) -> None:
    # How long a key set is kept is how long a key removed from it (revoked) keeps verifying.
    jwks.state.cache_control = cache_control
    jwks.state.age = age
    cache = JwksCache(jwks.url, clock=clock)
    await cache.start()
    try:
        assert cache.ttl_seconds == ttl
    finally:
        await cache.aclose()


async def test_background_task_refreshes_when_due(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    refreshed = asyncio.Event()
    outcomes: list[str] = []

    def record(outcome: str) -> None:
        outcomes.append(outcome)
        if len(outcomes) == 2:
            refreshed.set()

    cache = JwksCache(jwks.url, clock=clock, on_refresh=record, poll_seconds=0.01)
    await cache.start()
    try:
        assert outcomes == ["ok"]
        jwks.state.keys = [public_jwk(keys.rsa2, "k-next")]
        clock.advance(600)
        await asyncio.wait_for(refreshed.wait(), timeout=5)
        assert outcomes == ["ok", "ok"]
        assert cache.lookup("k-next") is not None and cache.lookup("k-rsa") is None
    finally:
        await cache.aclose()


async def test_unchanged_key_set_is_revalidated_with_its_etag(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    jwks.state.etag = '"set-1"'
    outcomes: list[str] = []
    async with started(settings_for(jwks_issuer(jwks.url)), clock, on_jwks_refresh=outcomes.append) as auth:
        cache = auth.jwks_caches[0]
        assert jwks.state.conditions == [{}]
        jwks.state.cache_control = "max-age=1200"
        clock.advance(cache.ttl_seconds)
        assert await cache.refresh_if_due()
        assert jwks.state.conditions[-1] == {"if-none-match": '"set-1"'}
        assert jwks.state.not_modified == 1
        assert outcomes == ["ok", "ok"]
        # The 304's own max-age schedules the next refresh; the keys in hand keep verifying.
        assert cache.ttl_seconds == 1200.0
        assert cache.next_refresh_at == pytest.approx(clock.now + 1200 * 0.9)
        fresh = sign(claims(exp=int(clock.now) + 60), keys.rsa, "RS256", kid="k-rsa")
        assert (await auth.authenticate(f"Bearer {fresh}")).user_id == "user-1"


async def test_changed_key_set_is_fetched_whole_and_its_new_etag_kept(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    jwks.state.etag = '"set-1"'
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        jwks.state.keys = [*jwks.state.keys, public_jwk(keys.rsa2, "k-new")]
        jwks.state.etag = '"set-2"'
        rotated = sign(claims(sub="rotated"), keys.rsa2, "RS256", kid="k-new")
        assert (await auth.authenticate(f"Bearer {rotated}")).user_id == "rotated"
        assert jwks.state.not_modified == 0
        cache = auth.jwks_caches[0]
        clock.advance(cache.ttl_seconds)
        assert await cache.refresh_if_due()
        assert jwks.state.conditions == [{}, {"if-none-match": '"set-1"'}, {"if-none-match": '"set-2"'}]
        assert jwks.state.not_modified == 1


async def test_unknown_kid_refetch_is_conditional_and_a_304_leaves_it_unknown(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    jwks.state.last_modified = "Mon, 23 Nov 2026 10:00:00 GMT"
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        unknown = sign(claims(), keys.rsa2, "RS256", kid="k-unknown")
        assert await rejection(auth, unknown) == "unknown key"
        assert jwks.state.conditions[-1] == {"if-modified-since": "Mon, 23 Nov 2026 10:00:00 GMT"}
        assert jwks.state.not_modified == 1
        assert auth.jwks_caches[0].lookup("k-rsa") is not None


async def test_304_to_an_unconditional_fetch_is_an_error(jwks: JwksServer, clock: FakeClock) -> None:
    jwks.state.status = 304
    jwks.state.raw_body = b""
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        ready, detail = auth.readiness()
        assert not ready
        assert "HTTP 304" in detail
        assert auth.jwks_caches[0].keys == ()


@pytest.mark.parametrize("chunked", [False, True])
async def test_oversized_jwks_response_is_refused(jwks: JwksServer, clock: FakeClock, chunked: bool) -> None:
    cache = JwksCache(jwks.url, clock=clock)
    await cache.start()
    try:
        document = json.dumps({"keys": jwks.state.keys}).encode()
        jwks.state.chunked = chunked
        jwks.state.raw_body = document[:-1] + b" " * (MAX_JWKS_BYTES - len(document)) + b"}"
        assert await cache.refresh()  # exactly at the cap is fine
        jwks.state.raw_body = document[:-1] + b" " * (MAX_JWKS_BYTES + 1 - len(document)) + b"}"
        assert not await cache.refresh()
        assert cache.last_error == f"JWKS response is larger than {MAX_JWKS_BYTES} bytes"
        assert cache.lookup("k-rsa") is not None
    finally:
        await cache.aclose()


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"<html>not json</html>", "JWKS response is not valid JSON"),
        (b'{"keys": NaN}', "JWKS response is not valid JSON"),
        (b"[]", "JWKS response has no `keys` list"),
        (b'{"keys": {"kty": "RSA"}}', "JWKS response has no `keys` list"),
        (b'{"keys": []}', "JWKS response has no usable signing keys"),
        (
            b'{"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"}]}',
            "JWKS response has no usable signing keys",
        ),
    ],
)
async def test_invalid_jwks_documents_keep_last_good_keys(
    jwks: JwksServer, clock: FakeClock, body: bytes, error: str
) -> None:
    cache = JwksCache(jwks.url, clock=clock)
    await cache.start()
    try:
        jwks.state.raw_body = body
        assert not await cache.refresh()
        assert cache.last_error == error
        assert {k.kid for k in cache.keys} == {"k-rsa", "k-ec", "k-ed"}
    finally:
        await cache.aclose()


async def test_unusable_keys_are_skipped(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be skipped
    p521 = ec.generate_private_key(ec.SECP521R1())
    private_jwk = RSAAlgorithm.to_jwk(keys.rsa2, as_dict=True) | {"kid": "k-private"}
    jwks.state.keys = [
        {"kty": "oct", "kid": "k-oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0"},
        public_jwk(keys.rsa2, "k-enc", use="enc"),
        public_jwk(keys.rsa2, "k-ops-enc", key_ops=["encrypt", "wrapKey"]),  # RFC 7517 4.3: not "verify"
        public_jwk(keys.rsa2, "k-ops-bad", key_ops="verify"),  # must be an array
        public_jwk(keys.rsa2, "k-hs", alg="HS256"),
        public_jwk(keys.rsa2, "k-mismatch", alg="ES256"),
        public_jwk(weak, "k-weak"),
        public_jwk(p521, "k-p521"),
        private_jwk,
        public_jwk(keys.rsa2, 5),  # type: ignore[arg-type]
        public_jwk(keys.rsa2, "k-alg-list") | {"alg": ["RS256"]},  # once fatal to the whole set: unhashable
        {"kty": "RSA", "kid": "k-broken", "n": "!!", "e": "AQAB"},
        "not-an-object",  # type: ignore[list-item]
        public_jwk(keys.rsa, "k-good"),
        public_jwk(keys.rsa2, "k-good"),  # a duplicate kid must not shadow the first
        public_jwk(keys.ec, "k-ops-verify", key_ops=["verify"]),
    ]
    async with started(
        settings_for(jwks_issuer(jwks.url, algorithms=("RS256", "ES256", "ES384"))), clock
    ) as auth:
        cache = auth.jwks_caches[0]
        assert [k.kid for k in cache.keys] == ["k-good", "k-ops-verify"]
        assert (await auth.authenticate("Bearer " + sign(claims(), keys.rsa, "RS256", kid="k-good"))).user_id
        assert await rejection(auth, sign(claims(), keys.rsa2, "RS256", kid="k-good")) == "bad signature"
        assert (
            await auth.authenticate("Bearer " + sign(claims(), keys.ec, "ES256", kid="k-ops-verify"))
        ).user_id
        for kid in ("k-enc", "k-ops-enc", "k-ops-bad", "k-hs", "k-private", "k-mismatch"):
            assert await rejection(auth, sign(claims(sub=kid), keys.rsa2, "RS256", kid=kid)) == "unknown key"


async def test_one_kid_may_name_one_key_of_each_type(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    # RFC 7517 section 4.5: keys of different kty may share a kid as equivalent alternatives. The token's
    # alg says which one it means; two keys of one type under one kid stay ambiguous (the first is kept).
    jwks.state.keys = [
        public_jwk(keys.rsa, "k-pair"),
        public_jwk(keys.ec, "k-pair"),
        public_jwk(keys.rsa2, "k-pair"),
    ]
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        assert [k.family for k in auth.jwks_caches[0].keys] == ["RSA", "EC:P-256"]
        by_rsa = sign(claims(sub="via-rsa"), keys.rsa, "RS256", kid="k-pair")
        by_ec = sign(claims(sub="via-ec"), keys.ec, "ES256", kid="k-pair")
        assert (await auth.authenticate(f"Bearer {by_rsa}")).user_id == "via-rsa"
        assert (await auth.authenticate(f"Bearer {by_ec}")).user_id == "via-ec"
        assert await rejection(auth, sign(claims(), keys.rsa2, "RS256", kid="k-pair")) == "bad signature"
        assert jwks.state.fetches == 1


def test_jwks_url_must_be_https_except_loopback() -> None:
    for url in ("http://idp.example/jwks.json", "ftp://idp.example/jwks.json", "http://10.0.0.1/jwks"):
        with pytest.raises(ValueError, match="https"):
            JwksCache(url)
    for url in (
        "https://idp.example/jwks.json",
        "http://127.0.0.1:9/jwks.json",
        "http://localhost/j",
        "http://[::1]/j",
    ):
        JwksCache(url)
