"""Settings: every contract name is read, validated, and a bad value names its variable."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from service.auth import Authenticator
from service.openapi import OPERATIONS
from service.settings import (
    ACT_AS_SCOPE,
    DEFAULT_RATE_LIMITS,
    KNOWN_SCOPES,
    SUPPORTED_REDIS_OPTIONS,
    ConfigError,
    Secret,
    load_settings,
)
from tests.auth.support import FakeClock, PrivateKey, claims, public_pem, sign
from tests.support.tls import TlsFiles

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
    assert settings.rate_limit_ipv6_prefix == 64
    assert settings.egress_proxy_url is None
    assert settings.request_header_timeout_seconds == pytest.approx(10.0)
    assert settings.redis_url is None
    assert dict(settings.rate_limits) == dict(DEFAULT_RATE_LIMITS)
    assert settings.issuers[0].algorithms == ("HS256",)


def test_ipv6_prefix_of_the_auth_failure_limit_is_read() -> None:
    assert load_settings({**GOOD, "RATE_LIMIT_IPV6_PREFIX": "56"}).rate_limit_ipv6_prefix == 56


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
        ("RATE_LIMIT_IPV6_PREFIX", "31", "RATE_LIMIT_IPV6_PREFIX: must be between 32 and 128"),
        ("RATE_LIMIT_IPV6_PREFIX", "129", "RATE_LIMIT_IPV6_PREFIX: must be between 32 and 128"),
        ("RATE_LIMIT_IPV6_PREFIX", "/64", "RATE_LIMIT_IPV6_PREFIX: expected an integer"),
        ("UPSTREAM_MAX_AUDIO_STREAMS", "101", "UPSTREAM_MAX_AUDIO_STREAMS: must be between 1 and 100"),
        ("UPSTREAM_MAX_AUDIO_STREAMS", "0", "UPSTREAM_MAX_AUDIO_STREAMS: must be between 1 and 100"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL: must be one of"),
        ("REQUEST_HEADER_TIMEOUT_SECONDS", "0", "REQUEST_HEADER_TIMEOUT_SECONDS: must be between"),
        ("REQUEST_HEADER_TIMEOUT_SECONDS", "soon", "REQUEST_HEADER_TIMEOUT_SECONDS: expected a number"),
        ("KEEP_ALIVE_TIMEOUT_SECONDS", "0", "KEEP_ALIVE_TIMEOUT_SECONDS: must be between 1 and 3600"),
        ("KEEP_ALIVE_TIMEOUT_SECONDS", "75s", "KEEP_ALIVE_TIMEOUT_SECONDS: expected an integer"),
        ("MAX_CONNECTIONS", "0", "MAX_CONNECTIONS: must be between 1 and 1000000"),
        ("MAX_CONNECTIONS", "lots", "MAX_CONNECTIONS: expected an integer"),
        ("REDIS_URL", "http://127.0.0.1:6379", "REDIS_URL: must be a URL with scheme"),
        ("ELEVENLABS_BASE_URL", "ftp://x", "ELEVENLABS_BASE_URL: must be a URL"),
        # Unparsable URLs were a ValueError traceback (exit 1 instead of 2).
        (
            "ELEVENLABS_BASE_URL",
            "http://[::1",
            "ELEVENLABS_BASE_URL: must be a URL with scheme https/http; it does not",
        ),
        (
            "REDIS_URL",
            "redis://:s3cret@[bad",
            "REDIS_URL: must be a URL with scheme redis/rediss/unix; it does not",
        ),
        ("JWT_JWKS_URL", "https://[::1/jwks", "JWT_JWKS_URL: must be a URL"),
        ("CORS_ALLOWED_ORIGINS", "https://[::1", "is not an origin"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,not-an-ip", "TRUSTED_PROXIES: 'not-an-ip'"),
        # Trusting every address makes the walk end at the left-most X-Forwarded-For entry: the client's own.
        ("TRUSTED_PROXIES", "10.0.0.0/8, 0.0.0.0/0", "TRUSTED_PROXIES: '0.0.0.0/0' trusts every address"),
        ("TRUSTED_PROXIES", "::/0", "TRUSTED_PROXIES: '::/0' trusts every address"),
        ("TRUSTED_PROXIES", "203.0.113.7/0", "TRUSTED_PROXIES: '203.0.113.7/0' trusts every address"),
        ("CORS_ALLOWED_ORIGINS", "*", "CORS_ALLOWED_ORIGINS: '*' is not allowed"),
        ("CORS_ALLOWED_ORIGINS", "https://app.example/path", "is not an origin"),
        # Parts a browser's Origin header never has: such an entry could never match.
        ("CORS_ALLOWED_ORIGINS", "https://app.example?x=1", "is not an origin"),
        ("CORS_ALLOWED_ORIGINS", "https://app.example#top", "is not an origin"),
        ("CORS_ALLOWED_ORIGINS", "https://user@app.example", "is not an origin"),
        ("JWT_HS256_SECRET", "short", "JWT_HS256_SECRET: an HS256 secret must be at least 32 bytes"),
        ("JWT_JWKS_URL", "http://idp.example/jwks", "JWT_JWKS_URL: must use https"),
        ("JWT_DEFAULT_SCOPES", "convai:session convai:delete", "convai:delete can never be a default"),
        ("JWT_DEFAULT_SCOPES", "convai:session convai:feedback", "unknown scopes 'convai:feedback'"),
        ("ALLOWED_AGENT_IDS", "", "ALLOWED_AGENT_IDS: required"),
    ],
)
def test_bad_value_names_the_variable_and_reason(name: str, value: str, fragment: str) -> None:
    found = problems({**GOOD, name: value})
    assert any(fragment in p for p in found), found


def test_url_problems_never_echo_the_url() -> None:
    # A Redis URL carries its password: check-config prints problems into init-container logs.
    for url in ("http://:supersecret@redis:6379", "redis://:supersecret@[redis"):
        found = problems({**GOOD, "REDIS_URL": url})
        assert [p for p in found if p.startswith("REDIS_URL:")], found
        assert not [p for p in found if "supersecret" in p], found


@pytest.mark.parametrize(
    ("query", "option"),
    [
        ("socket_timeout=5", "socket_timeout"),
        ("socket_connect_timeout=5", "socket_connect_timeout"),
        ("timeout=5", "timeout"),
        ("socket%5Ftimeout=5", "socket_timeout"),  # redis-py percent-decodes option names too
        ("retry_on_timeout=true", "retry_on_timeout"),
        ("retry_on_error=ConnectionError", "retry_on_error"),
        ("retry=0", "retry"),
        ("decode_responses=false", "decode_responses"),
        ("encoding=latin-1", "encoding"),
        ("encoding_errors=strict", "encoding_errors"),
        ("client_name=gw&socket_timeout=5", "socket_timeout"),
    ],
)
def test_redis_url_options_the_gateway_sets_itself_are_refused(query: str, option: str) -> None:
    # redis-py lets URL options override the client's keyword arguments: `?socket_timeout=5` made every
    # command wait 5 s whatever REDIS_TIMEOUT_MS said.
    found = problems({**GOOD, "REDIS_URL": f"redis://:hunter2-url-pass@127.0.0.1:6380/0?{query}"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert "REDIS_TIMEOUT_MS" in problem and option in problem
    assert "hunter2-url-pass" not in problem and "127.0.0.1" not in problem


def test_a_refused_redis_url_option_is_named_without_its_value() -> None:
    found = problems({**GOOD, "REDIS_URL": "redis://127.0.0.1:6380/0?socket_timeout=5&retry_on_timeout=yes"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert "socket_timeout" in problem and "retry_on_timeout" in problem
    assert "yes" not in problem and "=5" not in problem


@pytest.mark.parametrize("topology", ["", "[redis]\ncluster = true\n"])
def test_redis_url_options_the_gateway_does_not_set_are_kept(topology: str, tmp_path: Path) -> None:
    url = "redis://127.0.0.1:6380/0?health_check_interval=10&client_name=gw&max_connections=50"
    env = {**GOOD, "REDIS_URL": url}
    if topology:
        config = tmp_path / "gateway.toml"
        config.write_text(topology)
        env["GATEWAY_CONFIG"] = str(config)
    assert load_settings(env).redis.url == url


@pytest.mark.parametrize("query", ["foo=bar", "health_check_intervall=10", "credential_provider=x"])
def test_redis_url_options_redis_py_cannot_take_are_refused(query: str) -> None:
    # redis-py passes an unknown option to the connection class, which raised TypeError on every
    # connection attempt: a 500 on every request instead of a refusal at start.
    found = problems({**GOOD, "REDIS_URL": f"redis://:hunter2-url-pass@127.0.0.1:6380/0?{query}"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert query.partition("=")[0] in problem and "supported: " in problem
    assert "hunter2-url-pass" not in problem and "127.0.0.1" not in problem


@pytest.mark.parametrize(
    ("url", "option", "needs"),
    [
        ("redis://:hunter2-url-pass@127.0.0.1:6380/0?ssl_ca_certs=/etc/ca.pem", "ssl_ca_certs", "rediss://"),
        ("redis://:hunter2-url-pass@127.0.0.1:6380/0?ssl_cert_reqs=required", "ssl_cert_reqs", "rediss://"),
        ("unix:///run/redis.sock?password=hunter2-url-pass&ssl_certfile=/c.pem", "ssl_certfile", "rediss://"),
        ("unix:///run/redis.sock?password=hunter2-url-pass&socket_keepalive=true", "socket_keepalive", "TCP"),
    ],
)
def test_redis_url_options_its_scheme_cannot_take_are_refused(url: str, option: str, needs: str) -> None:
    # redis-py's plain TCP and Unix-socket connections take no TLS options, and a Unix socket no keep-alive: each
    # connection attempt raised TypeError, a 500 on every request (and a Cluster client silently went plaintext).
    found = problems({**GOOD, "REDIS_URL": url})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert option in problem and needs in problem
    assert "hunter2-url-pass" not in problem and "/etc/ca.pem" not in problem


def test_tls_options_are_kept_on_a_rediss_url(tls_files: TlsFiles) -> None:
    url = (
        f"rediss://127.0.0.1:6380/0?ssl_cert_reqs=required&ssl_ca_certs={tls_files.ca}&socket_keepalive=true"
    )
    assert load_settings({**GOOD, "REDIS_URL": url}).redis.url == url


# Values redis-py would take and then fail on: at start with its own ValueError (which names no variable), on
# every connection (a RedisError the limiter takes for an outage), or silently (`to_bool` reads any word it does
# not know as true).
BAD_REDIS_OPTION_VALUES = [
    ("ssl_cert_reqs=bogus", "ssl_cert_reqs", "none, optional or required"),
    ("ssl_cert_reqs=REQUIRED", "ssl_cert_reqs", "none, optional or required"),  # compared as given
    ("ssl_min_version=bogus", "ssl_min_version", "771 (TLS 1.2) or 772 (TLS 1.3)"),
    ("ssl_min_version=5", "ssl_min_version", "771 (TLS 1.2) or 772 (TLS 1.3)"),  # OpenSSL refuses it
    ("ssl_min_version=769", "ssl_min_version", "771 (TLS 1.2) or 772 (TLS 1.3)"),  # TLS 1.0: deprecated
    ("ssl_min_version=7_71", "ssl_min_version", "771 (TLS 1.2)"),  # int() would take it
    ("ssl_check_hostname=maybe", "ssl_check_hostname", "true or false"),
    ("ssl_check_hostname=off", "ssl_check_hostname", "true or false"),  # redis-py reads it as true
    ("socket_keepalive=off", "socket_keepalive", "true or false"),
    ("ssl_include_verify_flags=VERIFY_BOGUS", "ssl_include_verify_flags", "VERIFY_X509_STRICT"),
    ("ssl_exclude_verify_flags=__doc__", "ssl_exclude_verify_flags", "VERIFY_X509_STRICT"),
    (
        "ssl_include_verify_flags=VERIFY_X509_STRICT,,VERIFY_X509_PARTIAL_CHAIN",
        "ssl_include_verify_flags",
        "comma-separated",
    ),
    ("ssl_ciphers=NOT-A-CIPHER", "ssl_ciphers", "selecting at least one cipher"),
    ("ssl_ca_certs=/nonexistent/ca.pem", "ssl_ca_certs", "readable PEM file of CA certificates"),
    ("ssl_ca_path=/nonexistent/certs", "ssl_ca_path", "directory of CA certificates"),
    ("ssl_certfile=/nonexistent/client.pem", "ssl_certfile", "readable PEM client certificate"),
    ("ssl_keyfile=/nonexistent/client.key", "ssl_keyfile", "needs ssl_certfile"),
    ("db=x", "db", "a database number"),
    ("db=-1", "db", "a database number"),
    ("max_connections=0", "max_connections", "a positive integer"),
    ("max_connections=ten", "max_connections", "a positive integer"),
    ("health_check_interval=1.5", "health_check_interval", "a whole number of seconds"),
    ("client_name=gateway%20one", "client_name", "printable ASCII without spaces"),
    ("ssl_cert_reqs=required&ssl_cert_reqs=bogus", "ssl_cert_reqs", "none, optional or required"),
]


@pytest.mark.parametrize(("query", "option", "allowed"), BAD_REDIS_OPTION_VALUES)
def test_bad_redis_url_option_values_are_named_with_what_is_allowed(
    query: str, option: str, allowed: str
) -> None:
    found = problems({**GOOD, "REDIS_URL": f"rediss://:hunter2-url-pass@127.0.0.1:6380/0?{query}"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert option in problem and allowed in problem
    value = query.rpartition("=")[2]
    assert "hunter2-url-pass" not in problem and "127.0.0.1" not in problem and value not in problem


def test_an_unreadable_or_encrypted_client_key_is_refused(tls_files: TlsFiles) -> None:
    base = f"rediss://127.0.0.1:6380/0?ssl_certfile={tls_files.client_cert}"
    not_pem = problems({**GOOD, "REDIS_URL": f"{base}&ssl_keyfile={tls_files.ca}"})
    assert [p for p in not_pem if "ssl_certfile/ssl_keyfile must name" in p], not_pem
    # OpenSSL would prompt for the passphrase on the terminal, on each connection.
    encrypted = problems({**GOOD, "REDIS_URL": f"{base}&ssl_keyfile={tls_files.encrypted_client_key}"})
    assert [p for p in encrypted if "is encrypted" in p], encrypted


def test_good_redis_url_option_values_are_kept(tls_files: TlsFiles) -> None:
    options = (
        f"ssl_cert_reqs=required&ssl_ca_certs={tls_files.ca}&ssl_ca_path={tls_files.directory}"
        f"&ssl_certfile={tls_files.client_cert}&ssl_keyfile={tls_files.client_key}&ssl_check_hostname=YES"
        "&ssl_min_version=772&ssl_ciphers=ECDHE%2BAESGCM&socket_keepalive=0&db=3&max_connections=20"
        "&health_check_interval=0&client_name=gateway-1"
        "&ssl_include_verify_flags=[VERIFY_X509_STRICT, VERIFY_X509_PARTIAL_CHAIN]"
        "&ssl_exclude_verify_flags=VERIFY_X509_TRUSTED_FIRST"
    )
    url = f"rediss://user:pass@127.0.0.1:6380/3?{options}"
    assert load_settings({**GOOD, "REDIS_URL": url}).redis.url == url
    for value in ("none", "optional"):
        url = f"rediss://127.0.0.1:6380?ssl_cert_reqs={value}&ssl_check_hostname=f&ssl_min_version=771"
        assert load_settings({**GOOD, "REDIS_URL": url}).redis.url == url


@pytest.mark.parametrize(
    "path", ["/abc", "/0x", "/-1", "/1/2", "/1%2F2", "/%20", "/1.0", "/1_0", "/" + "9" * 10]
)
@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_a_redis_url_path_that_is_no_database_number_is_refused(scheme: str, path: str) -> None:
    # redis-py ignores a path int() cannot read (and reads `/1/2` as 12), so the gateway used database 0 (or
    # another) while the operator meant a different one.
    found = problems({**GOOD, "REDIS_URL": f"{scheme}://:hunter2-url-pass@127.0.0.1:6380{path}"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert "path must be a database number (0 or more)" in problem
    assert "hunter2-url-pass" not in problem and "127.0.0.1" not in problem and path not in problem


def test_a_redis_url_path_and_a_different_db_option_are_refused() -> None:
    # redis-py takes `?db=` and ignores the path when both are given.
    found = problems({**GOOD, "REDIS_URL": "redis://:hunter2-url-pass@127.0.0.1:6380/2?db=3"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert "path" in problem and "db" in problem and "hunter2-url-pass" not in problem


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6380",
        "redis://127.0.0.1:6380/",
        "redis://127.0.0.1:6380/0",
        "rediss://127.0.0.1:6380/15",
        "redis://127.0.0.1:6380/%31",  # redis-py percent-decodes the path: database 1
        "redis://127.0.0.1:6380/3?db=3",
        "redis://127.0.0.1:6380?db=3",
        # A unix:// URL's path is the socket; its database comes from `?db=`.
        "unix:///run/redis/redis.sock",
        "unix:///run/redis/redis.sock?db=2",
    ],
)
def test_a_redis_url_path_naming_a_database_or_the_socket_is_kept(url: str) -> None:
    assert load_settings({**GOOD, "REDIS_URL": url}).redis.url == url


def test_a_redis_url_option_name_that_looks_like_no_option_is_not_echoed() -> None:
    found = problems({**GOOD, "REDIS_URL": "redis://127.0.0.1:6380/0?sk_PASTED-SECRET-9f8e=1&foo=1"})
    (problem,) = [p for p in found if p.startswith("REDIS_URL:")]
    assert "PASTED" not in problem and "foo" in problem and "1 more not shown" in problem


def test_every_supported_redis_url_option_is_one_redis_py_accepts() -> None:
    import inspect

    from redis.asyncio import connection

    accepted = set(connection.URL_QUERY_ARGUMENT_PARSERS) | {"max_connections"}
    for cls in (
        connection.AbstractConnection,
        connection.SSLConnection,
        connection.UnixDomainSocketConnection,
    ):
        accepted |= set(inspect.signature(cls.__init__).parameters)
    assert SUPPORTED_REDIS_OPTIONS <= accepted


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
    pem.write_text(public_pem(ed25519.Ed25519PrivateKey.generate()))
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
    settings = load_settings(
        {
            **GOOD,
            "JWT_ISSUER": "https://env.example",
            "GATEWAY_CONFIG": str(config),
            "PARTNER_SECRET": "p" * 40,
        }
    )
    session = settings.rate_limits["user-session"]
    assert (session.limit, session.period_seconds, session.burst, session.shadow) == (3, 10.0, 2, True)
    assert settings.rate_limits["user-history"] == DEFAULT_RATE_LIMITS["user-history"]
    assert [i.issuer for i in settings.issuers] == [
        "https://env.example",
        "https://partner.example",
        "https://pem.example",
    ]
    assert settings.issuers[1].hs256_secret == Secret("p" * 40)
    assert settings.issuers[2].algorithms == ("EdDSA",)
    assert settings.redis.sentinels == (("127.0.0.1", 26379), ("127.0.0.1", 26380))
    assert settings.redis.configured


def test_an_omitted_rate_limit_key_keeps_its_default_but_burst_follows_a_new_limit(tmp_path: Path) -> None:
    # README: omitted keys keep their defaults, except burst, which follows a limit you set.
    config = tmp_path / "gateway.toml"
    config.write_text(
        "[rate_limits.user-session]\nlimit = 20\n\n"
        "[rate_limits.user-history]\nperiod_seconds = 30\n\n"
        "[rate_limits.agent-session]\nburst = 7\n"
    )
    limits = load_settings({**GOOD, "GATEWAY_CONFIG": str(config)}).rate_limits
    session = limits["user-session"]
    assert (session.limit, session.period_seconds, session.burst) == (20, 60.0, 20)
    history = limits["user-history"]
    assert (history.limit, history.period_seconds, history.burst) == (120, 30.0, 120)
    agent = limits["agent-session"]
    assert (agent.limit, agent.period_seconds, agent.burst, agent.shadow) == (600, 60.0, 7, False)


@pytest.mark.parametrize(
    ("toml", "fragment"),
    [
        ("[rate_limits.user-sesion]\nlimit = 1\n", "rate_limits.user-sesion: unknown policy"),
        (
            "[rate_limits.user-session]\nlimit = 0\n",
            "rate_limits.user-session.limit: must be a positive integer",
        ),
        ("[rate_limits.user-session]\nperiod_seconds = -1\n", "period_seconds: must be a positive number"),
        # TOML's nan and inf passed the `<= 0` check, and every request of the policy's routes was a 500
        # (GCRA turned them into a NaN Retry-After).
        ("[rate_limits.user-session]\nperiod_seconds = nan\n", "period_seconds: must be a positive number"),
        ("[rate_limits.user-history]\nperiod_seconds = inf\n", "period_seconds: must be a positive number"),
        ("[rate_limits.user-session]\nshadow = 'yes'\n", "shadow: must be true or false"),
        ('[[issuers]]\nissuer = "x"\n', "issuers[0]: needs hs256_secret_env, jwks_url or public_key_file"),
        ('[[issuers]]\nhs256_secret_env = "NOPE"\n', "variable NOPE is not set"),
        ("[redis]\ncluster = true\n", "redis.cluster needs REDIS_URL"),
        # Wrong types were a traceback (sentinels = 5) or a silent surprise (cluster = "no" meant Cluster on).
        ("[redis]\nsentinels = 5\n", 'redis.sentinels: must be a list of "host:port" strings'),
        ("[redis]\nsentinels = [5]\n", "redis.sentinels: 5 is not host:port"),
        ('[redis]\nsentinels = ["s:99999"]\nsentinel_service = "m"\n', "'s:99999' is not host:port"),
        (
            '[redis]\nsentinels = ["s:26379"]\nsentinel_service = 5\n',
            "sentinel_service: must be a non-empty string",
        ),
        ('[redis]\ncluster = "no"\n', "redis.cluster: must be true or false"),
        (
            '[redis]\ncluster = true\nsentinels = ["s:26379"]\nsentinel_service = "m"\n',
            "redis.cluster and redis.sentinels exclude each other",
        ),
        ("[surprise]\n", "unknown sections surprise"),
        ("not toml = = =", "is not valid TOML"),
    ],
)
def test_bad_toml_names_the_key(tmp_path: Path, toml: str, fragment: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    found = problems({**GOOD, "GATEWAY_CONFIG": str(config)})
    assert any(fragment in p for p in found), found


def test_a_secret_pasted_as_the_variable_name_is_never_echoed(tmp_path: Path) -> None:
    pasted = "e78e16pasted0by0mistake0123456789abcdef"  # what `secrets.token_hex` gives
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[issuers]]\nissuer = "partner"\nhs256_secret_env = "{pasted}"\n')
    found = problems({**GOOD, "GATEWAY_CONFIG": str(config)})
    assert any("hs256_secret_env: no such variable is set" in p for p in found), found
    assert not any(pasted in p for p in found), found


# A truncated Ed25519 key: it has the BEGIN PUBLIC KEY line, but its body does not parse.
CORRUPT_PEM = b"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n"
WITHOUT_ENV_ISSUER = {k: v for k, v in GOOD.items() if k != "JWT_HS256_SECRET"}


def rsa_1024_pem() -> bytes:
    """Return the PEM public key of a fresh RSA key too short for the gateway."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - must be refused
    return public_pem(weak).encode()


