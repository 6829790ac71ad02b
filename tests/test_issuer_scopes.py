"""Per-issuer scope allowlists through the real app, and the start-up warning about unbounded act-as."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from service.app import create_app
from service.settings import load_settings
from tests.support.gateway import TEST_JWT_SECRET, Gateway
from tests.support.issuers import (
    ACTING,
    LIST,
    OWN,
    PARTNER,
    PARTNER_SECRET,
    SIGNED_URL,
    own_and_partner,
    partner_headers,
)


@pytest.fixture
async def two_issuers(
    tmp_path: Path, make_gateway: Callable[..., AbstractAsyncContextManager[Gateway]]
) -> AsyncIterator[Gateway]:
    """Yield a gateway trusting its own issuer (environment, no allowlist) and a partner bound to sessions."""
    async with own_and_partner(tmp_path, make_gateway, 'allowed_scopes = ["convai:session"]') as gateway:
        yield gateway


async def test_restricted_issuer_cannot_list_conversations_its_token_claims(two_issuers: Gateway) -> None:
    partner = partner_headers("bob", "convai:session convai:history")
    for _ in range(2):  # the second request verifies nothing: the token comes from the cache
        refused = await two_issuers.client.get(LIST, headers=partner)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "insufficient_scope"
        assert refused.json()["required_scope"] == "convai:history"
    assert await two_issuers.upstream_requests() == []
    own = await two_issuers.client.get(LIST, headers=two_issuers.headers("bob", issuer=OWN))
    assert own.status_code == 200, own.text
    minted = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner)
    assert minted.status_code == 200, minted.text


async def test_restricted_issuer_cannot_act_as_even_with_the_scope_in_its_token(two_issuers: Gateway) -> None:
    partner = {**partner_headers("partner-gw", ACTING), "X-On-Behalf-Of": "carol"}
    for _ in range(2):
        refused = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=partner)
        assert refused.status_code == 403, refused.text
        assert refused.json()["code"] == "act_as_not_allowed"
    assert await two_issuers.upstream_requests() == []
    own = {**two_issuers.headers("own-gw", scopes=ACTING, issuer=OWN), "X-On-Behalf-Of": "carol"}
    for _ in range(2):
        acting = await two_issuers.client.get(SIGNED_URL, params={"agent_id": "agent_demo"}, headers=own)
        assert acting.status_code == 200, acting.text


# --- the start-up warning ---------------------------------------------------------------------------


def warnings_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture, toml: str, **env: str) -> list[str]:
    """Build the app from this configuration and return the WARNING lines it logged."""
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    settings = load_settings(
        {
            "ELEVENLABS_API_KEY": "xi-key",
            "ALLOWED_AGENT_IDS": "agent_demo",
            "JWT_HS256_SECRET": TEST_JWT_SECRET,
            "PARTNER_SECRET": PARTNER_SECRET,
            "GATEWAY_CONFIG": str(config),
            **env,
        }
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        create_app(settings)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


PARTNER_ENTRY = f'[[issuers]]\nissuer = "{PARTNER}"\nhs256_secret_env = "PARTNER_SECRET"\n'
SESSIONS_ONLY = 'allowed_scopes = ["convai:session"]\n'


PREFIXED = 'user_id_prefix = "partner:"\n'


def act_as_warnings(lines: list[str]) -> list[str]:
    """Return the warnings about issuers that may grant act-as."""
    return [line for line in lines if "convai:act-as" in line]


def namespace_warnings(lines: list[str]) -> list[str]:
    """Return the warnings about issuers sharing the un-prefixed user id namespace."""
    return [line for line in lines if "user_id_prefix" in line]


def test_warning_names_each_issuer_that_may_grant_act_as_without_an_allowlist(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    toml = PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED
    (warning,) = warnings_at_start(tmp_path, caplog, toml, JWT_ISSUER=OWN)
    assert OWN in warning and PARTNER not in warning
    assert "convai:act-as" in warning and "allowed_scopes" in warning and "JWT_ALLOWED_SCOPES" in warning
    assert TEST_JWT_SECRET not in warning and PARTNER_SECRET not in warning
    (both,) = act_as_warnings(warnings_at_start(tmp_path, caplog, PARTNER_ENTRY, JWT_ISSUER=OWN))
    assert OWN in both and PARTNER in both


@pytest.mark.parametrize(
    ("toml", "env", "reach"),
    [
        # Unprefixed, its X-On-Behalf-Of may name anyone, "partner:alice" too; prefixed, only its own users.
        (
            PARTNER_ENTRY + PREFIXED,
            {"JWT_ISSUER": OWN},
            f"2 of them may grant convai:act-as without a scope allowlist, each impersonating the users in "
            f"brackets: {OWN} (any user, of any issuer, prefixed user ids included), {PARTNER} (only users "
            "under its prefix 'partner:'); ",
        ),
        (
            PARTNER_ENTRY,
            {"JWT_ISSUER": OWN, "JWT_USER_ID_PREFIX": "own:"},
            f"2 of them may grant convai:act-as without a scope allowlist, each impersonating the users in "
            f"brackets: {OWN} (only users under its prefix 'own:'), {PARTNER} (any user, of any issuer, prefixed "
            "user ids included); ",
        ),
        (
            PARTNER_ENTRY,
            {"JWT_ISSUER": OWN},
            f"2 of them may grant convai:act-as without a scope allowlist, each impersonating the users in "
            f"brackets: {OWN} (any user, of any issuer), {PARTNER} (any user, of any issuer); ",
        ),
        (
            PARTNER_ENTRY + PREFIXED,
            {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": "convai:history"},
            f"1 of them may grant convai:act-as without a scope allowlist, each impersonating the users in "
            f"brackets: {PARTNER} (only users under its prefix 'partner:'); ",
        ),
    ],
    ids=["unprefixed-and-prefixed", "prefixed-and-unprefixed", "none-prefixed", "prefixed-only"],
)
def test_act_as_warning_names_the_users_each_issuer_can_reach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, toml: str, env: dict[str, str], reach: str
) -> None:
    (warning,) = act_as_warnings(warnings_at_start(tmp_path, caplog, toml, **env))
    assert warning == (
        f"2 token issuers are configured, and {reach}give every issuer allowed_scopes in [[issuers]] "
        "(JWT_ALLOWED_SCOPES for the environment issuer)"
    )


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        ("", {}),  # one issuer: its API gateway's token needs act-as, and there is no other issuer to attack
        (PARTNER_ENTRY, {"JWT_HS256_SECRET": ""}),  # one issuer, from the file (empty: unset)
        (PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED, {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": ACTING}),
        (
            PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED,
            {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": "convai:history"},
        ),
    ],
    ids=["environment-only", "file-only", "act-as-listed", "all-bounded"],
)
def test_no_warning_when_no_second_issuer_or_every_issuer_is_bounded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, toml: str, env: dict[str, str]
) -> None:
    assert warnings_at_start(tmp_path, caplog, toml, **env) == []


THIRD = "https://third.example"
THIRD_ENTRY = f'[[issuers]]\nissuer = "{THIRD}"\nhs256_secret_env = "PARTNER_SECRET"\n'


@pytest.mark.parametrize(
    ("toml", "env", "sharing"),
    [
        (PARTNER_ENTRY + SESSIONS_ONLY, {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": ACTING}, [OWN, PARTNER]),
        (
            PARTNER_ENTRY + SESSIONS_ONLY + "\n" + THIRD_ENTRY + SESSIONS_ONLY,
            {"JWT_HS256_SECRET": ""},
            [PARTNER, THIRD],
        ),
        (
            PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED + "\n" + THIRD_ENTRY + SESSIONS_ONLY,
            {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": ACTING},
            [OWN, THIRD],
        ),
    ],
    ids=["environment-and-file", "two-from-the-file", "two-of-three"],
)
def test_warning_names_the_issuers_sharing_the_unprefixed_namespace(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, toml: str, env: dict[str, str], sharing: list[str]
) -> None:
    lines = warnings_at_start(tmp_path, caplog, toml, **env)
    assert act_as_warnings(lines) == []  # every issuer is bounded: this warning is the namespace one alone
    (warning,) = lines
    assert warning == namespace_warnings(lines)[0]
    assert [iss for iss in (OWN, PARTNER, THIRD) if iss in warning] == sharing
    assert "JWT_USER_ID_PREFIX" in warning
    assert TEST_JWT_SECRET not in warning and PARTNER_SECRET not in warning


@pytest.mark.parametrize(
    ("toml", "env"),
    [
        (PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED, {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": ACTING}),
        (
            PARTNER_ENTRY + SESSIONS_ONLY + PREFIXED,
            {"JWT_ISSUER": OWN, "JWT_ALLOWED_SCOPES": ACTING, "JWT_USER_ID_PREFIX": "own:"},
        ),
        (PARTNER_ENTRY + PREFIXED, {"JWT_HS256_SECRET": ""}),  # one issuer, with a prefix
        ("", {"JWT_USER_ID_PREFIX": "own:"}),
    ],
    ids=["one-unprefixed", "all-prefixed", "file-only", "environment-only"],
)
def test_no_namespace_warning_when_at_most_one_issuer_is_unprefixed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, toml: str, env: dict[str, str]
) -> None:
    assert namespace_warnings(warnings_at_start(tmp_path, caplog, toml, **env)) == []


def test_both_warnings_when_both_apply(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = warnings_at_start(tmp_path, caplog, PARTNER_ENTRY, JWT_ISSUER=OWN)
    assert len(lines) == 2 and len(act_as_warnings(lines)) == 1 and len(namespace_warnings(lines)) == 1
