"""Configuration: read the environment (and optional TOML file) once into a frozen, validated object.

Every problem is collected, not just the first, so `convai-gateway check-config` can list them all.
This module imports nothing of the service at import time (service.jwks imports it); the public-key check
borrows service.jwks's key rule when it runs, so a key `check-config` accepts is one `serve` can use.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

OwnershipMode = Literal["ledger_or_user_id", "ledger", "user_id"]
RedisErrorMode = Literal["local", "open", "closed"]
SentinelAuth = Literal["none", "password", "redis_url"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

OWNERSHIP_MODES: tuple[OwnershipMode, ...] = ("ledger_or_user_id", "ledger", "user_id")
REDIS_ERROR_MODES: tuple[RedisErrorMode, ...] = ("local", "open", "closed")
# Where the sentinels' own credentials come from (`[redis] sentinel_auth`): none, REDIS_SENTINEL_PASSWORD(_FILE)
# with an optional `sentinel_username`, or REDIS_URL's (the Bitnami chart gives its sentinels the Redis password).
SENTINEL_AUTH_MODES: tuple[SentinelAuth, ...] = ("none", "password", "redis_url")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA")
MIN_HS256_SECRET_BYTES = 32
SESSION_SCOPE = "convai:session"
HISTORY_SCOPE = "convai:history"
DELETE_SCOPE = "convai:delete"
ACT_AS_SCOPE = "convai:act-as"
# Every scope the gateway checks (DESIGN sections 1 and 2); an issuer's `allowed_scopes` may name only these.
KNOWN_SCOPES = (SESSION_SCOPE, HISTORY_SCOPE, DELETE_SCOPE, ACT_AS_SCOPE)
DEFAULT_SCOPES = f"{SESSION_SCOPE} {HISTORY_SCOPE}"
NEVER_DEFAULT_SCOPES = frozenset({DELETE_SCOPE, ACT_AS_SCOPE})
# An issuer's user id namespace: 1-31 safe characters and the separator ':', which they may not contain. So no
# prefix begins another (the first ':' ends it): distinct prefixes never make the same user id.
USER_ID_PREFIX_SEPARATOR = ":"
USER_ID_PREFIX = re.compile(r"[A-Za-z0-9._-]{1,31}:")


class Secret:
    """A string that never shows itself in repr, str or logs; call `reveal()` at the point of use."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret value."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """One GCRA policy: `limit` requests per `period_seconds`, up to `burst` at once."""

    name: str
    limit: int
    period_seconds: float
    burst: int
    shadow: bool = False


# DESIGN section 5 (contract names). Where the design names no burst, `burst` is `limit`: an idle caller may
# spend a whole period's budget at once, then one request every period/limit (so up to burst + limit pass in
# the first period after a pause; the sustained rate never exceeds limit per period).
DEFAULT_RATE_LIMITS: Mapping[str, RateLimitPolicy] = {
    p.name: p
    for p in (
        RateLimitPolicy("user-session", 10, 60, 5),
        RateLimitPolicy("user-history", 120, 60, 120),
        RateLimitPolicy("user-feedback", 30, 60, 30),
        RateLimitPolicy("user-delete", 10, 60, 10),
        RateLimitPolicy("agent-session", 600, 60, 600),
        RateLimitPolicy("ip-auth-failure", 60, 60, 60),
    )
}


@dataclass(frozen=True, slots=True)
class IssuerConfig:
    """Keys and claim rules for one token issuer."""

    issuer: str | None
    audiences: tuple[str, ...] = ()
    algorithms: tuple[str, ...] = ()
    hs256_secret: Secret | None = None
    jwks_url: str | None = None
    public_key_pem: str | None = None
    # The most its tokens may hold: claimed (or default) scopes outside it are dropped. None: every scope.
    allowed_scopes: frozenset[str] | None = None
    # Prepended to the user id of each of its tokens (and to X-On-Behalf-Of targets of its act-as tokens), so
    # its users are never another issuer's. None: the user id is the claim unchanged (the contract's default).
    user_id_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class RedisTopology:
    """How to reach Redis: a URL, a Sentinel group, or a Cluster seed URL."""

    url: str | None = None
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_service: str | None = None
    cluster: bool = False
    # The sentinels' own credentials and TLS (the master's come from `url`). With "redis_url" the client takes
    # REDIS_URL's username and password, as redis-py parses them for the master.
    sentinel_auth: SentinelAuth = "none"
    sentinel_username: str | None = None
    sentinel_password: Secret | None = None
    # TLS to the sentinels with REDIS_URL's ssl_* options (settings require a rediss:// REDIS_URL for it).
    sentinel_tls: bool = False

    @property
    def configured(self) -> bool:
        """Tell whether any Redis is configured."""
        return bool(self.url or self.sentinels)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its environment, validated."""

    elevenlabs_api_key: Secret
    elevenlabs_base_url: str = "https://api.elevenlabs.io"
    redis: RedisTopology = field(default_factory=RedisTopology)
    redis_timeout_seconds: float = 0.1
    redis_pipeline_limit: int = 100
    issuers: tuple[IssuerConfig, ...] = ()
    jwt_leeway_seconds: int = 30
    jwt_user_claim: str = "sub"
    jwt_default_scopes: frozenset[str] = frozenset(DEFAULT_SCOPES.split())
    jwt_max_lifetime_seconds: int | None = None
    jwks_unknown_kid_cooldown_seconds: float = 30.0
    allowed_agent_ids: frozenset[str] = frozenset()
    ownership_mode: OwnershipMode = "ledger_or_user_id"
    ledger_ttl_days: int = 90
    rate_limit_on_redis_error: RedisErrorMode = "local"
    rate_limits: Mapping[str, RateLimitPolicy] = field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    rate_limit_ipv6_prefix: int = 64
    trusted_proxies: tuple[IPNetwork, ...] = ()
    cors_allowed_origins: tuple[str, ...] = ()
    redact_fields: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    metrics_port: int | None = None
    log_level: str = "INFO"
    upstream_connect_timeout: float = 3.0
    upstream_read_timeout: float = 10.0
    upstream_audio_read_timeout: float = 60.0
    upstream_max_retries: int = 2
    upstream_max_audio_streams: int = 50
    request_body_timeout_seconds: float = 10.0
    request_header_timeout_seconds: float = 10.0
    keep_alive_timeout_seconds: int = 5
    max_connections: int = 4096
    egress_proxy_url: Secret | None = None
    gateway_config: str | None = None

    @property
    def redis_url(self) -> str | None:
        """Return the plain Redis URL, if one is configured."""
        return self.redis.url


class ConfigError(Exception):
    """The environment is invalid; `problems` lists each bad variable with its reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
        self.problems = problems


