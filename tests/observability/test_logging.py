"""JSON logging, the secret-mask filter, audit events and user hashes."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.observability import (
    AUDIT_LOGGER,
    JsonFormatter,
    SecretMaskFilter,
    _utc_timestamp,
    audit,
    configure_logging,
    mask_secrets,
    user_hash,
)
from service.settings import load_settings

SIGNING_KEY = "observability-tests-signing-key-0123456789abcdef0123456789abcdef"
API_KEY = "sk_" + "0123456789abcdef" * 3
TOUCHED_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "httpx", "httpcore", AUDIT_LOGGER)


@contextlib.contextmanager
def restore_logging() -> Iterator[None]:
    """Put the root logger and the loggers configure_logging touches back as they were."""
    root = logging.getLogger()
    saved_root = (list(root.handlers), root.level)
    saved = {
        name: (list(lg.handlers), lg.level, lg.propagate)
        for name in TOUCHED_LOGGERS
        for lg in [logging.getLogger(name)]
    }
    try:
        yield
    finally:
        for handler in root.handlers:
            if handler not in saved_root[0]:
                handler.close()
        root.handlers[:] = saved_root[0]
        root.setLevel(saved_root[1])
        for name, (handlers, level, propagate) in saved.items():
            lg = logging.getLogger(name)
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


@pytest.fixture
def json_logs() -> Iterator[None]:
    """Run a test with the production logging setup."""
    with restore_logging():
        configure_logging("INFO")
        yield


def read_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    """Parse every stderr line written so far as JSON (failing on any non-JSON line)."""
    return [json.loads(raw) for raw in capsys.readouterr().err.splitlines()]


def test_log_lines_are_json_with_standard_and_extra_fields(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    logging.getLogger("convai_gateway.test").warning(
        "limiter %s", "degraded", extra={"mode": "local", "n": 3}
    )
    (line,) = read_lines(capsys)
    assert line["level"] == "WARNING"
    assert line["logger"] == "convai_gateway.test"
    assert line["msg"] == "limiter degraded"
    assert (line["mode"], line["n"]) == ("local", 3)
    assert isinstance(line["ts"], str) and line["ts"].endswith("Z") and "T" in line["ts"]


class Peer:
    def __str__(self) -> str:
        return "peer 10.0.0.1"


class Route(str):
    pass


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"n": 2**70}, {"n": 2**70}),  # beyond 64 bits: orjson refuses it, the C encoder keeps every digit
        ({"peer": Peer()}, {"peer": "peer 10.0.0.1"}),  # a type neither encoder knows: its str()
        ({"route": Route("/v1")}, {"route": "/v1"}),  # a str subclass, as the C encoder writes it
        ({"ratio": 1e-05, "flag": True, "none": None}, {"ratio": 1e-05, "flag": True, "none": None}),
        ({"ratio": float("nan")}, {"ratio": None}),  # JSON has no NaN
    ],
    ids=["big-int", "unknown-type", "str-subclass", "plain", "nan"],
)
def test_log_fields_of_any_type_make_a_json_line(
    json_logs: None, capsys: pytest.CaptureFixture[str], extra: dict[str, object], expected: dict[str, object]
) -> None:
    logging.getLogger("convai_gateway.test").warning("fields", extra=extra)
    (line,) = read_lines(capsys)
    assert {key: line[key] for key in expected} == expected


def test_configure_logging_is_idempotent_and_honours_level(capsys: pytest.CaptureFixture[str]) -> None:
    with restore_logging():
        configure_logging("INFO")
        configure_logging("WARNING")
        configure_logging("WARNING")
        logging.getLogger("convai_gateway.test").info("dropped")
        logging.getLogger("convai_gateway.test").error("kept")
        lines = read_lines(capsys)
        ours = [h for h in logging.getLogger().handlers if isinstance(h.formatter, JsonFormatter)]
    assert [line["msg"] for line in lines] == ["kept"]
    assert len(ours) == 1


def test_configure_logging_rejects_unknown_level() -> None:
    with restore_logging(), pytest.raises(ValueError, match="unknown log level"):
        configure_logging("LOUD")


def test_exceptions_are_logged_in_the_line_with_secrets_masked(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    token = jwt.encode({"sub": "alice"}, SIGNING_KEY, algorithm="HS256")
    try:
        raise RuntimeError(f"upstream said no to {token}")
    except RuntimeError:
        logging.getLogger("convai_gateway.test").exception("call failed")
    (line,) = read_lines(capsys)
    assert "RuntimeError" in str(line["exc"])
    assert token not in json.dumps(line)
    assert "[REDACTED]" in str(line["exc"])


def test_secret_mask_filter_masks_messages_args_and_extras(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    token = jwt.encode({"sub": "alice"}, SIGNING_KEY, algorithm="HS256")
    signed_url = (
        "wss://api.elevenlabs.io/v1/convai/conversation?agent_id=agent_1&conversation_signature=s3cr3t-sig"
    )
    log = logging.getLogger("convai_gateway.test")
    log.warning("token %s in args", token)
    log.warning("headers {'xi-api-key': '%s', 'accept': 'json'}", API_KEY)
    log.warning("xi-api-key=plainvalue123 and XI_API_KEY: other-value")
    log.warning("minted %s", signed_url)
    log.warning(
        "auth", extra={"header": f"Bearer {token}", "raw": "Authorization: Bearer opaque.token-value"}
    )
    rendered = capsys.readouterr().err
    for secret in (token, API_KEY, "plainvalue123", "other-value", "s3cr3t-sig", "opaque.token-value"):
        assert secret not in rendered
    lines = [json.loads(raw) for raw in rendered.splitlines()]
    assert lines[3]["msg"] == (
        "minted wss://api.elevenlabs.io/v1/convai/conversation?agent_id=agent_1&conversation_signature=[REDACTED]"
    )
    assert lines[0]["msg"] == "token [REDACTED] in args"
    assert "'accept': 'json'" in str(lines[1]["msg"])


def test_secret_mask_filter_on_a_bare_record() -> None:
    token = jwt.encode({"sub": "bob"}, SIGNING_KEY, algorithm="HS256")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "got %s and %d", (token, 5), None)
    assert SecretMaskFilter().filter(record) is True
    assert record.getMessage() == "got [REDACTED] and 5"
    assert mask_secrets("nothing secret here: agent_1, conv_42") == "nothing secret here: agent_1, conv_42"


def test_an_audit_event_is_one_json_line_with_its_fields_and_clashing_names_suffixed(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    audit(
        "act_as", actor=user_hash("gateway-svc"), user=user_hash("alice"), name="clashes", agent_id="agent_1"
    )
    (line,) = read_lines(capsys)
    assert line["logger"] == AUDIT_LOGGER
    assert line["level"] == "INFO"
    assert line["msg"] == "act_as" and line["event"] == "act_as"
    assert line["actor"] == user_hash("gateway-svc") and line["user"] == user_hash("alice")
    assert line["agent_id"] == "agent_1"
    # A field named like a LogRecord attribute is kept under a suffixed key instead of breaking logging.
    assert line["name_"] == "clashes"


def test_audit_events_survive_a_quiet_log_level(capsys: pytest.CaptureFixture[str]) -> None:
    with restore_logging():
        configure_logging("ERROR")
        audit("conversation_deleted", conversation_id="conv_1")
        logging.getLogger("convai_gateway.test").warning("not shown")
        lines = read_lines(capsys)
    assert [line["event"] for line in lines] == ["conversation_deleted"]


def test_user_hash_is_short_stable_and_distinct() -> None:
    first = user_hash("alice@example.com")
    assert first == user_hash("alice@example.com")
    assert len(first) == 16 and int(first, 16) >= 0
    assert first != user_hash("alice@example.co")
    assert "alice" not in first


def test_secret_mask_filter_masks_args_of_a_broken_format_string() -> None:
    token = jwt.encode({"sub": "carol"}, SIGNING_KEY, algorithm="HS256")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "two %s %s but one arg", (token,), None)
    assert SecretMaskFilter().filter(record) is True
    assert record.args == ("[REDACTED]",)


# A key without the sk_<hex> shape: only the xi-api-key label, or knowing the value, can catch it.
UNSHAPED_KEY = "xi-test-key-0123456789abcdefghij"


@pytest.mark.parametrize(
    "text",
    [
        f"[('xi-api-key', '{UNSHAPED_KEY}'), ('accept', 'application/json')]",  # the transport's header pairs
        f'{{"xi-api-key": "{UNSHAPED_KEY}"}}',
        f"XI_API_KEY={UNSHAPED_KEY}",
    ],
)
def test_xi_api_key_is_masked_in_every_quoting(text: str) -> None:
    assert UNSHAPED_KEY not in mask_secrets(text)


def test_exception_text_is_masked_before_json_escaping(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        raise RuntimeError(f'upstream echoed {{"xi-api-key": "{UNSHAPED_KEY}"}}')
    except RuntimeError:
        logging.getLogger("convai_gateway.test").exception("call failed")
    (line,) = read_lines(capsys)
    assert UNSHAPED_KEY not in json.dumps(line)


def test_configured_secrets_are_masked_wherever_they_appear(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    bare_key = "bare-key-" + "q" * 24
    hs_secret = "hs-secret-" + "w" * 32
    settings = load_settings(
        {
            "ELEVENLABS_API_KEY": bare_key,
            "ALLOWED_AGENT_IDS": "agent_demo",
            "JWT_HS256_SECRET": hs_secret,
            "EGRESS_PROXY_URL": "http://proxy-user:proxy%2Fpass123@127.0.0.1:3128",
            "REDIS_URL": "redis://:redis%40pass456@127.0.0.1:1/0",
        }
    )
    create_app(settings)
    logging.getLogger("convai_gateway.test").warning(
        "odd: %s %s %s %s", bare_key, hs_secret, "proxy/pass123", "redis@pass456"
    )
    (line,) = read_lines(capsys)
    for secret in (bare_key, hs_secret, "proxy/pass123", "proxy%2Fpass123", "redis@pass456"):
        assert secret not in json.dumps(line)


def test_egress_proxy_basic_credentials_are_masked_wherever_they_appear(
    json_logs: None, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the transport sends as Proxy-Authorization: base64 of the decoded user:password, not the password.
    user, password = "edge-user", "Pr0xy/basic-only-9ZqT"
    credentials = base64.b64encode(f"{user}:{password}".encode()).decode()
    settings = load_settings(
        {
            "ELEVENLABS_API_KEY": "xi-key-" + "b" * 24,
            "ALLOWED_AGENT_IDS": "agent_demo",
            "JWT_HS256_SECRET": "s" * 32,
            "EGRESS_PROXY_URL": f"http://{user}:Pr0xy%2Fbasic-only-9ZqT@127.0.0.1:3128",
        }
    )
    create_app(settings)
    log = logging.getLogger("convai_gateway.test")
    log.warning("bare %s", credentials)
    log.warning("headers %s", [("Proxy-Authorization", f"Basic {credentials}")])
    try:
        raise RuntimeError(f"proxy refused {{'proxy-authorization': 'Basic {credentials}'}}")
    except RuntimeError:
        log.exception("call failed")
    lines = read_lines(capsys)
    assert len(lines) == 3
    for line in lines:
        assert credentials not in json.dumps(line), line
    assert lines[0]["msg"] == "bare [REDACTED]"


@pytest.mark.parametrize(
    "template",
    [
        "Proxy-Authorization: Basic {}",
        "[('proxy-authorization', 'Basic {}')]",
        '{{"Authorization": "basic {}"}}',
        "upstream echoed BASIC {}, refused",
    ],
)
def test_basic_credentials_are_masked_by_their_shape(template: str) -> None:
    # Credentials the gateway never configured (an upstream echoing a header, a JWKS host's proxy): only the
    # `Basic <base64 of user:password>` shape can catch them.
    credentials = base64.b64encode(b"someone-else:an0ther-pass").decode()
    masked = mask_secrets(template.format(credentials))
    assert credentials not in masked
    assert "[REDACTED]" in masked


@pytest.mark.parametrize(
    "text",
    ["basic auth is configured", "Basic checks passed", "basic Zm9v", "Basic \u017f\u017f\u017f\u017f"],
)
def test_words_after_basic_that_are_no_credentials_are_kept(text: str) -> None:
    # Basic credentials always decode to user:password; a word that does not is left alone.
    assert mask_secrets(text) == text


@settings(max_examples=2_000, deadline=None)
@given(created=st.floats(min_value=0, max_value=2**32, allow_nan=False, allow_infinity=False))
def test_timestamp_matches_datetime_isoformat_to_the_millisecond(created: float) -> None:
    expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    assert _utc_timestamp(created) == expected


def test_timestamp_rounds_to_the_microsecond_before_cutting_to_milliseconds() -> None:
    # 0.478 is stored as 0.47799999...; cut straight to milliseconds it would read .477.
    assert _utc_timestamp(1_764_000_000.478) == "2025-11-24T16:00:00.478Z"
    # Within half a microsecond of the next second: the second itself moves on.
    assert _utc_timestamp(1_764_000_000.9999996) == "2025-11-24T16:00:01.000Z"
    # The cached second is not reused across seconds.
    assert _utc_timestamp(1_764_000_001.5) == "2025-11-24T16:00:01.500Z"