def ec_p521_pem() -> bytes:
    """Return the PEM public key of a fresh EC key on a curve the gateway does not verify (P-521)."""
    return public_pem(ec.generate_private_key(ec.SECP521R1())).encode()


def p256_der() -> bytes:
    """Return a good EC P-256 public key, but in DER (binary) instead of PEM."""
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


BAD_KEY_FILES: list[tuple[str, Callable[[], bytes], str]] = [
    ("rsa-1024", rsa_1024_pem, "holds RSA 1024 bits; use RSA >= 2048 bits, EC P-256/P-384 or Ed25519"),
    ("ec-p521", ec_p521_pem, "holds EC secp521r1; use RSA >= 2048 bits, EC P-256/P-384 or Ed25519"),
    ("corrupt-body", lambda: CORRUPT_PEM, "is not a valid PEM public key"),
    ("der", p256_der, "is not a PEM public key"),
]
each_bad_key_file = pytest.mark.parametrize(
    ("make_key", "fragment"), [case[1:] for case in BAD_KEY_FILES], ids=[case[0] for case in BAD_KEY_FILES]
)


@each_bad_key_file
def test_unusable_public_key_file_is_a_problem_naming_the_variable(
    tmp_path: Path, make_key: Callable[[], bytes], fragment: str
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(make_key())
    found = problems({**WITHOUT_ENV_ISSUER, "JWT_PUBLIC_KEY_FILE": str(key_file)})
    # Only the key's own problem: "no token keys configured" would hide the reason behind a wrong one.
    assert len(found) == 1, found
    assert found[0].startswith(f"JWT_PUBLIC_KEY_FILE: {str(key_file)!r} {fragment}"), found


@each_bad_key_file
def test_unusable_issuer_public_key_file_is_a_problem_naming_the_entry(
    tmp_path: Path, make_key: Callable[[], bytes], fragment: str
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(make_key())
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[issuers]]\nissuer = "https://pem.example"\npublic_key_file = "{key_file}"\n')
    found = problems({**WITHOUT_ENV_ISSUER, "GATEWAY_CONFIG": str(config)})
    assert len(found) == 1, found
    assert found[0].startswith("GATEWAY_CONFIG: issuers[0].public_key_file: ")
    assert fragment in found[0]


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256"),
        (ec.generate_private_key(ec.SECP256R1()), "ES256"),
        (ed25519.Ed25519PrivateKey.generate(), "EdDSA"),
        # A P-384 key verifies only ES384, which the issuer's default algorithms once left out.
        (ec.generate_private_key(ec.SECP384R1()), "ES384"),
    ],
    ids=["rsa-2048", "ec-p256", "ed25519", "ec-p384"],
)
async def test_supported_public_key_file_loads_and_verifies_its_tokens(
    tmp_path: Path, key: PrivateKey, algorithm: str
) -> None:
    key_file = tmp_path / "key.pem"
    key_file.write_text(public_pem(key))
    settings = load_settings({**WITHOUT_ENV_ISSUER, "JWT_PUBLIC_KEY_FILE": str(key_file)})
    clock = FakeClock()
    principal = await Authenticator(settings, clock=clock).authenticate(
        f"Bearer {sign(claims(clock.now, sub='alice'), key, algorithm)}"
    )
    assert principal.user_id == "alice"


