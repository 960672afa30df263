"""Settings: environment parsing, derived URLs, masking."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from prompt_tasks.cli import main
from prompt_tasks.settings import Settings, mask_url


def test_defaults_do_not_clash_with_common_services() -> None:
    s = Settings()
    ports = {s.redis_port, s.s3_port, s.flower_port, s.intake_port, s.metrics_port}
    assert len(ports) == 5
    assert not ports & {6379, 5432, 5672, 9000, 5555, 8080}
    assert s.broker == "redis://127.0.0.1:16379/0"
    assert s.backend == "redis://127.0.0.1:16379/1"
    assert s.s3_url == "http://127.0.0.1:19000"


def test_environment_overrides(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROMPT_TASKS_REDIS_PORT", "7001")
    monkeypatch.setenv("PROMPT_TASKS_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("PROMPT_TASKS_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//")
    s = Settings()
    assert s.redis_port == 7001
    assert s.broker.startswith("amqp://")
    assert s.backend == "redis://127.0.0.1:7001/1"
    assert s.central_repo_uri == str(tmp_path / "central")
    assert s.local_repo_path == tmp_path / "local"


def test_invalid_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPT_TASKS_REDIS_PORT", "not-a-port")
    with pytest.raises(ValueError, match="redis_port"):
        Settings()


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPT_TASKS_REDIS_PASSWORD", "hunter2-secret")
    monkeypatch.setenv("PROMPT_TASKS_S3_SECRET_KEY", "s3-very-secret")
    monkeypatch.setenv("PROMPT_TASKS_RESULT_BACKEND", "redis://:backend-pw@127.0.0.1:1/1")
    s = Settings()
    assert "hunter2-secret" in s.broker  # the real URL keeps it
    text = s.to_json()
    for secret in ("hunter2-secret", "s3-very-secret", "backend-pw"):
        assert secret not in text
    assert "hunter2-secret" not in repr(s)
    result = CliRunner().invoke(main, ["config", "--json"])
    assert result.exit_code == 0, result.output
    assert "hunter2-secret" not in result.output and "s3-very-secret" not in result.output
    assert json.loads(result.output)["redis_password"] == "***"


def test_mask_url() -> None:
    assert mask_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert mask_url("amqp://u:pw@h:5672//") == "amqp://u:***@h:5672//"
    assert mask_url("redis://h:1/0") == "redis://h:1/0"