class _Reader:
    """Collects typed values and problems from an environment mapping."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def raw(self, name: str) -> str | None:
        value = self.env.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            self.problems.append(f"{name}: expected an integer, got {value!r}")
            return default
        if not low <= number <= high:
            self.problems.append(f"{name}: must be between {low} and {high}, got {number}")
            return default
        return number

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            self.problems.append(f"{name}: expected a number, got {value!r}")
            return default
        if not low <= number <= high:
            self.problems.append(f"{name}: must be between {low} and {high}, got {number}")
            return default
        return number

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value not in choices:
            self.problems.append(f"{name}: must be one of {', '.join(choices)}; got {value!r}")
            return default
        return value

    def csv(self, name: str) -> tuple[str, ...]:
        value = self.raw(name)
        if value is None:
            return ()
        return tuple(item.strip() for item in value.split(",") if item.strip())

    def file_text(self, name: str) -> str | None:
        path = self.raw(name)
        if path is None:
            return None
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            self.problems.append(f"{name}: cannot read {path!r}: {exc.strerror}")
            return None


def _split_url(url: str) -> SplitResult | None:
    """Return the parts of `url`, or None when it does not parse (an unclosed IPv6 bracket, a bad port)."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsing the port is part of the check
    except ValueError:
        return None
    return parts


def _check_url(reader: _Reader, name: str, url: str, schemes: tuple[str, ...]) -> bool:
    # The URL itself is never echoed: it may carry a password (redis://:secret@host), and problems are
    # printed by check-config and serve, i.e. into init-container and pod logs.
    wanted = f"must be a URL with scheme {'/'.join(schemes)}"
    parts = _split_url(url)
    if parts is None:
        reader.problems.append(f"{name}: {wanted}; it does not parse as a URL")
        return False
    if parts.scheme not in schemes:
        reader.problems.append(f"{name}: {wanted}; got scheme {parts.scheme!r}")
        return False
    if not (parts.netloc or parts.scheme == "unix"):
        reader.problems.append(f"{name}: {wanted} and a host")
        return False
    return True