def test_public_key_issuer_whose_algorithms_cannot_use_its_key_is_a_problem(tmp_path: Path) -> None:
    key_file = tmp_path / "rsa.pem"
    key_file.write_text(public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)))
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[[issuers]]\nissuer = "https://pem.example"\npublic_key_file = "{key_file}"\nalgorithms = ["EdDSA"]\n'
    )
    found = problems({**WITHOUT_ENV_ISSUER, "GATEWAY_CONFIG": str(config)})
    assert any("issuers[0].algorithms: none of EdDSA verifies with the RSA public key" in p for p in found), (
        found
    )
    config.write_text(
        f'[[issuers]]\nissuer = "https://pem.example"\npublic_key_file = "{key_file}"\nalgorithms = ["RS384"]\n'
    )
    assert load_settings({**WITHOUT_ENV_ISSUER, "GATEWAY_CONFIG": str(config)}).issuers[0].algorithms == (
        "RS384",
    )


def test_an_empty_algorithms_allowlist_is_a_problem_not_the_defaults(tmp_path: Path) -> None:
    # The authenticator reads an empty allowlist as "not given" and verifies with every default algorithm:
    # `algorithms = []` (meant as "none") must not quietly allow RS256, ES256 and EdDSA.
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[issuers]]\nissuer = "https://idp.example"\njwks_url = "https://idp.example/jwks.json"\nalgorithms = []\n'
    )
    found = problems({**WITHOUT_ENV_ISSUER, "GATEWAY_CONFIG": str(config)})
    assert any("issuers[0].algorithms: must name at least one algorithm" in p for p in found), found


