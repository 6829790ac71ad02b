"""Settings: every contract name is read, validated, and a bad value names its variable."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from service.settings import DEFAULT_RATE_LIMITS, ConfigError, Secret, load_settings

GOOD = {
    "ELEVENLABS_API_KEY": "xi-key",
    "JWT_HS256_SECRET": "s" * 32,
    "ALLOWED_AGENT_IDS": "agent_a, agent_b",
}


def problems(env: dict[str, str]) -> list[str]:
    """Return the problems ConfigError lists for an environment."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


def test_minimal_environment_gives_documented_defaults() -> None:
    settings = load_settings(GOOD)
    assert settings.elevenlabs_base_url == "https://api.elevenlabs.io"
    assert settings.allowed_agent_ids == frozenset({"agent_a", "agent_b"})
    assert settings.jwt_leeway_seconds == 30
    assert settings.jwt_user_claim == "sub"
    assert settings.jwt_default_scopes == frozenset({"convai:session", "convai:history"})
    assert settings.ownership_mode == "ledger_or_user_id"
    assert settings.ledger_ttl_days == 90
    assert settings.rate_limit_on_redis_error == "local"
    assert settings.redis_timeout_seconds == pytest.approx(0.1)
    assert settings.redis_pipeline_limit == 100
    assert settings.egress_proxy_url is None
    assert settings.request_header_timeout_seconds == pytest.approx(10.0)
    assert settings.redis_url is None
    assert dict(settings.rate_limits) == dict(DEFAULT_RATE_LIMITS)
    assert settings.issuers[0].algorithms == ("HS256",)


