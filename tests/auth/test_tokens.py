"""Token verification: keys, algorithms, headers, claims, issuers, scopes, agents, act-as, cache."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import pytest

from service.auth import Authenticator, Principal
from service.errors import (
    ActAsNotAllowed,
    AgentNotAllowed,
    AuthenticationFailed,
    InvalidRequest,
    MissingScope,
)
from service.settings import IssuerConfig, Secret, load_settings
from tests.auth.conftest import JwksServer
from tests.auth.support import (
    HS_SECRET,
    OTHER_HS_SECRET,
    T0,
    WORKSPACE_AGENTS,
    FakeClock,
    Keys,
    b64,
    b64json,
    claims,
    hs_issuer,
    jwks_issuer,
    public_pem,
    rejection,
    settings_for,
    sign,
    started,
)

# --- keys and algorithms ---------------------------------------------------------------------------


async def test_hs256_token_yields_principal(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        principal = await auth.authenticate("Bearer " + sign(claims(), HS_SECRET, "HS256"))
    assert principal == Principal(
        user_id="user-1",
        scopes=frozenset({"convai:session", "convai:history"}),
        agents=None,
        issuer=None,
        expires_at=int(T0) + 600,
    )


@pytest.mark.parametrize(
    ("key_name", "algorithm", "kid"),
    [("rsa", "RS256", "k-rsa"), ("ec", "ES256", "k-ec"), ("ed", "EdDSA", "k-ed")],
)
async def test_jwks_keys_verify_each_algorithm(
    jwks: JwksServer, keys: Keys, clock: FakeClock, key_name: str, algorithm: str, kid: str
) -> None:
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        token = sign(claims(sub=f"via-{algorithm}"), getattr(keys, key_name), algorithm, kid=kid)
        principal = await auth.authenticate(f"Bearer {token}")
    assert principal.user_id == f"via-{algorithm}"


@pytest.mark.parametrize(("key_name", "algorithm"), [("rsa", "RS256"), ("ec", "ES256"), ("ed", "EdDSA")])
async def test_pem_public_key_verifies_tokens(
    keys: Keys, clock: FakeClock, key_name: str, algorithm: str
) -> None:
    key = getattr(keys, key_name)
    issuer = IssuerConfig(issuer=None, algorithms=(algorithm,), public_key_pem=public_pem(key))
    async with started(settings_for(issuer), clock) as auth:
        assert (await auth.authenticate("Bearer " + sign(claims(), key, algorithm))).user_id == "user-1"
        expected = "bad signature" if algorithm == "RS256" else "unsupported algorithm"
        assert await rejection(auth, sign(claims(), keys.rsa2, "RS256")) == expected


async def test_environment_settings_accept_hs256_tokens(clock: FakeClock) -> None:
    settings = load_settings(
        {"ELEVENLABS_API_KEY": "xi-key", "ALLOWED_AGENT_IDS": "agent_a", "JWT_HS256_SECRET": HS_SECRET}
    )
    async with started(settings, clock) as auth:
        assert auth.readiness()[0]
        assert (await auth.authenticate("Bearer " + sign(claims(), HS_SECRET, "HS256"))).user_id == "user-1"
        assert await rejection(auth, sign(claims(), OTHER_HS_SECRET, "HS256")) == "bad signature"


async def test_alg_none_is_rejected(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        unsigned = f"{b64json({'alg': 'none', 'typ': 'JWT'})}.{b64json(claims())}."
        assert await rejection(auth, unsigned) == "unsupported algorithm"
        assert await rejection(auth, unsigned + "AAAA") == "unsupported algorithm"
        # A list or an object is no algorithm name either (it once escaped as a 500: unhashable).
        for alg in ("None", "NONE", "HS512", "", None, ["HS256"], {"alg": "HS256"}, 256):
            forged = f"{b64json({'alg': alg})}.{b64json(claims())}.AAAA"
            assert await rejection(auth, forged) == "unsupported algorithm"


def hs256_with_key(payload: dict[str, object], secret: bytes, **header: object) -> str:
    """Sign HS256 by hand (PyJWT refuses a PEM as an HMAC secret, an attacker does not)."""
    signing_input = f"{b64json({'alg': 'HS256', 'typ': 'JWT', **header})}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


async def test_hs256_signed_with_rsa_public_key_is_rejected(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    pem = public_pem(keys.rsa).encode()
    rsa_only = IssuerConfig(issuer=None, algorithms=("RS256",), public_key_pem=pem.decode())
    async with started(settings_for(rsa_only), clock) as auth:
        assert await rejection(auth, hs256_with_key(claims(), pem)) == "unsupported algorithm"
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        assert await rejection(auth, hs256_with_key(claims(), pem, kid="k-rsa")) == "unsupported algorithm"
    # Even with HS256 allowed, an HS256 token is checked only against the shared secret.
    both = IssuerConfig(
        issuer=None,
        algorithms=("HS256", "RS256"),
        hs256_secret=Secret(HS_SECRET),
        public_key_pem=pem.decode(),
    )
    async with started(settings_for(both), clock) as auth:
        assert await rejection(auth, hs256_with_key(claims(), pem)) == "bad signature"
        assert (await auth.authenticate("Bearer " + sign(claims(), keys.rsa, "RS256"))).user_id == "user-1"


async def test_algorithm_must_match_key_type(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    async with started(
        settings_for(jwks_issuer(jwks.url, algorithms=("RS256", "ES256", "EdDSA", "PS256"))), clock
    ) as auth:
        # kid names the EC key, the token says RS256: the key cannot verify that algorithm.
        assert await rejection(auth, sign(claims(), keys.rsa, "RS256", kid="k-ec")) == "unknown key"
        # k-rsa pins alg RS256 in the JWKS, so PS256 with the same RSA key is refused.
        assert await rejection(auth, sign(claims(), keys.rsa, "PS256", kid="k-rsa")) == "unknown key"


async def test_algorithm_must_be_on_issuer_allowlist(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    async with started(settings_for(jwks_issuer(jwks.url, algorithms=("ES256",))), clock) as auth:
        assert (
            await rejection(auth, sign(claims(), keys.rsa, "RS256", kid="k-rsa")) == "unsupported algorithm"
        )
        assert (await auth.authenticate("Bearer " + sign(claims(), keys.ec, "ES256", kid="k-ec"))).user_id


async def test_bad_signatures_are_rejected(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        assert await rejection(auth, sign(claims(), keys.rsa2, "RS256", kid="k-rsa")) == "bad signature"
        token = sign(claims(), keys.rsa, "RS256", kid="k-rsa")
        header, _, signature = token.split(".")
        tampered = f"{header}.{b64json(claims(sub='admin'))}.{signature}"
        assert await rejection(auth, tampered) == "bad signature"


async def test_unknown_kid_is_rejected(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        assert await rejection(auth, sign(claims(), keys.rsa2, "RS256", kid="nobody")) == "unknown key"
        _, payload, signature = sign(claims(), keys.rsa, "RS256", kid="k-rsa").split(".")
        numeric_kid = f"{b64json({'alg': 'RS256', 'kid': 7})}.{payload}.{signature}"
        assert await rejection(auth, numeric_kid) == "malformed token"


@pytest.mark.parametrize("name", ["jku", "x5u", "x5c", "jwk", "crit"])
async def test_key_selecting_headers_are_forbidden(
    jwks: JwksServer, keys: Keys, clock: FakeClock, name: str
) -> None:
    values: dict[str, object] = {
        "jku": "http://127.0.0.1:1/evil.json",
        "x5u": "http://127.0.0.1:1/evil.pem",
        "x5c": ["MIIB"],
        "jwk": {"kty": "oct", "k": "c2VjcmV0"},
        "crit": ["exp"],
    }
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        token = sign(claims(), keys.rsa, "RS256", kid="k-rsa", **{name: values[name]})
        assert await rejection(auth, token) == f"forbidden header: {name}"


async def test_oversize_token_is_rejected(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        big = sign(claims(padding="x" * 8200), HS_SECRET, "HS256")
        assert await rejection(auth, big) == "token too large"
        fits = sign(claims(padding="x" * 5000), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {fits}")).user_id == "user-1"


NAN_PAYLOAD = b'{"sub": "u", "exp": NaN}'


def _valid_parts() -> tuple[str, str, str]:
    header, payload, signature = sign(claims(), HS_SECRET, "HS256").split(".")
    return header, payload, signature


@pytest.mark.parametrize(
    "token",
    [
        "abc",
        "a.b",
        ".".join((*_valid_parts(), "extra")),
        f"!!!!.{_valid_parts()[1]}.{_valid_parts()[2]}",
        f"{b64(b'not json')}.{_valid_parts()[1]}.{_valid_parts()[2]}",
        f"{b64json(['alg', 'HS256'])}.{_valid_parts()[1]}.{_valid_parts()[2]}",
        f"{_valid_parts()[0]}.{b64(b'{broken')}.{_valid_parts()[2]}",
        f"{_valid_parts()[0]}.{b64json([1, 2])}.{_valid_parts()[2]}",
        f"{_valid_parts()[0]}.{_valid_parts()[1]}.",
        f"{_valid_parts()[0]}=.{_valid_parts()[1]}.{_valid_parts()[2]}",
        f"{_valid_parts()[0]}.{_valid_parts()[1]}.{_valid_parts()[2]}é",
        f"{_valid_parts()[0]}.{b64(NAN_PAYLOAD)}.{_valid_parts()[2]}",
        "..",
    ],
)
async def test_malformed_segments_are_rejected(clock: FakeClock, token: str) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, token) == "malformed token"


def _hs256_signed(header_json: bytes, payload_json: bytes) -> str:
    """Sign raw header and payload JSON bytes with HS256 (PyJWT always writes compact JSON)."""
    signing_input = f"{b64(header_json)}.{b64(payload_json)}"
    signature = hmac.new(HS_SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize(
    ("header_json", "payload_json"),
    [
        (b' {"alg":"HS256","typ":"JWT"}', json.dumps(claims()).encode()),
        (b'{"alg":"HS256","typ":"JWT"}', b"\n" + json.dumps(claims()).encode()),
        (b'{ "alg":"HS256"}', json.dumps(claims()).encode()),
    ],
)
async def test_correctly_signed_json_with_leading_whitespace_is_rejected(
    clock: FakeClock, header_json: bytes, payload_json: bytes
) -> None:
    # Legal JSON, but no JWT library writes it: its segments would not start with "eyJ", the shape by which
    # logs recognise and mask a token that strays into them (a query string, say).
    token = _hs256_signed(header_json, payload_json)
    assert not all(part.startswith("eyJ") for part in token.split(".")[:2])
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, token) == "malformed token"
        compact = _hs256_signed(header_json.replace(b" ", b""), payload_json.strip())
        assert (await auth.authenticate("Bearer " + compact)).user_id == "user-1"


async def test_non_canonical_base64_is_rejected(clock: FakeClock) -> None:
    header, payload, signature = _valid_parts()
    # Flip the unused low bits of the last signature character: same bytes, different spelling.
    last = signature[-1]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    variant = alphabet[alphabet.index(last) ^ 1]
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, f"{header}.{payload}.{signature[:-1]}{variant}") == "malformed token"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing bearer token"),
        ("Basic dXNlcjpwYXNz", "missing bearer token"),
        ("Bearer ", "malformed token"),
    ],
)
async def test_missing_or_empty_bearer_is_rejected(clock: FakeClock, header: str | None, reason: str) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        with pytest.raises(AuthenticationFailed) as info:
            await auth.authenticate(header)
    assert info.value.reason == reason
    assert ("error=" in info.value.headers["WWW-Authenticate"]) is (reason != "missing bearer token")


# --- time claims ------------------------------------------------------------------------------------


async def test_exp_is_required_and_checked_with_leeway(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer(), jwt_leeway_seconds=30), clock) as auth:
        assert await rejection(auth, sign(claims(exp=None), HS_SECRET, "HS256")) == "missing claim: exp"
        assert await rejection(auth, sign(claims(exp="soon"), HS_SECRET, "HS256")) == "invalid claim: exp"
        assert await rejection(auth, sign(claims(exp=int(T0) - 31), HS_SECRET, "HS256")) == "expired"
        within = sign(claims(exp=int(T0) - 20), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {within}")).expires_at == int(T0) - 20


async def test_nbf_and_iat_in_the_future_are_rejected_beyond_leeway(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer(), jwt_leeway_seconds=30), clock) as auth:
        assert await rejection(auth, sign(claims(nbf=int(T0) + 45), HS_SECRET, "HS256")) == "not yet valid"
        assert (
            await rejection(auth, sign(claims(iat=int(T0) + 45), HS_SECRET, "HS256"))
            == "issued in the future"
        )
        ok = sign(claims(nbf=int(T0) + 25, iat=int(T0) + 25), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {ok}")).user_id == "user-1"
        later = sign(claims(nbf=int(T0) + 100, exp=int(T0) + 900), HS_SECRET, "HS256")
        assert await rejection(auth, later) == "not yet valid"
        clock.advance(80)
        assert (await auth.authenticate(f"Bearer {later}")).user_id == "user-1"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [10**400, -(10**400), True], ids=["huge", "huge-negative", "bool"])
async def test_time_claims_beyond_float_range_are_invalid_not_a_crash(
    clock: FakeClock, name: str, value: int
) -> None:
    # JSON integers have no size limit; one past float range must be a 401 like any other bad claim.
    settings = settings_for(hs_issuer(), jwt_max_lifetime_seconds=3600)
    async with started(settings, clock) as auth:
        token = sign(claims(**{name: value}), HS_SECRET, "HS256")
        assert await rejection(auth, token) == f"invalid claim: {name}"


async def test_max_lifetime_is_enforced(clock: FakeClock) -> None:
    settings = settings_for(hs_issuer(), jwt_max_lifetime_seconds=3600)
    async with started(settings, clock) as auth:
        long = sign(claims(iat=int(T0), exp=int(T0) + 7200), HS_SECRET, "HS256")
        assert await rejection(auth, long) == "lifetime too long"
        assert await rejection(auth, sign(claims(iat=None), HS_SECRET, "HS256")) == "missing claim: iat"
        exact = sign(claims(iat=int(T0), exp=int(T0) + 3600), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {exact}")).expires_at == int(T0) + 3600


# --- issuer, audience, subject ----------------------------------------------------------------------


async def test_configured_issuer_and_audience_are_required(clock: FakeClock) -> None:
    issuer = hs_issuer(issuer="https://idp.example", audiences=("gateway", "gateway-2"))
    async with started(settings_for(issuer), clock) as auth:
        good = claims(iss="https://idp.example", aud="gateway-2")
        assert (
            await auth.authenticate("Bearer " + sign(good, HS_SECRET, "HS256"))
        ).issuer == "https://idp.example"
        listed = claims(iss="https://idp.example", aud=["other", "gateway"])
        assert (await auth.authenticate("Bearer " + sign(listed, HS_SECRET, "HS256"))).user_id == "user-1"
        cases = {
            "wrong issuer": claims(iss="https://evil.example", aud="gateway"),
            "missing claim: iss": claims(aud="gateway"),
            "wrong audience": claims(iss="https://idp.example", aud="someone-else"),
            "missing claim: aud": claims(iss="https://idp.example"),
            "invalid claim: aud": claims(iss="https://idp.example", aud=[1, 2]),
        }
        for reason, payload in cases.items():
            assert await rejection(auth, sign(payload, HS_SECRET, "HS256")) == reason


async def test_token_with_audience_is_refused_when_none_configured(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, sign(claims(aud="some-api"), HS_SECRET, "HS256")) == "wrong audience"


async def test_user_claim_is_required_and_configurable(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, sign(claims(sub=None), HS_SECRET, "HS256")) == "missing claim: sub"
        assert await rejection(auth, sign(claims(sub=""), HS_SECRET, "HS256")) == "missing claim: sub"
        assert await rejection(auth, sign(claims(sub="a\nb"), HS_SECRET, "HS256")) == "invalid claim: sub"
    async with started(settings_for(hs_issuer(), jwt_user_claim="email"), clock) as auth:
        token = sign(claims(email="ada@example.com"), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {token}")).user_id == "ada@example.com"
        assert await rejection(auth, sign(claims(), HS_SECRET, "HS256")) == "missing claim: email"


@pytest.mark.parametrize("sub", ["nul\x00", "del\x7f", "next\x85line", "csi\x9b31m", "a\u0080"])
async def test_a_user_id_with_any_control_character_is_refused(clock: FakeClock, sub: str) -> None:
    # README promises user ids without control characters: C1 ones (U+0080-U+009F, NEL among them) too, as
    # for every other text the gateway takes. Audit lines carry the user id as it is.
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert await rejection(auth, sign(claims(sub=sub), HS_SECRET, "HS256")) == "invalid claim: sub"


async def test_a_user_id_of_any_other_text_is_accepted(clock: FakeClock) -> None:
    sub = "José \u00a0東京 😀"  # a no-break space, CJK and an emoji are text, not controls
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert (await auth.authenticate("Bearer " + sign(claims(sub=sub), HS_SECRET, "HS256"))).user_id == sub


async def test_multiple_issuers_are_selected_by_iss(jwks: JwksServer, keys: Keys, clock: FakeClock) -> None:
    first = hs_issuer(issuer="https://a.example", audiences=("gw",))
    second = jwks_issuer(jwks.url, issuer="https://b.example", audiences=("gw-b",))
    third = hs_issuer(OTHER_HS_SECRET, issuer="https://c.example")
    async with started(settings_for(first, second, third), clock) as auth:
        a = await auth.authenticate(
            "Bearer " + sign(claims(iss="https://a.example", aud="gw"), HS_SECRET, "HS256")
        )
        assert a.issuer == "https://a.example"
        b_token = sign(claims(iss="https://b.example", aud="gw-b"), keys.ec, "ES256", kid="k-ec")
        assert (await auth.authenticate(f"Bearer {b_token}")).issuer == "https://b.example"
        c_token = sign(claims(iss="https://c.example"), OTHER_HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {c_token}")).issuer == "https://c.example"
        # Each issuer's keys verify only its own tokens.
        assert (
            await rejection(auth, sign(claims(iss="https://c.example"), HS_SECRET, "HS256"))
            == "bad signature"
        )
        cross = sign(claims(iss="https://a.example", aud="gw"), keys.ec, "ES256", kid="k-ec")
        assert await rejection(auth, cross) == "unsupported algorithm"
        b_hs = sign(claims(iss="https://b.example", aud="gw-b"), HS_SECRET, "HS256")
        assert await rejection(auth, b_hs) == "unsupported algorithm"
        # Audience is per issuer.
        assert await rejection(
            auth, sign(claims(iss="https://a.example", aud="gw-b"), HS_SECRET, "HS256")
        ) == ("wrong audience")
        assert (
            await rejection(auth, sign(claims(iss="https://z.example"), HS_SECRET, "HS256")) == "wrong issuer"
        )
        assert await rejection(auth, sign(claims(), HS_SECRET, "HS256")) == "missing claim: iss"


async def test_single_issuer_without_iss_accepts_tokens_without_iss(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        assert (await auth.authenticate("Bearer " + sign(claims(), HS_SECRET, "HS256"))).issuer is None
    unnamed_among_many = (hs_issuer(), hs_issuer(OTHER_HS_SECRET, issuer="https://c.example"))
    async with started(settings_for(*unnamed_among_many), clock) as auth:
        assert await rejection(auth, sign(claims(), HS_SECRET, "HS256")) == "missing claim: iss"


# --- scopes and agents ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"scope": "convai:session convai:delete"}, {"convai:session", "convai:delete"}),
        ({"scp": ["convai:history", "convai:delete"]}, {"convai:history", "convai:delete"}),
        ({"scp": "convai:history openid"}, {"convai:history", "openid"}),
        ({"scope": ""}, set()),
        ({"scope": "  convai:session   convai:history "}, {"convai:session", "convai:history"}),
        # RFC 6749 3.3: only a space separates scope tokens; other whitespace is part of one opaque token.
        ({"scope": "convai:history\u00a0convai:delete"}, {"convai:history\u00a0convai:delete"}),
        ({"scope": "convai:history\x1fconvai:delete\u2003x"}, {"convai:history\x1fconvai:delete\u2003x"}),
        ({"scp": "convai:history\u00a0convai:delete"}, {"convai:history\u00a0convai:delete"}),
        ({}, {"convai:session", "convai:history"}),
    ],
)
async def test_scopes_come_from_scope_scp_or_default(
    clock: FakeClock, extra: dict[str, Any], expected: set[str]
) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        principal = await auth.authenticate("Bearer " + sign(claims(**extra), HS_SECRET, "HS256"))
    assert principal.scopes == frozenset(expected)


async def test_default_scopes_follow_settings_and_bad_scope_claims_are_rejected(clock: FakeClock) -> None:
    async with started(
        settings_for(hs_issuer(), jwt_default_scopes=frozenset({"convai:history"})), clock
    ) as auth:
        assert (await auth.authenticate("Bearer " + sign(claims(), HS_SECRET, "HS256"))).scopes == {
            "convai:history"
        }
        assert await rejection(auth, sign(claims(scope=["a"]), HS_SECRET, "HS256")) == "invalid claim: scope"
        assert await rejection(auth, sign(claims(scp=[1]), HS_SECRET, "HS256")) == "invalid claim: scp"


async def test_require_scope_names_the_missing_scope(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        principal = await auth.authenticate(
            "Bearer " + sign(claims(scope="convai:session"), HS_SECRET, "HS256")
        )
    principal.require_scope("convai:session")
    with pytest.raises(MissingScope) as info:
        principal.require_scope("convai:delete")
    assert info.value.status == 403
    assert "convai:delete" in info.value.detail
    assert info.value.extra == {"required_scope": "convai:delete"}


async def test_agents_claim_narrows_the_workspace_allowlist(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        narrowed = await auth.authenticate(
            "Bearer " + sign(claims(agents=["agent_b", "agent_z"]), HS_SECRET, "HS256")
        )
        unrestricted = await auth.authenticate("Bearer " + sign(claims(), HS_SECRET, "HS256"))
        assert (
            await rejection(auth, sign(claims(agents="agent_a"), HS_SECRET, "HS256"))
            == "invalid claim: agents"
        )
    assert narrowed.agents == frozenset({"agent_b", "agent_z"})
    assert narrowed.allowed_agents(WORKSPACE_AGENTS) == {"agent_b"}
    narrowed.require_agent("agent_b", WORKSPACE_AGENTS)
    for agent in ("agent_a", "agent_z", "unknown"):
        with pytest.raises(AgentNotAllowed) as info:
            narrowed.require_agent(agent, WORKSPACE_AGENTS)
        assert info.value.status == 403
    assert unrestricted.agents is None
    assert unrestricted.allowed_agents(WORKSPACE_AGENTS) == WORKSPACE_AGENTS
    with pytest.raises(AgentNotAllowed):
        unrestricted.require_agent("agent_z", WORKSPACE_AGENTS)


# --- per-issuer scope allowlist ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"scope": "convai:session convai:history convai:delete convai:act-as"}, {"convai:session"}),
        ({"scp": ["convai:delete", "convai:session", "openid"]}, {"convai:session"}),
        ({"scope": "convai:delete"}, set()),
        ({}, {"convai:session"}),  # the defaults (session, history) are narrowed too
    ],
)
async def test_issuer_allowed_scopes_narrow_the_token_scopes(
    clock: FakeClock, extra: dict[str, Any], expected: set[str]
) -> None:
    restricted = hs_issuer(allowed_scopes=frozenset({"convai:session"}))
    async with started(settings_for(restricted), clock) as auth:
        principal = await auth.authenticate("Bearer " + sign(claims(**extra), HS_SECRET, "HS256"))
    assert principal.scopes == frozenset(expected)


async def test_act_as_outside_the_issuer_allowlist_is_forbidden_also_from_the_cache(clock: FakeClock) -> None:
    partner = hs_issuer(
        OTHER_HS_SECRET, issuer="https://partner.example", allowed_scopes=frozenset({"convai:session"})
    )
    own = hs_issuer(issuer="https://own.example")
    scope = "convai:session convai:act-as"
    partner_token = sign(
        claims(sub="svc", iss="https://partner.example", scope=scope), OTHER_HS_SECRET, "HS256"
    )
    own_token = sign(claims(sub="svc", iss="https://own.example", scope=scope), HS_SECRET, "HS256")
    async with started(settings_for(own, partner), clock) as auth:
        for _ in range(2):  # the second time from the verified-token cache
            with pytest.raises(ActAsNotAllowed) as info:
                await auth.authenticate(f"Bearer {partner_token}", "user-42")
            assert info.value.status == 403
            assert (await auth.authenticate(f"Bearer {partner_token}")).scopes == {"convai:session"}
            acting = await auth.authenticate(f"Bearer {own_token}", "user-42")
            assert (acting.user_id, acting.actor) == ("user-42", "svc")
        assert auth.signature_checks == 2


# --- per-issuer user id namespace --------------------------------------------------------------------

OWN = "https://own.example"
PARTNER = "https://partner.example"


def namespaced_settings(**partner: Any) -> Any:
    """Return settings with an own issuer (no prefix) and a partner issuer with the prefix "partner:"."""
    return settings_for(
        hs_issuer(issuer=OWN),
        hs_issuer(OTHER_HS_SECRET, issuer=PARTNER, user_id_prefix="partner:", **partner),
    )


def partner_token(**overrides: Any) -> str:
    """Return a token of the partner issuer."""
    return sign(claims(iss=PARTNER, **overrides), OTHER_HS_SECRET, "HS256")


async def test_issuer_prefix_is_prepended_to_the_user_id_also_from_the_cache(clock: FakeClock) -> None:
    own_token = sign(claims(sub="alice", iss=OWN), HS_SECRET, "HS256")
    async with started(namespaced_settings(), clock) as auth:
        for _ in range(2):  # the second time from the verified-token cache: the prefixed principal
            partner = await auth.authenticate(f"Bearer {partner_token(sub='alice')}")
            own = await auth.authenticate(f"Bearer {own_token}")
            assert (partner.user_id, own.user_id) == ("partner:alice", "alice")
        assert auth.signature_checks == 2


async def test_act_as_of_a_prefixed_issuer_stays_in_its_namespace(clock: FakeClock) -> None:
    service = partner_token(sub="partner-gw", scope="convai:session convai:act-as")
    async with started(namespaced_settings(), clock) as auth:
        for target in ("alice", "partner:alice", "other:bob"):
            acting = await auth.authenticate(f"Bearer {service}", target)
            assert (acting.user_id, acting.actor) == (f"partner:{target}", "partner:partner-gw")


async def test_user_id_too_long_with_the_prefix_is_a_401(clock: FakeClock) -> None:
    longest = 256 - len("partner:")
    async with started(namespaced_settings(), clock) as auth:
        fits = await auth.authenticate(f"Bearer {partner_token(sub='a' * longest)}")
        assert len(fits.user_id) == 256
        for _ in range(2):
            with pytest.raises(AuthenticationFailed) as info:
                await auth.authenticate(f"Bearer {partner_token(sub='a' * (longest + 1))}")
            assert info.value.reason == "invalid claim: sub"
        # Without the prefix the same length is a valid user id of the own issuer.
        own = sign(claims(sub="a" * (longest + 1), iss=OWN), HS_SECRET, "HS256")
        assert (await auth.authenticate(f"Bearer {own}")).user_id == "a" * (longest + 1)


async def test_issuer_without_a_prefix_cannot_name_a_user_of_a_prefixed_one(clock: FakeClock) -> None:
    forged = sign(claims(sub="partner:alice", iss=OWN), HS_SECRET, "HS256")
    async with started(namespaced_settings(), clock) as auth:
        for _ in range(2):
            with pytest.raises(AuthenticationFailed) as info:
                await auth.authenticate(f"Bearer {forged}")
            assert info.value.reason == "invalid claim: sub"
        # Another separator, or the prefix elsewhere, is no other issuer's namespace.
        for sub in ("partner-alice", "Partner:alice", "x:partner:alice"):
            token = sign(claims(sub=sub, iss=OWN), HS_SECRET, "HS256")
            assert (await auth.authenticate(f"Bearer {token}")).user_id == sub


async def test_prefix_applies_to_the_configured_user_claim(clock: FakeClock) -> None:
    settings = settings_for(hs_issuer(user_id_prefix="t1:"), jwt_user_claim="uid")
    token = sign(claims(sub="ignored", uid="alice"), HS_SECRET, "HS256")
    async with started(settings, clock) as auth:
        assert (await auth.authenticate(f"Bearer {token}")).user_id == "t1:alice"


# --- acting for a user ------------------------------------------------------------------------------


async def test_act_as_scope_lets_a_service_act_for_a_user(clock: FakeClock) -> None:
    service_token = sign(claims(sub="svc-gateway", scope="convai:act-as convai:history"), HS_SECRET, "HS256")
    async with started(settings_for(hs_issuer()), clock) as auth:
        acting = await auth.authenticate(f"Bearer {service_token}", "user-42")
        itself = await auth.authenticate(f"Bearer {service_token}")
    assert acting.user_id == "user-42"
    assert acting.actor == "svc-gateway"
    assert acting.scopes == {"convai:act-as", "convai:history"}
    assert itself.user_id == "svc-gateway" and itself.actor is None


async def test_act_as_header_from_other_tokens_is_forbidden(clock: FakeClock) -> None:
    user_token = sign(claims(scope="convai:session convai:history"), HS_SECRET, "HS256")
    async with started(settings_for(hs_issuer()), clock) as auth:
        with pytest.raises(ActAsNotAllowed) as info:
            await auth.authenticate(f"Bearer {user_token}", "user-42")
    assert info.value.status == 403


@pytest.mark.parametrize(
    "value", ["", "has space", "x" * 129, "tab\there", "nul\x00", "caf\u00e9", "del\x7f"]
)
async def test_malformed_act_as_header_is_rejected(clock: FakeClock, value: str) -> None:
    service_token = sign(claims(sub="svc", scope="convai:act-as"), HS_SECRET, "HS256")
    async with started(settings_for(hs_issuer()), clock) as auth:
        with pytest.raises(InvalidRequest):
            await auth.authenticate(f"Bearer {service_token}", value)
        assert (await auth.authenticate(f"Bearer {service_token}", "x" * 128)).user_id == "x" * 128


# --- verified-token cache ---------------------------------------------------------------------------


async def test_repeated_token_skips_the_signature_check(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        token = sign(claims(), keys.rsa, "RS256", kid="k-rsa")
        first = await auth.authenticate(f"Bearer {token}")
        assert auth.signature_checks == 1
        second = await auth.authenticate(f"Bearer {token}")
        assert auth.signature_checks == 1
        assert second == first
        # Act-as is applied after the cache, per request.
        other = sign(claims(sub="svc", scope="convai:act-as"), keys.rsa, "RS256", kid="k-rsa")
        assert (await auth.authenticate(f"Bearer {other}", "u1")).user_id == "u1"
        assert (await auth.authenticate(f"Bearer {other}", "u2")).user_id == "u2"
        assert auth.signature_checks == 2


async def test_cached_token_expires_with_its_exp(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer(), jwt_leeway_seconds=30), clock) as auth:
        token = sign(claims(exp=int(T0) + 60), HS_SECRET, "HS256")
        await auth.authenticate(f"Bearer {token}")
        clock.advance(89)
        await auth.authenticate(f"Bearer {token}")
        assert auth.signature_checks == 1
        clock.advance(1)
        assert await rejection(auth, token) == "expired"
        assert auth.signature_checks == 2


async def test_token_cache_is_bounded_lru(clock: FakeClock) -> None:
    settings = settings_for(hs_issuer())
    authenticator = Authenticator(settings, clock=clock, token_cache_size=2)
    await authenticator.start()
    try:
        a, b, c = (sign(claims(sub=name), HS_SECRET, "HS256") for name in "abc")
        for token in (a, b, a, c):  # touching `a` again makes `b` the least recently used
            await authenticator.authenticate(f"Bearer {token}")
        assert authenticator.signature_checks == 3
        await authenticator.authenticate(f"Bearer {a}")
        assert authenticator.signature_checks == 3
        await authenticator.authenticate(f"Bearer {b}")
        assert authenticator.signature_checks == 4
    finally:
        await authenticator.aclose()


async def test_failed_tokens_are_not_cached(clock: FakeClock) -> None:
    async with started(settings_for(hs_issuer()), clock) as auth:
        bad = sign(claims(), OTHER_HS_SECRET, "HS256")
        for _ in range(2):
            assert await rejection(auth, bad) == "bad signature"
        assert auth.signature_checks == 2


async def test_cached_token_stops_working_once_its_key_leaves_the_jwks(
    jwks: JwksServer, keys: Keys, clock: FakeClock
) -> None:
    # Removing a compromised key from the JWKS is how an IdP revokes it: a token verified with it before
    # must not live on in the cache until an exp the key's holder chose.
    async with started(settings_for(jwks_issuer(jwks.url)), clock) as auth:
        cache = auth.jwks_caches[0]
        far = int(T0) + 10 * 365 * 86400
        forged = sign(claims(exp=far), keys.rsa, "RS256", kid="k-rsa")
        other = sign(claims(sub="user-2", exp=far), keys.ec, "ES256", kid="k-ec")
        for token in (forged, other):
            await auth.authenticate(f"Bearer {token}")
        assert auth.signature_checks == 2

        # A refresh that returns the same keys leaves the cache alone: hot tokens stay free.
        clock.advance(cache.ttl_seconds)
        assert await cache.refresh_if_due()
        for token in (forged, other):
            await auth.authenticate(f"Bearer {token}")
        assert auth.signature_checks == 2

        jwks.state.keys = [k for k in jwks.state.keys if k["kid"] != "k-rsa"]
        clock.advance(cache.ttl_seconds)
        assert await cache.refresh_if_due()
        assert await rejection(auth, forged) == "unknown key"
        # A token whose key is still published is verified once more against the new set, then cached again.
        assert (await auth.authenticate(f"Bearer {other}")).user_id == "user-2"
        checks = auth.signature_checks
        await auth.authenticate(f"Bearer {other}")
        assert auth.signature_checks == checks
