"""Structured logs: JSON lines with the detector-visit fields, secrets masked."""

from __future__ import annotations

import json
import logging

import pytest

from prompt_tasks.logs import CONTEXT_FIELDS, bound, configure_logging


def test_json_lines_carry_the_detector_visit(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=True)
    log = logging.getLogger("prompt_tasks.test")
    with bound(instrument="SimCam", group="2026-11-24T01:00:00.000", detector=4, stage="ingest"):
        log.info("ingested %d snaps", 2)
    log.info("outside")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["message"] == "ingested 2 snaps"
    assert first["instrument"] == "SimCam" and first["detector"] == 4 and first["stage"] == "ingest"
    assert set(CONTEXT_FIELDS) <= set(second)
    assert second["instrument"] == ""


def test_passwords_in_urls_are_masked(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json_format=True)
    logging.getLogger("prompt_tasks.test").warning("broker redis://:hunter2@127.0.0.1:1/0 down")
    line = capsys.readouterr().err
    assert "hunter2" not in line and "redis://:***@127.0.0.1:1/0" in line