def _egress_proxy(reader: _Reader) -> Secret | None:
    value = reader.raw("EGRESS_PROXY_URL")
    if value is None:
        return None
    parts = _split_url(value)
    if (
        parts is None
        or parts.scheme != "http"
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        # Never echoed: a proxy URL may carry a password. https:// proxies are refused rather than trusted
        # untested (verifying one would need its CA too); an https upstream still travels inside CONNECT.
        reader.problems.append("EGRESS_PROXY_URL: must be http://[user:password@]host:port; value not shown")
        return None
    return Secret(value)


def netloc_without_credentials(parts: SplitResult) -> str:
    """Return the host[:port] of a split URL, without any user:password (IPv6 hosts in brackets)."""
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return netloc


def safe_url(url: str) -> str:
    """Return `url` without query, fragment or credentials, for logs, banners and readiness details."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, netloc_without_credentials(parts), parts.path, "", ""))


def is_loopback_host(host: str | None) -> bool:
    """Tell whether `host` names the loopback interface."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _hs256_secret(reader: _Reader, name: str, value: str | None) -> Secret | None:
    if value is None:
        return None
    if len(value.encode()) < MIN_HS256_SECRET_BYTES:
        reader.problems.append(
            f"{name}: an HS256 secret must be at least {MIN_HS256_SECRET_BYTES} bytes "
            f"(got {len(value.encode())}); generate one with `openssl rand -hex 32`"
        )
        return None
    return Secret(value)


def _jwks_url(reader: _Reader, name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        reader.problems.append(f"{name}: must be a URL string")
        return None
    if not _check_url(reader, name, value, ("https", "http")):
        return None
    if urlsplit(value).scheme == "http" and not is_loopback_host(urlsplit(value).hostname):
        reader.problems.append(f"{name}: must use https (plain http is allowed only on loopback)")
    return value


def _public_key(reader: _Reader, name: str, path: Any) -> tuple[str | None, str | None]:
    """Return a usable PEM public key file's text and key family (service.jwks.key_family), or two Nones."""
    if path is None:
        return None, None
    if not isinstance(path, str):
        reader.problems.append(f"{name}: must be a file path string")
        return None, None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        reader.problems.append(f"{name}: cannot read {path!r}: {exc.strerror}")
        return None, None
    except UnicodeDecodeError:
        text = ""  # a DER or other binary file: reported below like any other non-PEM
    if "-----BEGIN PUBLIC KEY-----" not in text:
        reader.problems.append(f"{name}: {path!r} is not a PEM public key (BEGIN PUBLIC KEY)")
        return None, None
    # Imported here, not at the top: service.jwks imports this module. The same parse and key_family rule
    # as the authenticator's (service.auth._pem_key), so a key check-config accepts never crashes serve.
    from service.jwks import MIN_RSA_BITS, key_family

    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, UnsupportedAlgorithm):
        reader.problems.append(
            f"{name}: {path!r} is not a valid PEM public key (the key inside does not parse)"
        )
        return None, None
    family = key_family(key)
    if family is not None:
        return text, family
    if isinstance(key, rsa.RSAPublicKey):
        found = f"RSA {key.key_size} bits"
    elif isinstance(key, ec.EllipticCurvePublicKey):
        found = f"EC {key.curve.name}"
    else:
        found = "an unsupported key type"
    reader.problems.append(
        f"{name}: {path!r} holds {found}; use RSA >= {MIN_RSA_BITS} bits, EC P-256/P-384 or Ed25519"
    )
    return None, None


# The algorithm a PEM key verifies by default, per key family (service.jwks.key_family's names).
_PEM_DEFAULT_ALGORITHM: Mapping[str, str] = {
    "RSA": "RS256",
    "EC:P-256": "ES256",
    "EC:P-384": "ES384",
    "OKP:Ed25519": "EdDSA",
}
_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")
_JWKS_DEFAULT_ALGORITHMS = ("RS256", "ES256", "EdDSA")  # DESIGN section 2


def _algorithms(
    reader: _Reader, name: str, value: Any, *, has_hs: bool, has_jwks: bool, pem_family: str | None
) -> tuple[str, ...]:
    from service.jwks import ALGORITHM_FAMILIES  # see _public_key

    if value is None:
        algs: list[str] = []
        if has_hs:
            algs.append("HS256")
        if has_jwks:
            algs.extend(_JWKS_DEFAULT_ALGORITHMS)
        # The PEM key's own algorithm: a P-384 key verifies only ES384, which the JWKS defaults leave out.
        if pem_family is not None and _PEM_DEFAULT_ALGORITHM[pem_family] not in algs:
            algs.append(_PEM_DEFAULT_ALGORITHM[pem_family])
        return tuple(algs)
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        reader.problems.append(f"{name}: must be a list of algorithm names")
        return ()
    if not value:
        # An empty allowlist reads as "not given" downstream (the defaults): refuse it rather than widen it.
        reader.problems.append(f"{name}: must name at least one algorithm (leave it out for the defaults)")
        return ()
    allowed = (("HS256",) if has_hs else ()) + (ASYMMETRIC_ALGORITHMS if has_jwks or pem_family else ())
    bad = [a for a in value if a not in allowed]
    if bad:
        reader.problems.append(
            f"{name}: {', '.join(bad)} not allowed for the keys configured (allowed: {', '.join(allowed)})"
        )
    if (
        pem_family is not None
        and not has_jwks
        and not any(ALGORITHM_FAMILIES.get(a) == pem_family for a in value)
    ):
        # Fail closed would still be the result, but silently: every token of this issuer refused.
        reader.problems.append(
            f"{name}: none of {', '.join(value) or 'them'} verifies with the {pem_family} public key "
            f"(its algorithm: {_PEM_DEFAULT_ALGORITHM[pem_family]})"
        )
    return tuple(a for a in value if a in allowed)


def _audiences(reader: _Reader, name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return tuple(a.strip() for a in value.split(",") if a.strip())
    if not isinstance(value, list) or not all(isinstance(a, str) for a in value):
        reader.problems.append(f"{name}: must be a string or a list of strings")
        return ()
    return tuple(value)


def _allowed_scopes(reader: _Reader, name: str, value: Any) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        reader.problems.append(f'{name}: must be a list of scope names, e.g. ["{SESSION_SCOPE}"]')
        return frozenset()
    if not value:
        # "No scope at all" would make every token of the issuer useless; "every scope" is leaving it out.
        reader.problems.append(f"{name}: must name at least one scope (leave it out to allow every scope)")
        return frozenset()
    unknown = [s for s in dict.fromkeys(value) if s not in KNOWN_SCOPES]
    if unknown:
        # A typo would otherwise drop a scope silently, and every token of the issuer would get 403s.
        reader.problems.append(
            f"{name}: unknown scopes {', '.join(map(repr, unknown))} (known: {', '.join(KNOWN_SCOPES)})"
        )
    return frozenset(s for s in value if s in KNOWN_SCOPES)


def _user_id_prefix(reader: _Reader, name: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        reader.problems.append(f'{name}: must be a string such as "partner:"')
        return None
    if USER_ID_PREFIX.fullmatch(value) is None:
        # Safe characters only: the prefix lands in Redis keys (no braces: the rate limiter's hash tag), log
        # lines and the upstream user_id. The value is no secret, so it is shown.
        reader.problems.append(
            f"{name}: must be 1-31 of A-Z a-z 0-9 . _ - followed by '{USER_ID_PREFIX_SEPARATOR}', "
            f'such as "partner:"; got {value!r}'
        )
        return None
    return value


def _issuer_name(reader: _Reader, name: str, value: Any) -> tuple[bool, str | None]:
    """Return (valid, issuer) for a TOML `issuer` value, reporting a wrong type or an empty string."""
    if value is None:
        return True, None
    if not isinstance(value, str) or not value.strip():
        reader.problems.append(f"{name}: must be a non-empty string (the tokens' iss)")
        return False, None
    # Trimmed like every environment value (JWT_ISSUER): "https://a " would otherwise never match a token.
    return True, value.strip()


def _check_issuer_names(reader: _Reader, issuers: list[tuple[str, IssuerConfig]]) -> None:
    # With several issuers a token's iss is the only way to pick one, and the first match wins: an
    # issuer without a name, or with another's name, would have every one of its tokens refused.
    if len(issuers) < 2:
        return
    first: dict[str, str] = {}
    for label, config in issuers:
        if config.issuer is None:
            reader.problems.append(
                f"{label}: required when several issuers are configured (a token's iss picks its issuer)"
            )
        elif config.issuer in first:
            reader.problems.append(
                f"{label}: {config.issuer!r} is already the issuer of {first[config.issuer]}; issuers must "
                "be unique (only the first would ever be used): merge them, `audiences` takes a list"
            )
        else:
            first[config.issuer] = label


def _prefix_label(issuer_label: str) -> str:
    """Return the name of an issuer's user_id_prefix, from the name its `issuer` goes by in problems."""
    if issuer_label == "JWT_ISSUER":
        return "JWT_USER_ID_PREFIX"
    return issuer_label.removesuffix(".issuer") + ".user_id_prefix"


def _check_user_id_prefixes(reader: _Reader, issuers: list[tuple[str, IssuerConfig]]) -> None:
    # A prefix keeps an issuer's users apart from every other issuer's: shared, it would merge them again.
    first: dict[str, str] = {}
    for label, config in issuers:
        prefix = config.user_id_prefix
        if prefix is None:
            continue
        if prefix in first:
            reader.problems.append(
                f"{_prefix_label(label)}: {prefix!r} is already the prefix of {first[prefix]}; each issuer needs "
                "a prefix of its own (a shared one would make their users one user again)"
            )
        else:
            first[prefix] = _prefix_label(label)


def _env_issuer(reader: _Reader) -> IssuerConfig | None:
    secret = _hs256_secret(reader, "JWT_HS256_SECRET", reader.raw("JWT_HS256_SECRET"))
    jwks = _jwks_url(reader, "JWT_JWKS_URL", reader.raw("JWT_JWKS_URL"))
    pem, pem_family = _public_key(reader, "JWT_PUBLIC_KEY_FILE", reader.raw("JWT_PUBLIC_KEY_FILE"))
    if secret is None and jwks is None and pem is None:
        return None
    allowed = reader.raw("JWT_ALLOWED_SCOPES")  # space-separated, like JWT_DEFAULT_SCOPES
    return IssuerConfig(
        issuer=reader.raw("JWT_ISSUER"),
        audiences=_audiences(reader, "JWT_AUDIENCE", reader.raw("JWT_AUDIENCE")),
        algorithms=_algorithms(
            reader,
            "JWT_ALGORITHMS",
            None,
            has_hs=secret is not None,
            has_jwks=jwks is not None,
            pem_family=pem_family,
        ),
        hs256_secret=secret,
        jwks_url=jwks,
        public_key_pem=pem,
        allowed_scopes=_allowed_scopes(reader, "JWT_ALLOWED_SCOPES", allowed.split() if allowed else None),
        user_id_prefix=_user_id_prefix(reader, "JWT_USER_ID_PREFIX", reader.raw("JWT_USER_ID_PREFIX")),
    )


def load_env_issuer(env: Mapping[str, str] | None = None) -> IssuerConfig | None:
    """Read the JWT_* issuer exactly as load_settings does (None if unset), or raise ConfigError."""
    reader = _Reader(os.environ if env is None else env)
    issuer = _env_issuer(reader)
    if reader.problems:
        raise ConfigError(reader.problems)
    return issuer


def _toml_issuers(reader: _Reader, data: Any) -> list[tuple[str, IssuerConfig]]:
    """Return the valid [[issuers]] entries, each with the name its `issuer` key goes by in problems."""
    if data is None:
        return []
    if not isinstance(data, list):
        reader.problems.append("GATEWAY_CONFIG: [[issuers]] must be an array of tables")
        return []
    issuers: list[tuple[str, IssuerConfig]] = []
    for index, entry in enumerate(data):
        where = f"GATEWAY_CONFIG: issuers[{index}]"
        if not isinstance(entry, dict):
            reader.problems.append(f"{where}: must be a table")
            continue
        unknown = set(entry) - {
            "issuer", "audiences", "algorithms", "hs256_secret_env", "jwks_url", "public_key_file",
            "allowed_scopes", "user_id_prefix",
        }  # fmt: skip
        if unknown:
            reader.problems.append(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        named, issuer = _issuer_name(reader, f"{where}.issuer", entry.get("issuer"))
        secret_env = entry.get("hs256_secret_env")
        secret = None
        if secret_env is not None and not isinstance(secret_env, str):
            reader.problems.append(f"{where}.hs256_secret_env: must be the name of a variable (a string)")
        elif secret_env is not None:
            value = reader.raw(secret_env)
            if value is None and _CONVENTIONAL_ENV_NAME.fullmatch(secret_env):
                reader.problems.append(f"{where}.hs256_secret_env: variable {secret_env} is not set")
            elif value is None:
                # Not echoed: what stands here instead of a variable's name is most likely the secret itself.
                reader.problems.append(
                    f"{where}.hs256_secret_env: no such variable is set; it must name an environment variable "
                    "(A-Z, 0-9, _), never hold the secret"
                )
            secret = _hs256_secret(reader, secret_env, value)
        jwks = _jwks_url(reader, f"{where}.jwks_url", entry.get("jwks_url"))
        pem, pem_family = _public_key(reader, f"{where}.public_key_file", entry.get("public_key_file"))
        audiences = _audiences(reader, f"{where}.audiences", entry.get("audiences"))
        allowed_scopes = _allowed_scopes(reader, f"{where}.allowed_scopes", entry.get("allowed_scopes"))
        user_id_prefix = _user_id_prefix(reader, f"{where}.user_id_prefix", entry.get("user_id_prefix"))
        if not {"hs256_secret_env", "jwks_url", "public_key_file"} & set(entry):
            reader.problems.append(f"{where}: needs hs256_secret_env, jwks_url or public_key_file")
            continue
        if secret is None and jwks is None and pem is None:
            continue  # each bad key source is already reported; the algorithms could only echo it
        algorithms = _algorithms(
            reader,
            f"{where}.algorithms",
            entry.get("algorithms"),
            has_hs=secret is not None,
            has_jwks=jwks is not None,
            pem_family=pem_family,
        )
        if not named:
            continue  # already reported; leaving it out keeps the issuer-name checks from repeating it
        config = IssuerConfig(
            issuer=issuer,
            audiences=audiences,
            algorithms=algorithms,
            hs256_secret=secret,
            jwks_url=jwks,
            public_key_pem=pem,
            allowed_scopes=allowed_scopes,
            user_id_prefix=user_id_prefix,
        )
        issuers.append((f"{where}.issuer", config))
    return issuers


def _rate_limits(reader: _Reader, data: Any) -> dict[str, RateLimitPolicy]:
    policies = dict(DEFAULT_RATE_LIMITS)
    if data is None:
        return policies
    if not isinstance(data, dict):
        reader.problems.append("GATEWAY_CONFIG: [rate_limits] must be a table")
        return policies
    for name, entry in data.items():
        where = f"GATEWAY_CONFIG: rate_limits.{name}"
        if name not in DEFAULT_RATE_LIMITS:
            reader.problems.append(f"{where}: unknown policy (known: {', '.join(DEFAULT_RATE_LIMITS)})")
            continue
        if not isinstance(entry, dict):
            reader.problems.append(f"{where}: must be a table")
            continue
        unknown = set(entry) - {"limit", "period_seconds", "burst", "shadow"}
        if unknown:
            reader.problems.append(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        base = DEFAULT_RATE_LIMITS[name]
        limit = entry.get("limit", base.limit)
        period = entry.get("period_seconds", base.period_seconds)
        burst = entry.get("burst", limit if "limit" in entry else base.burst)
        shadow = entry.get("shadow", base.shadow)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            reader.problems.append(f"{where}.limit: must be a positive integer")
            continue
        # TOML has nan and inf: neither is a period (GCRA would answer every request with a NaN Retry-After).
        if (
            not isinstance(period, int | float)
            or isinstance(period, bool)
            or not math.isfinite(period)
            or period <= 0
        ):
            reader.problems.append(f"{where}.period_seconds: must be a positive number")
            continue
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            reader.problems.append(f"{where}.burst: must be a positive integer")
            continue
        if not isinstance(shadow, bool):
            reader.problems.append(f"{where}.shadow: must be true or false")
            continue
        policies[name] = RateLimitPolicy(name, limit, float(period), burst, shadow)
    return policies


# REDIS_URL query options naming what the gateway sets on every Redis client itself (service.redis_client).
# redis-py lets a URL option override the client's keyword argument of the same name, so `?socket_timeout=5`
# made commands wait 5 s whatever REDIS_TIMEOUT_MS said, `?retry_on_timeout=true` retried past the budget, and
# `?encoding_errors=strict` brought back the UnicodeDecodeError the replies' decoding avoids.
GATEWAY_OWNED_REDIS_OPTIONS: Final = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "timeout",
        "retry",
        "retry_on_timeout",
        "retry_on_error",
        "decode_responses",
        "encoding",
        "encoding_errors",
    }
)


# The other REDIS_URL query options the gateway passes on. redis-py hands any other name to the connection class
# as a keyword argument, and an unknown one (`?foo=bar`, a typo) raised TypeError on every connection attempt:
# not a Redis error, so every request failed with a 500 instead of the gateway refusing to start.
SUPPORTED_REDIS_OPTIONS: Final = frozenset(
    {
        "db",
        "username",
        "password",
        "client_name",
        "health_check_interval",
        "max_connections",
        "socket_keepalive",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_ca_path",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
        "ssl_ciphers",
        "ssl_include_verify_flags",
        "ssl_exclude_verify_flags",
    }
)
_OPTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _check_redis_options(reader: _Reader, url: str) -> None:
    # Names are read as redis-py reads them (parse_qs percent-decodes them). Values are never echoed: a URL's
    # query may hold a password too (`?password=...`).
    parts = urlsplit(url)
    names = set(parse_qs(parts.query))
    # Supported, but not by every scheme's connection class: redis:// and unix:// connections take no TLS option
    # and a Unix socket no TCP keep-alive; passed to them, each connection attempt raised TypeError (a 500 on
    # every request), and a Cluster client dropped TLS options silently, connecting in plaintext.
    misplaced = sorted(name for name in names & SUPPORTED_REDIS_OPTIONS if name.startswith("ssl_"))
    if misplaced and parts.scheme != "rediss":
        reader.problems.append(
            f"REDIS_URL: the query option(s) {', '.join(misplaced)} need a rediss:// URL (TLS); URL not shown"
        )
    if "socket_keepalive" in names and parts.scheme == "unix":
        reader.problems.append(
            "REDIS_URL: socket_keepalive applies to TCP connections, not to a unix:// socket; URL not shown"
        )
    owned = sorted(GATEWAY_OWNED_REDIS_OPTIONS & names)
    if owned:
        reader.problems.append(
            f"REDIS_URL: remove the query option(s) {', '.join(owned)}: the gateway sets them itself "
            "(Redis timeouts come from REDIS_TIMEOUT_MS, a timed-out command is never retried, replies are "
            "decoded by the gateway); URL not shown"
        )
    unknown = names - GATEWAY_OWNED_REDIS_OPTIONS - SUPPORTED_REDIS_OPTIONS
    if unknown:
        # A name that does not look like an option could be a pasted secret: counted, not shown.
        shown = sorted(name for name in unknown if _OPTION_NAME.fullmatch(name))
        hidden = len(unknown) - len(shown)
        listed = ", ".join([*shown, *([f"{hidden} more not shown"] if hidden else [])])
        reader.problems.append(
            f"REDIS_URL: unsupported query option(s) {listed} (supported: "
            f"{', '.join(sorted(SUPPORTED_REDIS_OPTIONS))}); URL not shown"
        )
    _check_redis_values(reader, parts)


# How redis-py reads a boolean URL option (its `to_bool`): these words mean false, in any case, and any other value
# true, so `ssl_check_hostname=off` (or a typo) verified hostnames and `socket_keepalive=off` turned keep-alive on.
# Only the spellings redis-py reads for what they say are accepted.
_URL_FALSE: Final = frozenset({"0", "f", "false", "n", "no"})
_URL_TRUE: Final = frozenset({"1", "t", "true", "y", "yes"})
_BOOLEAN: Final = "true or false (or yes/no, y/n, t/f, 1/0)"

# redis-py compares ssl_cert_reqs with these names as given: any other value failed every TLS connection with a
# RedisError, which the limiter takes for a Redis outage, so the gateway never refused it.
SSL_CERT_REQS: Final = ("none", "optional", "required")

# ssl_min_version is the number of an ssl.TLSVersion, which redis-py sets as `SSLContext.minimum_version` on each
# connection: OpenSSL refused other numbers there (every connection failing), and the versions below TLS 1.2 are
# deprecated (Python warns on each connection, and the default context already refuses them).
SSL_MIN_VERSIONS: Final = {int(ssl.TLSVersion.TLSv1_2): "TLS 1.2", int(ssl.TLSVersion.TLSv1_3): "TLS 1.3"}

_DIGITS = re.compile(r"[0-9]{1,9}")
# Redis refuses a CLIENT SETNAME with spaces, newlines or anything outside printable ASCII: redis-py sends the
# name on every new connection, so each one failed.
_CLIENT_NAME = re.compile(r"[!-~]+")


def _verify_flags(value: str) -> bool:
    # As redis-py's parse_ssl_verify_flags reads them: `VERIFY_X509_STRICT,VERIFY_X509_PARTIAL_CHAIN`, brackets
    # allowed. It accepts any attribute of ssl.VerifyFlags (`name`, `__doc__`), which then fails each connection.
    flags = value.replace("[", "").replace("]", "").split(",")
    return all(flag.strip() in ssl.VerifyFlags.__members__ for flag in flags)


_VERIFY_FLAGS: Final = f"a comma-separated list of {', '.join(ssl.VerifyFlags.__members__)}"


# What each supported REDIS_URL option's value may be, as (test, what the problem says is allowed); options
# missing here take any value (names, passwords, file paths: those are checked by loading them).
_REDIS_OPTION_VALUES: Final[dict[str, tuple[Callable[[str], object], str]]] = {
    "db": (_DIGITS.fullmatch, "a database number (0 or more)"),
    "max_connections": (lambda v: _DIGITS.fullmatch(v) and int(v) > 0, "a positive integer"),
    "health_check_interval": (_DIGITS.fullmatch, "a whole number of seconds (0 or more)"),
    "socket_keepalive": (lambda v: v.lower() in _URL_TRUE | _URL_FALSE, _BOOLEAN),
    "client_name": (_CLIENT_NAME.fullmatch, "printable ASCII without spaces (Redis refuses other names)"),
    "ssl_check_hostname": (lambda v: v.lower() in _URL_TRUE | _URL_FALSE, _BOOLEAN),
    "ssl_cert_reqs": (lambda v: v in SSL_CERT_REQS, "none, optional or required"),
    "ssl_min_version": (
        lambda v: _DIGITS.fullmatch(v) and int(v) in SSL_MIN_VERSIONS,
        " or ".join(f"{number} ({name})" for number, name in SSL_MIN_VERSIONS.items()),
    ),
    "ssl_include_verify_flags": (_verify_flags, _VERIFY_FLAGS),
    "ssl_exclude_verify_flags": (_verify_flags, _VERIFY_FLAGS),
}


class _EncryptedKeyError(Exception):
    """The client key asks for a passphrase, which a REDIS_URL cannot give."""


def _refuse_passphrase() -> bytes:
    raise _EncryptedKeyError


def _check_redis_tls(reader: _Reader, options: Mapping[str, str]) -> None:
    # Builds the TLS context as redis-py's RedisSSLContext.get does on the first connection, so a file that is
    # missing or not PEM, or a cipher list that selects nothing, is refused here rather than failing each
    # connection (a RedisError: the limiter falls back, the ledger answers 503, and nothing names the cause).
    context = ssl.create_default_context()
    certfile, keyfile = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if keyfile and not certfile:
        reader.problems.append(
            "REDIS_URL: the query option ssl_keyfile needs ssl_certfile too; URL not shown"
        )
    elif certfile:
        try:
            context.load_cert_chain(certfile, keyfile, password=_refuse_passphrase)
        except _EncryptedKeyError:
            reader.problems.append(
                "REDIS_URL: the key of ssl_certfile/ssl_keyfile is encrypted and a URL cannot give its passphrase;"
                " use an unencrypted key file; URL not shown"
            )
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            reader.problems.append(
                "REDIS_URL: ssl_certfile/ssl_keyfile must name a readable PEM client certificate and its key "
                f"({_tls_reason(exc)}); URL not shown"
            )
    ca_certs, ca_path = options.get("ssl_ca_certs"), options.get("ssl_ca_path")
    if ca_path and not Path(ca_path).is_dir():
        # OpenSSL takes a missing directory without complaint, and then verifies no server certificate.
        reader.problems.append(
            "REDIS_URL: ssl_ca_path must name a directory of CA certificates; URL not shown"
        )
    elif ca_certs or ca_path:
        try:
            context.load_verify_locations(cafile=ca_certs, capath=ca_path)
        except (OSError, ValueError) as exc:
            reader.problems.append(
                f"REDIS_URL: ssl_ca_certs must name a readable PEM file of CA certificates ({_tls_reason(exc)});"
                " URL not shown"
            )
    ciphers = options.get("ssl_ciphers")
    if ciphers is not None:
        try:
            context.set_ciphers(ciphers)
        except ssl.SSLError:
            reader.problems.append(
                "REDIS_URL: ssl_ciphers must be an OpenSSL cipher list selecting at least one cipher; URL not shown"
            )


def _tls_reason(exc: Exception) -> str:
    # strerror for a file that cannot be opened, OpenSSL's reason code for one that does not parse: neither holds
    # the file's content or the URL.
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or "not PEM")
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__


def _check_redis_values(reader: _Reader, parts: SplitResult) -> None:
    # Every occurrence is checked (redis-py uses the first). Values are never echoed; only what is allowed is.
    query = parse_qs(parts.query)
    for name, (valid, allowed) in _REDIS_OPTION_VALUES.items():
        if not all(valid(value) for value in query.get(name, ())):
            reader.problems.append(f"REDIS_URL: the query option {name} must be {allowed}; URL not shown")
    if parts.scheme == "rediss":
        _check_redis_tls(reader, {name: values[0] for name, values in query.items()})
    if parts.scheme != "unix":  # a unix:// URL's path is the socket; its database comes from `?db=` alone
        _check_redis_path(reader, parts.path, query.get("db", []))


_DB_PATH = re.compile(r"/([0-9]{1,9})")


def _check_redis_path(reader: _Reader, path: str, db_options: list[str]) -> None:
    # redis-py reads the path as `int(unquote(path).replace("/", ""))` and silently ignores one int() cannot read
    # (`/abc`, `/0x`), reads `/1/2` as 12 and `/-1` as a database every connection then fails to SELECT, and
    # ignores the path altogether when `?db=` is given: each time the gateway used another database than meant.
    if path in ("", "/"):
        return
    number = _DB_PATH.fullmatch(unquote(path))
    if number is None:
        reader.problems.append("REDIS_URL: a path must be a database number (0 or more); URL not shown")
    elif any(_DIGITS.fullmatch(db) and int(db) != int(number[1]) for db in db_options):
        reader.problems.append(
            "REDIS_URL: the path and the query option db name different databases (redis-py would ignore the "
            "path); give the database once; URL not shown"
        )


def _names_a_database_other_than_0(url: str) -> bool:
    # Malformed paths and values are _check_redis_path's and _check_redis_values' to name; only numbers count here.
    parts = urlsplit(url)
    path = _DB_PATH.fullmatch(unquote(parts.path))
    values = [*([path[1]] if path else []), *parse_qs(parts.query).get("db", [])]
    return any(_DIGITS.fullmatch(value) and int(value) != 0 for value in values)


_REDIS_KEYS: Final = (
    "sentinels",
    "sentinel_service",
    "sentinel_auth",
    "sentinel_username",
    "sentinel_tls",
    "cluster",
)


def _redis(reader: _Reader, data: Any) -> RedisTopology:
    url = reader.raw("REDIS_URL")
    if url is not None and _check_url(reader, "REDIS_URL", url, ("redis", "rediss", "unix")):
        _check_redis_options(reader, url)
    if not isinstance(data, dict):
        if data is not None:
            reader.problems.append("GATEWAY_CONFIG: [redis] must be a table")
        _sentinel_auth(reader, {}, url, has_sentinels=False)  # a sentinel password without sentinels
        return RedisTopology(url=url)
    unknown = sorted(str(key) for key in data if key not in _REDIS_KEYS)
    if unknown:
        # A typo must not pass for an unset key: `sentinel_tsl = true` would leave the sentinels in plaintext.
        reader.problems.append(
            f"GATEWAY_CONFIG: [redis] unknown key(s) {', '.join(unknown)} (known: {', '.join(_REDIS_KEYS)})"
        )
    sentinels: list[tuple[str, int]] = []
    listed = data.get("sentinels", [])
    if not isinstance(listed, list):
        reader.problems.append('GATEWAY_CONFIG: redis.sentinels: must be a list of "host:port" strings')
        listed = []
    for item in listed:
        host, _, port = item.rpartition(":") if isinstance(item, str) else ("", "", "")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            reader.problems.append(f"GATEWAY_CONFIG: redis.sentinels: {item!r} is not host:port")
            continue
        sentinels.append((host, int(port)))
    service = data.get("sentinel_service")
    if service is not None and (not isinstance(service, str) or not service.strip()):
        reader.problems.append("GATEWAY_CONFIG: redis.sentinel_service: must be a non-empty string")
        service = None
    elif sentinels and not service:
        reader.problems.append("GATEWAY_CONFIG: redis.sentinel_service is required with redis.sentinels")
    cluster = data.get("cluster", False)
    if not isinstance(cluster, bool):
        # bool("no") is True: a quoted value must not switch Cluster mode on.
        reader.problems.append("GATEWAY_CONFIG: redis.cluster: must be true or false")
        cluster = False
    if cluster and sentinels:
        reader.problems.append("GATEWAY_CONFIG: redis.cluster and redis.sentinels exclude each other")
    if cluster and url is None:
        reader.problems.append("GATEWAY_CONFIG: redis.cluster needs REDIS_URL (a seed node)")
    elif cluster and url is not None and _names_a_database_other_than_0(url):
        # redis-py refuses it only when the client is built: a traceback at start naming no setting.
        reader.problems.append(
            "GATEWAY_CONFIG: redis.cluster: Redis Cluster has only database 0, and REDIS_URL names another "
            "(its path or ?db=); URL not shown"
        )
    auth, username, password = _sentinel_auth(reader, data, url, bool(sentinels))
    return RedisTopology(
        url=url,
        sentinels=tuple(sentinels),
        sentinel_service=service,
        cluster=cluster,
        sentinel_auth=auth,
        sentinel_username=username,
        sentinel_password=password,
        sentinel_tls=_sentinel_tls(reader, data, url, bool(sentinels)),
    )


def _sentinel_password(reader: _Reader) -> str | None:
    # As ELEVENLABS_API_KEY is read: the variable or a file (a mounted Secret), never both, never empty.
    value = reader.raw("REDIS_SENTINEL_PASSWORD")
    from_file = reader.file_text("REDIS_SENTINEL_PASSWORD_FILE")
    if value is not None and from_file is not None:
        reader.problems.append(
            "REDIS_SENTINEL_PASSWORD and REDIS_SENTINEL_PASSWORD_FILE are both set; set only one"
        )
    if from_file == "":
        reader.problems.append("REDIS_SENTINEL_PASSWORD_FILE: the file is empty")
    return value or from_file or None


def _sentinel_auth(
    reader: _Reader, data: Mapping[str, Any], url: str | None, has_sentinels: bool
) -> tuple[SentinelAuth, str | None, Secret | None]:
    # Explicit, never inferred from which variables happen to be set: a password left in the environment (or
    # one meant for the sentinels reaching the master) must not be sent to, or withheld from, the sentinels
    # silently. Problems name the setting, never a value: usernames and passwords are not echoed.
    password = _sentinel_password(reader)
    auth = data.get("sentinel_auth", "none")
    if auth not in SENTINEL_AUTH_MODES:
        reader.problems.append(
            f"GATEWAY_CONFIG: redis.sentinel_auth: must be one of {', '.join(SENTINEL_AUTH_MODES)}"
        )
        auth = "none"
    username = data.get("sentinel_username")
    if username is not None and (not isinstance(username, str) or not username.strip()):
        reader.problems.append("GATEWAY_CONFIG: redis.sentinel_username: must be a non-empty string")
        username = None
    if auth != "none" and not has_sentinels:
        reader.problems.append(f'GATEWAY_CONFIG: redis.sentinel_auth = "{auth}" needs redis.sentinels')
    if password is not None and auth != "password":
        reader.problems.append(
            'REDIS_SENTINEL_PASSWORD: set, but only used with redis.sentinel_auth = "password" in GATEWAY_CONFIG'
            " (and redis.sentinels); set that, or unset it"
        )
    if auth == "password" and password is None and reader.raw("REDIS_SENTINEL_PASSWORD_FILE") is None:
        reader.problems.append(
            'REDIS_SENTINEL_PASSWORD: required with redis.sentinel_auth = "password" '
            "(or REDIS_SENTINEL_PASSWORD_FILE)"
        )
    if username is not None and auth != "password":
        # With "redis_url" the URL names the user; with none, a username alone authenticates nothing.
        reader.problems.append(
            'GATEWAY_CONFIG: redis.sentinel_username: only used with redis.sentinel_auth = "password"'
        )
        username = None
    if auth == "redis_url":
        parts = _split_url(url) if url is not None else None
        query = parse_qs(parts.query) if parts is not None else {}
        if parts is None or not (parts.password or query.get("password")):
            reader.problems.append(
                'GATEWAY_CONFIG: redis.sentinel_auth = "redis_url" needs REDIS_URL with a password; URL not shown'
            )
    return auth, username, Secret(password) if auth == "password" and password else None


def _sentinel_tls(reader: _Reader, data: Mapping[str, Any], url: str | None, has_sentinels: bool) -> bool:
    tls: object = data.get("sentinel_tls", False)
    if not isinstance(tls, bool):
        reader.problems.append("GATEWAY_CONFIG: redis.sentinel_tls: must be true or false")
        return False
    if tls and not has_sentinels:
        reader.problems.append("GATEWAY_CONFIG: redis.sentinel_tls needs redis.sentinels")
    elif tls and (url is None or urlsplit(url).scheme != "rediss"):
        # One TLS configuration for the deployment: the CA, client certificate and checks REDIS_URL gives the
        # master (its ssl_* options, validated there) serve the sentinels too. Without them only the system CAs
        # could verify a sentinel, which a private CA's certificates would fail on every connection.
        reader.problems.append(
            "GATEWAY_CONFIG: redis.sentinel_tls needs a rediss:// REDIS_URL: its ssl_* options (CA, client "
            "certificate) are used for the sentinels too; URL not shown"
        )
    return tls


def _trusted_proxies(reader: _Reader) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for item in reader.csv("TRUSTED_PROXIES"):
        try:
            network = ipaddress.ip_network(item, strict=False)
        except ValueError:
            reader.problems.append(f"TRUSTED_PROXIES: {item!r} is not an IP address or CIDR")
            continue
        if network.prefixlen == 0:
            # Every hop would be trusted, so the client IP would be the left-most X-Forwarded-For entry: the
            # one the client wrote itself. Like '*' in CORS_ALLOWED_ORIGINS, never what anyone means.
            reader.problems.append(
                f"TRUSTED_PROXIES: {item!r} trusts every address, so any client could choose its own IP; "
                "list your proxies' addresses"
            )
            continue
        networks.append(network)
    return tuple(networks)


_DEFAULT_PORTS: Final = {"http": 80, "https": 443}


def _cors_origins(reader: _Reader) -> tuple[str, ...]:
    """Return the allowed origins as browsers serialize them in `Origin` (CORS compares them as strings)."""
    serialized = []
    for origin in reader.csv("CORS_ALLOWED_ORIGINS"):
        if origin == "*":
            reader.problems.append("CORS_ALLOWED_ORIGINS: '*' is not allowed; list the exact origins")
            continue
        parts = _split_url(origin)
        scheme = parts.scheme.lower() if parts is not None else ""
        if (
            parts is None
            or scheme not in _DEFAULT_PORTS
            or not parts.hostname
            or parts.path not in ("", "/")
            # A query, a fragment or credentials never appear in an Origin header: the entry could never match.
            or "?" in origin
            or "#" in origin
            or "@" in parts.netloc
        ):
            reader.problems.append(
                f"CORS_ALLOWED_ORIGINS: {origin!r} is not an origin like https://app.example"
            )
            continue
        # A browser sends the scheme and host in lower case and leaves out the default port.
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        port = "" if parts.port in (None, _DEFAULT_PORTS[scheme]) else f":{parts.port}"
        serialized.append(f"{scheme}://{host.lower()}{port}")
    return tuple(serialized)


def _load_toml(reader: _Reader) -> dict[str, Any]:
    path = reader.raw("GATEWAY_CONFIG")
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        reader.problems.append(f"GATEWAY_CONFIG: cannot read {path!r}: {exc.strerror}")
        return {}
    except tomllib.TOMLDecodeError as exc:
        reader.problems.append(f"GATEWAY_CONFIG: {path!r} is not valid TOML: {exc}")
        return {}
    unknown = set(data) - {"issuers", "rate_limits", "redis"}
    if unknown:
        reader.problems.append(f"GATEWAY_CONFIG: unknown sections {', '.join(sorted(unknown))}")
    return data


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from `env` (default: the process environment), or raise ConfigError."""
    reader = _Reader(os.environ if env is None else env)
    toml = _load_toml(reader)

    key = reader.raw("ELEVENLABS_API_KEY")
    key_file = reader.file_text("ELEVENLABS_API_KEY_FILE")
    if key is not None and key_file is not None:
        reader.problems.append("ELEVENLABS_API_KEY and ELEVENLABS_API_KEY_FILE are both set; set only one")
    api_key = key or key_file
    if not api_key:
        reader.problems.append("ELEVENLABS_API_KEY: required (or ELEVENLABS_API_KEY_FILE)")

    base_url = reader.raw("ELEVENLABS_BASE_URL") or "https://api.elevenlabs.io"
    _check_url(reader, "ELEVENLABS_BASE_URL", base_url, ("https", "http"))

    reported = len(reader.problems)
    env_issuer = _env_issuer(reader)
    named = [("JWT_ISSUER", env_issuer)] if env_issuer is not None else []
    named.extend(_toml_issuers(reader, toml.get("issuers")))
    _check_issuer_names(reader, named)
    _check_user_id_prefixes(reader, named)
    issuers = [config for _, config in named]
    # Only when nothing was said about the keys: after "key too weak" this would just be noise.
    if not issuers and len(reader.problems) == reported:
        reader.problems.append(
            "JWT_HS256_SECRET: no token keys configured; set JWT_HS256_SECRET, JWT_JWKS_URL, "
            "JWT_PUBLIC_KEY_FILE or [[issuers]] in GATEWAY_CONFIG"
        )

    scopes = frozenset((reader.raw("JWT_DEFAULT_SCOPES") or DEFAULT_SCOPES).split())
    if scopes & NEVER_DEFAULT_SCOPES:
        reader.problems.append(
            f"JWT_DEFAULT_SCOPES: {', '.join(sorted(scopes & NEVER_DEFAULT_SCOPES))} can never be a default"
        )
        scopes -= NEVER_DEFAULT_SCOPES
    unknown_defaults = sorted(scopes - set(KNOWN_SCOPES))
    if unknown_defaults:
        # A typo (convai:sessions) would give every token without a scope claim a scope no route checks: each
        # of them would get 403s, with nothing at start to say why.
        reader.problems.append(
            f"JWT_DEFAULT_SCOPES: unknown scopes {', '.join(map(repr, unknown_defaults))}"
            f" (known: {', '.join(KNOWN_SCOPES)})"
        )

    agents = frozenset(reader.csv("ALLOWED_AGENT_IDS"))
    if not agents:
        reader.problems.append("ALLOWED_AGENT_IDS: required; list the agent ids users may talk to")

    max_lifetime = reader.integer("JWT_MAX_LIFETIME_SECONDS", 0, low=0, high=365 * 86400)
    metrics_port = reader.integer("METRICS_PORT", 0, low=0, high=65535)

    settings = Settings(
        elevenlabs_api_key=Secret(api_key or ""),
        elevenlabs_base_url=base_url.rstrip("/"),
        redis=_redis(reader, toml.get("redis")),
        redis_timeout_seconds=reader.integer("REDIS_TIMEOUT_MS", 100, low=1, high=60_000) / 1000,
        redis_pipeline_limit=reader.integer("REDIS_PIPELINE_LIMIT", 100, low=0, high=10_000),
        issuers=tuple(issuers),
        jwt_leeway_seconds=reader.integer("JWT_LEEWAY_SECONDS", 30, low=0, high=600),
        jwt_user_claim=reader.raw("JWT_USER_CLAIM") or "sub",
        jwt_default_scopes=scopes,
        jwt_max_lifetime_seconds=max_lifetime or None,
        jwks_unknown_kid_cooldown_seconds=reader.number(
            "JWKS_UNKNOWN_KID_COOLDOWN_SECONDS", 30.0, low=0.0, high=3600.0
        ),
        allowed_agent_ids=agents,
        ownership_mode=reader.choice("OWNERSHIP_MODE", "ledger_or_user_id", OWNERSHIP_MODES),  # type: ignore[arg-type]
        ledger_ttl_days=reader.integer("LEDGER_TTL_DAYS", 90, low=1, high=3650),
        rate_limit_on_redis_error=reader.choice(  # type: ignore[arg-type]
            "RATE_LIMIT_ON_REDIS_ERROR", "local", REDIS_ERROR_MODES
        ),
        rate_limits=_rate_limits(reader, toml.get("rate_limits")),
        # Shorter than /32 would lump whole providers together; /128 counts each address (no aggregation).
        rate_limit_ipv6_prefix=reader.integer("RATE_LIMIT_IPV6_PREFIX", 64, low=32, high=128),
        trusted_proxies=_trusted_proxies(reader),
        cors_allowed_origins=_cors_origins(reader),
        redact_fields=reader.csv("REDACT_FIELDS"),
        host=reader.raw("HOST") or "127.0.0.1",
        port=reader.integer("PORT", 8080, low=1, high=65535),
        metrics_port=metrics_port or None,
        log_level=reader.choice("LOG_LEVEL", "INFO", LOG_LEVELS),
        upstream_connect_timeout=reader.number("UPSTREAM_CONNECT_TIMEOUT_SECONDS", 3.0, low=0.05, high=60),
        upstream_read_timeout=reader.number("UPSTREAM_READ_TIMEOUT_SECONDS", 10.0, low=0.05, high=300),
        upstream_audio_read_timeout=reader.number(
            "UPSTREAM_AUDIO_READ_TIMEOUT_SECONDS", 60.0, low=0.05, high=3600
        ),
        upstream_max_retries=reader.integer("UPSTREAM_MAX_RETRIES", 2, low=0, high=5),
        # At most half the upstream connection pool (200), so token minting and JSON calls always find one.
        upstream_max_audio_streams=reader.integer("UPSTREAM_MAX_AUDIO_STREAMS", 50, low=1, high=100),
        request_body_timeout_seconds=reader.number("REQUEST_BODY_TIMEOUT_SECONDS", 10.0, low=0.05, high=600),
        request_header_timeout_seconds=reader.number(
            "REQUEST_HEADER_TIMEOUT_SECONDS", 10.0, low=0.05, high=600
        ),
        keep_alive_timeout_seconds=reader.integer("KEEP_ALIVE_TIMEOUT_SECONDS", 5, low=1, high=3600),
        max_connections=reader.integer("MAX_CONNECTIONS", 4096, low=1, high=1_000_000),
        egress_proxy_url=_egress_proxy(reader),
        gateway_config=reader.raw("GATEWAY_CONFIG"),
    )
    if reader.problems:
        raise ConfigError(reader.problems)
    return settings