def test_every_contract_name_is_read() -> None:
    env = {
        **GOOD,
        "ELEVENLABS_BASE_URL": "http://127.0.0.1:9000/",
        "REDIS_URL": "redis://127.0.0.1:6380/1",
        "JWT_JWKS_URL": "http://127.0.0.1:9999/jwks.json",
        "JWT_ISSUER": "https://issuer.example",
        "JWT_AUDIENCE": "gw,other",
        "JWT_LEEWAY_SECONDS": "5",
        "JWT_USER_CLAIM": "uid",
        "JWT_DEFAULT_SCOPES": "convai:session",
        "OWNERSHIP_MODE": "ledger",
        "LEDGER_TTL_DAYS": "7",
        "RATE_LIMIT_ON_REDIS_ERROR": "closed",
        "TRUSTED_PROXIES": "10.0.0.0/8, 127.0.0.1",
        "CORS_ALLOWED_ORIGINS": "https://app.example, http://localhost:3000",
        "REDACT_FIELDS": "metadata.phone_call, analysis.transcript_summary",
        "HOST": "0.0.0.0",  # noqa: S104 - a value under test, not a bind
        "PORT": "9090",
        "LOG_LEVEL": "DEBUG",
    }
    settings = load_settings(env)
    assert settings.elevenlabs_base_url == "http://127.0.0.1:9000"
    assert settings.redis_url == "redis://127.0.0.1:6380/1"
    issuer = settings.issuers[0]
    assert issuer.jwks_url == "http://127.0.0.1:9999/jwks.json"
    assert issuer.issuer == "https://issuer.example"
    assert issuer.audiences == ("gw", "other")
    assert set(issuer.algorithms) == {"HS256", "RS256", "ES256", "EdDSA"}
    assert settings.jwt_leeway_seconds == 5
    assert settings.jwt_user_claim == "uid"
    assert settings.jwt_default_scopes == frozenset({"convai:session"})
    assert settings.ownership_mode == "ledger"
    assert settings.ledger_ttl_days == 7
    assert settings.rate_limit_on_redis_error == "closed"
    assert settings.trusted_proxies == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("127.0.0.1/32"),
    )
    assert settings.cors_allowed_origins == ("https://app.example", "http://localhost:3000")
    assert settings.redact_fields == ("metadata.phone_call", "analysis.transcript_summary")
    assert (settings.host, settings.port, settings.log_level) == ("0.0.0.0", 9090, "DEBUG")  # noqa: S104


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("OWNERSHIP_MODE", "anyone", "OWNERSHIP_MODE: must be one of"),
        ("RATE_LIMIT_ON_REDIS_ERROR", "maybe", "RATE_LIMIT_ON_REDIS_ERROR: must be one of"),
        ("LEDGER_TTL_DAYS", "ninety", "LEDGER_TTL_DAYS: expected an integer"),
        ("LEDGER_TTL_DAYS", "0", "LEDGER_TTL_DAYS: must be between"),
        ("JWT_LEEWAY_SECONDS", "-1", "JWT_LEEWAY_SECONDS: must be between"),
        ("PORT", "70000", "PORT: must be between"),
        ("REDIS_PIPELINE_LIMIT", "-1", "REDIS_PIPELINE_LIMIT: must be between 0 and 10000"),
        ("REDIS_PIPELINE_LIMIT", "many", "REDIS_PIPELINE_LIMIT: expected an integer"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: must be one of"),
        ("REQUEST_HEADER_TIMEOUT_SECONDS", "0", "REQUEST_HEADER_TIMEOUT_SECONDS: must be between"),
        ("REQUEST_HEADER_TIMEOUT_SECONDS", "soon", "REQUEST_HEADER_TIMEOUT_SECONDS: expected a number"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL: must be a URL with scheme"),
        ("ELEVENLABS_BASE_URL", "ftp://x", "ELEVENLABS_BASE_URL: must be a URL"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip", "TRUSTED_PROXIES: 'not-an-ip'"),
        ("CORS_ALLOWED_ORIGINS", "*", "CORS_ALLOWED_ORIGINS: '*' is not allowed"),
        ("CORS_ALLOWED_ORIGINS", "https://app.example/path", "is not an origin"),
        ("JWT_HS256_SECRET", "short", "JWT_HS256_SECRET: an HS256 secret must be at least 32 bytes"),
        ("JWT_JWKS_URL", "http://idp.example/jwks", "JWT_JWKS_URL: must use https"),
        ("JWT_DEFAULT_SCOPES", "convai:session convai:delete", "convai:delete can never be a default"),
        ("ALLOWED_AGENT_IDS", "", "ALLOWED_AGENT_IDS: required"),
    ],
)
def test_bad_value_names_the_variable_and_reason(name: str, value: str, fragment: str) -> None:
    found = problems({**GOOD, name: value})
    assert any(fragment in p for p in found), found


def test_all_problems_are_reported_at_once() -> None:
    found = problems({"OWNERSHIP_MODE": "x", "PORT": "x"})
    text = "\n".join(found)
    for name in ("ELEVENLABS_API_KEY", "JWT_HS256_SECRET", "ALLOWED_AGENT_IDS", "OWNERSHIP_MODE", "PORT"):
        assert name in text


def test_api_key_file_is_read_and_exclusive(tmp_path: Path) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("xi-from-file\n")
    env = {k: v for k, v in GOOD.items() if k != "ELEVENLABS_API_KEY"}
    settings = load_settings({**env, "ELEVENLABS_API_KEY_FILE": str(key_file)})
    assert settings.elevenlabs_api_key.reveal() == "xi-from-file"
    found = problems({**GOOD, "ELEVENLABS_API_KEY_FILE": str(key_file)})
    assert any("both set" in p for p in found)
    found = problems({**env, "ELEVENLABS_API_KEY_FILE": str(tmp_path / "missing")})
    assert any(p.startswith("ELEVENLABS_API_KEY_FILE: cannot read") for p in found)


@pytest.mark.parametrize(
    "value",
    [
        "ftp://user:hunter2pw@proxy.internal:3128",
        "https://user:hunter2pw@proxy.internal:3129",
        "http://user:hunter2pw@",
        "http://user:hunter2pw@proxy.internal:3128/some/path",
        "http://user:hunter2pw@proxy.internal:3128?x=1",
        "http://user:hunter2pw@proxy.internal:notaport",
        "proxy.internal:3128",
    ],
)
def test_bad_egress_proxy_url_is_refused_without_echoing_it(value: str) -> None:
    found = problems({**GOOD, "EGRESS_PROXY_URL": value})
    [problem] = [p for p in found if p.startswith("EGRESS_PROXY_URL:")]
    assert "http://[user:password@]host:port" in problem
    assert "hunter2pw" not in "\n".join(found)
    assert "proxy.internal" not in problem


@pytest.mark.parametrize(
    "value", ["http://proxy.internal:3128", "http://user:pw@proxy.internal:3129/", "http://[::1]:8888"]
)
def test_egress_proxy_url_is_kept_as_a_secret(value: str) -> None:
    settings = load_settings({**GOOD, "EGRESS_PROXY_URL": value})
    assert settings.egress_proxy_url == Secret(value)
    assert "proxy.internal" not in repr(settings)


def test_secrets_never_show_in_repr() -> None:
    settings = load_settings({**GOOD, "ELEVENLABS_API_KEY": "xi-very-secret-value"})
    text = repr(settings) + str(settings)
    assert "xi-very-secret-value" not in text
    assert "s" * 32 not in text
    assert repr(Secret("abc")) == "Secret('**********')"


def test_settings_are_frozen() -> None:
    settings = load_settings(GOOD)
    with pytest.raises(AttributeError):
        settings.port = 1  # type: ignore[misc]


def test_toml_config_sets_policies_issuers_and_redis(tmp_path: Path) -> None:
    pem = tmp_path / "pub.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n")
    config = tmp_path / "gateway.toml"
    config.write_text(
        f"""
[[issuers]]
issuer = "https://partner.example"
audiences = ["gw"]
hs256_secret_env = "PARTNER_SECRET"

[[issuers]]
issuer = "https://pem.example"
public_key_file = "{pem}"
algorithms = ["EdDSA"]

[rate_limits.user-session]
limit = 3
period_seconds = 10
burst = 2
shadow = true

[redis]
sentinels = ["127.0.0.1:26379", "127.0.0.1:26380"]
sentinel_service = "mymaster"
"""
    )
    settings = load_settings({**GOOD, "GATEWAY_CONFIG": str(config), "PARTNER_SECRET": "p" * 40})
    session = settings.rate_limits["user-session"]
    assert (session.limit, session.period_seconds, session.burst, session.shadow) == (3, 10.0, 2, True)
    assert settings.rate_limits["user-history"] == DEFAULT_RATE_LIMITS["user-history"]
    assert [i.issuer for i in settings.issuers] == [None, "https://partner.example", "https://pem.example"]
    assert settings.issuers[1].hs256_secret == Secret("p" * 40)
    assert settings.issuers[2].algorithms == ("EdDSA",)
    assert settings.redis.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert settings.redis.configured


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[rate_limits.user-sesion]\nlimit = 1\n", "rate_limits.user-sesion: unknown policy"),
        (
            "[rate_limits.user-session]\nlimit = 0\n",
            "rate_limits.user-session.limit: must be a positive integer",
        ),
        ("[rate_limits.user-session]\nperiod_seconds = -1\n", "period_seconds: must be a positive number"),
        ("[rate_limits.user-session]\nshadow = 'yes'\n", "shadow: must be true or false"),
        ('[[issuers]]\nissuer = "x"\n', "issuers[0]: needs hs256_secret_env, jwks_url or public_key_file"),
        ('[[issuers]]\nhs256_secret_env = "NOPE"\n', "variable NOPE is not set"),
        ("[redis]\ncluster = true\n", "redis.cluster needs REDIS_URL"),
        ("[surprise]\n", "unknown sections surprise"),
        ("not toml = = =", "is not valid TOML"),
    ],
)
def test_bad_toml_names_the_key(tmp_path: Path, toml: str, fragment: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    found = problems({**GOOD, "GATEWAY_CONFIG": str(config)})
    assert any(fragment in p for p in found), found