def write_issuers(tmp_path: Path, *issuers: str | None) -> str:
    """Write a GATEWAY_CONFIG with one HS256 [[issuers]] entry per name (None: no `issuer` key)."""
    entries = [
        "[[issuers]]\n"
        + (f'issuer = "{name}"\n' if name is not None else "")
        + 'hs256_secret_env = "PARTNER"\n'
        for name in issuers
    ]
    config = tmp_path / "gateway.toml"
    config.write_text("\n".join(entries))
    return str(config)


@pytest.mark.parametrize(
    ("env_issuer", "file_issuers", "expected"),
    [
        (
            None,
            ["https://a.example", "https://a.example"],
            "GATEWAY_CONFIG: issuers[1].issuer: 'https://a.example' is already the issuer of "
            "GATEWAY_CONFIG: issuers[0].issuer",
        ),
        (
            "https://a.example",
            ["https://a.example"],
            "GATEWAY_CONFIG: issuers[0].issuer: 'https://a.example' is already the issuer of JWT_ISSUER",
        ),
        ("", ["https://a.example"], "JWT_ISSUER: required when several issuers are configured"),
        (None, ["https://a.example", None], "GATEWAY_CONFIG: issuers[1].issuer: required when several"),
    ],
    ids=["same-issuer-twice", "env-and-file-same", "env-issuer-unset", "file-issuer-unset"],
)
def test_several_issuers_each_need_their_own_issuer(
    tmp_path: Path, env_issuer: str | None, file_issuers: list[str | None], expected: str
) -> None:
    # env_issuer None: no environment issuer; "": JWT_HS256_SECRET set but JWT_ISSUER not.
    env = {
        **WITHOUT_ENV_ISSUER,
        "PARTNER": "p" * 40,
        "GATEWAY_CONFIG": write_issuers(tmp_path, *file_issuers),
    }
    if env_issuer is not None:
        env.update({"JWT_HS256_SECRET": "s" * 32, "JWT_ISSUER": env_issuer})
    found = problems(env)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_file_issuer_names_are_trimmed_like_environment_ones(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[[issuers]]\nissuer = " https://a.example "\nhs256_secret_env = "PARTNER"\n')
    settings = load_settings({**WITHOUT_ENV_ISSUER, "GATEWAY_CONFIG": str(config), "PARTNER": "p" * 40})
    assert settings.issuers[0].issuer == "https://a.example"


def test_one_issuer_may_leave_its_issuer_unset(tmp_path: Path) -> None:
    from_env = load_settings(GOOD)
    from_file = load_settings(
        {**WITHOUT_ENV_ISSUER, "PARTNER": "p" * 40, "GATEWAY_CONFIG": write_issuers(tmp_path, None)}
    )
    assert [i.issuer for i in from_env.issuers] == [None]
    assert [i.issuer for i in from_file.issuers] == [None]


async def test_distinct_issuers_each_verify_their_own_tokens(tmp_path: Path) -> None:
    env = {
        **GOOD,
        "JWT_ISSUER": "https://env.example",
        "PARTNER": "p" * 40,
        "GATEWAY_CONFIG": write_issuers(tmp_path, "https://partner.example"),
    }
    clock = FakeClock()
    authenticator = Authenticator(load_settings(env), clock=clock)
    for issuer, secret in (("https://env.example", "s" * 32), ("https://partner.example", "p" * 40)):
        token = sign(claims(clock.now, iss=issuer), secret, "HS256")
        principal = await authenticator.authenticate(f"Bearer {token}")
        assert principal.issuer == issuer


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("issuer = 5", "GATEWAY_CONFIG: issuers[0].issuer: must be a non-empty string"),
        ('issuer = "  "', "GATEWAY_CONFIG: issuers[0].issuer: must be a non-empty string"),
        ("audiences = 5", "GATEWAY_CONFIG: issuers[0].audiences: must be a string or a list of strings"),
        (
            'audiences = ["gw", 5]',
            "GATEWAY_CONFIG: issuers[0].audiences: must be a string or a list of strings",
        ),
        ("jwks_url = 5", "GATEWAY_CONFIG: issuers[0].jwks_url: must be a URL string"),
        ("public_key_file = 5", "GATEWAY_CONFIG: issuers[0].public_key_file: must be a file path string"),
        (
            "hs256_secret_env = 5",
            "GATEWAY_CONFIG: issuers[0].hs256_secret_env: must be the name of a variable",
        ),
    ],
)
def test_wrongly_typed_issuer_value_is_a_problem_not_a_crash(
    tmp_path: Path, line: str, expected: str
) -> None:
    key = line.split(" = ")[0]
    entry = {"issuer": '"https://p.example"', "hs256_secret_env": '"PARTNER"', key: line.split(" = ")[1]}
    config = tmp_path / "gateway.toml"
    config.write_text("[[issuers]]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items()))
    found = problems({**WITHOUT_ENV_ISSUER, "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)})
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


# --- per-issuer scope allowlist ---------------------------------------------------------------------


def test_every_scope_the_gateway_checks_is_a_known_scope() -> None:
    # An allowlist may only name these, so a scope a route requires but KNOWN_SCOPES lacks could never be allowed.
    required = {op.scope for op in OPERATIONS.values() if op.scope is not None}
    assert set(KNOWN_SCOPES) == required | {ACT_AS_SCOPE}


def test_issuer_allowed_scopes_are_read_and_default_to_every_scope(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[[issuers]]\nissuer = "https://partner.example"\nhs256_secret_env = "PARTNER"\n'
        'allowed_scopes = ["convai:session", "convai:history", "convai:session"]\n\n'
        '[[issuers]]\nissuer = "https://idp.example"\njwks_url = "https://idp.example/jwks.json"\n'
    )
    settings = load_settings({**WITHOUT_ENV_ISSUER, "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)})
    assert [i.allowed_scopes for i in settings.issuers] == [
        frozenset({"convai:session", "convai:history"}),
        None,
    ]
    assert load_settings(GOOD).issuers[0].allowed_scopes is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'allowed_scopes = ["convai:session", "convai:sesion", "openid"]',
            "GATEWAY_CONFIG: issuers[0].allowed_scopes: unknown scopes 'convai:sesion', 'openid' "
            "(known: convai:session, convai:history, convai:delete, convai:act-as)",
        ),
        (
            'allowed_scopes = ["convai:session convai:history"]',
            "GATEWAY_CONFIG: issuers[0].allowed_scopes: unknown scopes 'convai:session convai:history'",
        ),
        (
            "allowed_scopes = []",
            "GATEWAY_CONFIG: issuers[0].allowed_scopes: must name at least one scope",
        ),
        (
            'allowed_scopes = "convai:session"',
            "GATEWAY_CONFIG: issuers[0].allowed_scopes: must be a list of scope names",
        ),
        (
            'allowed_scopes = ["convai:session", 5]',
            "GATEWAY_CONFIG: issuers[0].allowed_scopes: must be a list of scope names",
        ),
        ("allowed_scopes = true", "GATEWAY_CONFIG: issuers[0].allowed_scopes: must be a list of scope names"),
    ],
    ids=["unknown", "one-string-with-spaces", "empty", "string", "list-with-number", "boolean"],
)
def test_bad_issuer_allowed_scopes_is_a_problem_naming_the_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f'[[issuers]]\nissuer = "https://p.example"\nhs256_secret_env = "PARTNER"\n{line}\n')
    found = problems({**WITHOUT_ENV_ISSUER, "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)})
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_environment_issuer_allowed_scopes_are_read_from_jwt_allowed_scopes() -> None:
    settings = load_settings({**GOOD, "JWT_ALLOWED_SCOPES": " convai:session  convai:act-as "})
    assert settings.issuers[0].allowed_scopes == frozenset({"convai:session", "convai:act-as"})
    # Empty, like every variable, means unset: every scope.
    assert load_settings({**GOOD, "JWT_ALLOWED_SCOPES": " "}).issuers[0].allowed_scopes is None


def test_unknown_scope_in_jwt_allowed_scopes_is_a_problem_naming_the_variable() -> None:
    found = problems({**GOOD, "JWT_ALLOWED_SCOPES": "convai:session convai:admin"})
    assert found == [
        "JWT_ALLOWED_SCOPES: unknown scopes 'convai:admin' "
        "(known: convai:session, convai:history, convai:delete, convai:act-as)"
    ]


# --- per-issuer user id namespace ---------------------------------------------------------------------

PARTNER_ISSUER = '[[issuers]]\nissuer = "https://partner.example"\nhs256_secret_env = "PARTNER"\n'
IDP_ISSUER = '[[issuers]]\nissuer = "https://idp.example"\njwks_url = "https://idp.example/jwks.json"\n'


def test_issuer_user_id_prefixes_are_read_and_default_to_none(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        PARTNER_ISSUER + 'user_id_prefix = "partner-a.eu_1:"\n\n' + IDP_ISSUER + 'user_id_prefix = "I:"\n\n'
        '[[issuers]]\nissuer = "https://third.example"\njwks_url = "https://third.example/jwks.json"\n'
    )
    env = {**GOOD, "JWT_ISSUER": "https://own.example", "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)}
    settings = load_settings({**env, "JWT_USER_ID_PREFIX": " own: "})
    assert [i.user_id_prefix for i in settings.issuers] == ["own:", "partner-a.eu_1:", "I:", None]
    # The longest: 31 characters and the separator.
    assert (
        load_settings({**GOOD, "JWT_USER_ID_PREFIX": "x" * 31 + ":"}).issuers[0].user_id_prefix
        == "x" * 31 + ":"
    )
    # Empty, like every variable, means unset: no prefix (the contract: the user id is the claim, unchanged).
    assert load_settings({**GOOD, "JWT_USER_ID_PREFIX": " "}).issuers[0].user_id_prefix is None
    assert load_settings(GOOD).issuers[0].user_id_prefix is None


PREFIX_RULE = "must be 1-31 of A-Z a-z 0-9 . _ - followed by ':', such as \"partner:\""


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('user_id_prefix = "partner"', PREFIX_RULE),  # no separator
        ('user_id_prefix = ":"', PREFIX_RULE),  # nothing before it
        ('user_id_prefix = "part ner:"', PREFIX_RULE),
        ('user_id_prefix = "a:b:"', PREFIX_RULE),  # one separator only: prefixes must never nest
        ('user_id_prefix = "partner/"', PREFIX_RULE),
        ('user_id_prefix = "{partner}:"', PREFIX_RULE),  # braces would break the rate limiter's hash tag
        ('user_id_prefix = "pärtner:"', PREFIX_RULE),
        ('user_id_prefix = "partner:\\n"', PREFIX_RULE),
        (f'user_id_prefix = "{"p" * 32}:"', PREFIX_RULE),  # 33 characters
        ('user_id_prefix = ""', PREFIX_RULE),
        ("user_id_prefix = 5", 'must be a string such as "partner:"'),
        ('user_id_prefix = ["partner:"]', 'must be a string such as "partner:"'),
        ("user_id_prefix = true", 'must be a string such as "partner:"'),
    ],
    ids=[
        "no-separator",
        "separator-only",
        "space",
        "two-separators",
        "slash",
        "braces",
        "non-ascii",
        "control-character",
        "too-long",
        "empty",
        "integer",
        "list",
        "boolean",
    ],
)
def test_bad_issuer_user_id_prefix_is_a_problem_naming_the_key(
    tmp_path: Path, line: str, expected: str
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(f"{PARTNER_ISSUER}{line}\n")
    found = problems({**WITHOUT_ENV_ISSUER, "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)})
    assert len(found) == 1, found
    assert found[0].startswith(f"GATEWAY_CONFIG: issuers[0].user_id_prefix: {expected}"), found


@pytest.mark.parametrize("value", ["own", "own:x:", "o wn:", "x" * 32 + ":"])
def test_bad_jwt_user_id_prefix_is_a_problem_naming_the_variable(value: str) -> None:
    found = problems({**GOOD, "JWT_USER_ID_PREFIX": value})
    assert len(found) == 1, found
    assert found[0].startswith(f"JWT_USER_ID_PREFIX: {PREFIX_RULE}"), found


def test_two_issuers_may_not_share_a_user_id_prefix(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        PARTNER_ISSUER + 'user_id_prefix = "p:"\n\n' + IDP_ISSUER + 'user_id_prefix = "p:"\n\n'
        '[[issuers]]\nissuer = "https://third.example"\njwks_url = "https://third.example/jwks.json"\n'
        'user_id_prefix = "own:"\n'
    )
    env = {**GOOD, "JWT_ISSUER": "https://own.example", "PARTNER": "p" * 40, "GATEWAY_CONFIG": str(config)}
    found = problems({**env, "JWT_USER_ID_PREFIX": "own:"})
    assert found == [
        "GATEWAY_CONFIG: issuers[1].user_id_prefix: 'p:' is already the prefix of "
        "GATEWAY_CONFIG: issuers[0].user_id_prefix; each issuer needs a prefix of its own (a shared one "
        "would make their users one user again)",
        "GATEWAY_CONFIG: issuers[2].user_id_prefix: 'own:' is already the prefix of JWT_USER_ID_PREFIX; each "
        "issuer needs a prefix of its own (a shared one would make their users one user again)",
    ]


# ------------------------------------------------------------------------------ the sentinels' own credentials

SENTINEL_PASSWORD = "sentinel-pw-4b1f0c9d2e"
SENTINELS = '[redis]\nsentinels = ["127.0.0.1:26379"]\nsentinel_service = "mymaster"\n'


def sentinel_env(tmp_path: Path, toml: str, **env: str) -> dict[str, str]:
    """Return GOOD plus a GATEWAY_CONFIG holding `toml`, plus `env`."""
    config = tmp_path / "gateway.toml"
    config.write_text(toml)
    return {**GOOD, "GATEWAY_CONFIG": str(config), **env}


def test_sentinel_credentials_default_to_none_and_plaintext(tmp_path: Path) -> None:
    redis = load_settings(sentinel_env(tmp_path, SENTINELS)).redis
    assert (redis.sentinel_auth, redis.sentinel_username, redis.sentinel_password) == ("none", None, None)
    assert redis.sentinel_tls is False


def test_sentinel_password_is_read_from_the_variable_or_a_file(tmp_path: Path) -> None:
    toml = SENTINELS + 'sentinel_auth = "password"\nsentinel_username = "gw"\n'
    redis = load_settings(sentinel_env(tmp_path, toml, REDIS_SENTINEL_PASSWORD=SENTINEL_PASSWORD)).redis
    assert (redis.sentinel_auth, redis.sentinel_username) == ("password", "gw")
    assert redis.sentinel_password == Secret(SENTINEL_PASSWORD)
    assert SENTINEL_PASSWORD not in repr(redis)
    password_file = tmp_path / "sentinel-password"
    password_file.write_text(SENTINEL_PASSWORD + "\n")
    env = sentinel_env(tmp_path, toml, REDIS_SENTINEL_PASSWORD_FILE=str(password_file))
    assert load_settings(env).redis.sentinel_password == Secret(SENTINEL_PASSWORD)


def test_sentinel_auth_may_reuse_the_redis_url_credentials(tmp_path: Path, tls_files: TlsFiles) -> None:
    toml = SENTINELS + 'sentinel_auth = "redis_url"\nsentinel_tls = true\n'
    url = f"rediss://gw:{SENTINEL_PASSWORD}@ignored/0?ssl_ca_certs={tls_files.ca}"
    redis = load_settings(sentinel_env(tmp_path, toml, REDIS_URL=url)).redis
    assert (redis.sentinel_auth, redis.sentinel_password, redis.sentinel_tls) == ("redis_url", None, True)


@pytest.mark.parametrize(
    ("toml", "env", "fragment"),
    [
        (
            SENTINELS + 'sentinel_auth = "password"\n',
            {},
            'REDIS_SENTINEL_PASSWORD: required with redis.sentinel_auth = "password"',
        ),
        (
            SENTINELS,
            {"REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD},
            'REDIS_SENTINEL_PASSWORD: set, but only used with redis.sentinel_auth = "password"',
        ),
        (
            "",
            {"REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD},
            'REDIS_SENTINEL_PASSWORD: set, but only used with redis.sentinel_auth = "password"',
        ),
        (
            SENTINELS + 'sentinel_auth = "password"\n',
            {"REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD, "REDIS_SENTINEL_PASSWORD_FILE": "FILE"},
            "REDIS_SENTINEL_PASSWORD and REDIS_SENTINEL_PASSWORD_FILE are both set",
        ),
        (
            SENTINELS + 'sentinel_auth = "password"\n',
            {"REDIS_SENTINEL_PASSWORD_FILE": "EMPTY"},
            "REDIS_SENTINEL_PASSWORD_FILE: the file is empty",
        ),
        (
            SENTINELS + 'sentinel_auth = "password"\n',
            {"REDIS_SENTINEL_PASSWORD_FILE": "MISSING"},
            "REDIS_SENTINEL_PASSWORD_FILE: cannot read",
        ),
        ('[redis]\nsentinel_auth = "password"\n', {"REDIS_SENTINEL_PASSWORD": "x"}, "needs redis.sentinels"),
        (
            SENTINELS + 'sentinel_auth = "acl"\n',
            {},
            "redis.sentinel_auth: must be one of none, password, redis_url",
        ),
        (
            SENTINELS + 'sentinel_auth = "redis_url"\nsentinel_username = "gw"\n',
            {"REDIS_URL": "redis://:pw@primary/0"},
            'redis.sentinel_username: only used with redis.sentinel_auth = "password"',
        ),
        (SENTINELS + "sentinel_username = 5\n", {}, "redis.sentinel_username: must be a non-empty string"),
        (
            SENTINELS + 'sentinel_auth = "redis_url"\n',
            {"REDIS_URL": "redis://primary/0"},
            'redis.sentinel_auth = "redis_url" needs REDIS_URL with a password',
        ),
        (SENTINELS + 'sentinel_auth = "redis_url"\n', {}, "needs REDIS_URL with a password"),
        (SENTINELS + 'sentinel_tls = "yes"\n', {}, "redis.sentinel_tls: must be true or false"),
        ("[redis]\nsentinel_tls = true\n", {}, "redis.sentinel_tls needs redis.sentinels"),
        (
            SENTINELS + "sentinel_tls = true\n",
            {"REDIS_URL": "redis://:pw@primary/0"},
            "redis.sentinel_tls needs a rediss:// REDIS_URL",
        ),
        (SENTINELS + "sentinel_tls = true\n", {}, "redis.sentinel_tls needs a rediss:// REDIS_URL"),
        (SENTINELS + "sentinel_tsl = true\n", {}, "[redis] unknown key(s) sentinel_tsl"),
    ],
)
def test_bad_sentinel_credentials_or_tls_name_the_setting(
    tmp_path: Path, toml: str, env: dict[str, str], fragment: str
) -> None:
    files = {"FILE": tmp_path / "password", "EMPTY": tmp_path / "empty", "MISSING": tmp_path / "missing"}
    files["FILE"].write_text(SENTINEL_PASSWORD)
    files["EMPTY"].write_text("\n")
    resolved = {name: str(files[value]) if value in files else value for name, value in env.items()}
    found = problems(sentinel_env(tmp_path, toml, **resolved))
    assert any(fragment in p for p in found), found
    assert not any(SENTINEL_PASSWORD in p or "pw@" in p for p in found), found


@pytest.mark.parametrize("url", ["redis://seed:7000/3", "redis://seed:7000/?db=2", "redis://seed:7000/%31"])
def test_a_cluster_seed_url_naming_a_database_other_than_0_is_refused(tmp_path: Path, url: str) -> None:
    # Redis Cluster has only database 0: redis-py refused the URL when the client was built, a traceback at start
    # that named neither REDIS_URL nor the database.
    config = tmp_path / "gateway.toml"
    config.write_text("[redis]\ncluster = true\n")
    found = problems({**GOOD, "GATEWAY_CONFIG": str(config), "REDIS_URL": url})
    assert any("redis.cluster: Redis Cluster has only database 0" in p for p in found), found
    assert not any("seed" in p for p in found), found


@pytest.mark.parametrize("url", ["redis://seed:7000", "redis://seed:7000/", "redis://seed:7000/0?db=0"])
def test_a_cluster_seed_url_with_database_0_or_none_is_accepted(tmp_path: Path, url: str) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[redis]\ncluster = true\n")
    assert load_settings({**GOOD, "GATEWAY_CONFIG": str(config), "REDIS_URL": url}).redis.cluster
