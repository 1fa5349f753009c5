"""Logging: one JSON object per line on stderr, secrets masked."""

from __future__ import annotations

import json
import logging

import pytest

from amoskys.config import LoggingConfig
from amoskys.logs import setup_logging


def test_json_lines_with_masked_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="info", format="json"))
    log = logging.getLogger("amoskys.test")
    log.info("target polled", extra={"target": "sw1", "community": "public-secret", "auth_key": "k"})
    log.debug("hidden")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["msg"] for line in lines] == ["target polled", "failed"]
    assert lines[0]["target"] == "sw1"
    assert lines[0]["community"] == "***"
    assert lines[0]["auth_key"] == "***"
    assert lines[1]["error"] == "ValueError: boom"
    assert lines[0]["level"] == "info"


def test_text_format(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging(LoggingConfig(level="debug", format="text"))
    logging.getLogger("amoskys.t").debug("hello", extra={"password": "pw", "n": 3})
    err = capsys.readouterr().err
    assert "hello" in err
    assert "password=***" in err
    assert "pw " not in err
    assert "n=3" in err
