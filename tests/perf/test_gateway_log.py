"""The soak's reading of the gateway log: which failures the gateway itself recorded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.observability import ACCESS_LOGGER, JsonFormatter
from tests.perf.bench import gateway_log_problems


def _line(logger: str, level: int, msg: str, **extra: Any) -> bytes:
    record = logging.LogRecord(logger, level, __file__, 0, msg, None, None)
    for name, value in extra.items():
        setattr(record, name, value)
    return (JsonFormatter().format(record) + "\n").encode()


def test_counts_5xx_responses_and_warnings_logged_after_the_offset(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    earlier = _line(ACCESS_LOGGER, logging.INFO, "request", status=503)
    path.write_bytes(earlier)
    with path.open("ab") as log:
        log.write(_line(ACCESS_LOGGER, logging.INFO, "request", status=200))
        log.write(_line(ACCESS_LOGGER, logging.INFO, "request", status=503) * 2)
        log.write(_line(ACCESS_LOGGER, logging.INFO, "request", status=502))
        log.write(_line("service.ratelimit", logging.WARNING, "rate limiter: Redis unavailable") * 3)
        log.write(_line("service.upstream", logging.INFO, "retrying upstream"))
        log.write(b"a plain-text line from a library\n")
    assert gateway_log_problems(path, len(earlier)) == {
        "responses_5xx": {"503": 2, "502": 1},
        "warnings": {"rate limiter: Redis unavailable": 3},
    }
    assert gateway_log_problems(path)["responses_5xx"] == {"503": 3, "502": 1}


def test_a_clean_log_has_no_problems(tmp_path: Path) -> None:
    path = tmp_path / "gateway.log"
    path.write_bytes(_line(ACCESS_LOGGER, logging.INFO, "request", status=200))
    assert gateway_log_problems(path) == {"responses_5xx": {}, "warnings": {}}
