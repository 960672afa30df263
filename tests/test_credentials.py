"""Credentials: the compose file turns on the intake's and Flower's, secrets stay out of ``config``."""

from __future__ import annotations

from pathlib import Path

import yaml
from click.testing import CliRunner

from prompt_tasks.cli import main

ROOT = Path(__file__).resolve().parent.parent


def test_compose_configures_intake_and_flower_credentials() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    token = services["intake"]["environment"]["PROMPT_TASKS_INTAKE_TOKEN"]
    assert token.startswith("${INTAKE_TOKEN:-") and token != "${INTAKE_TOKEN:-}"  # never empty by default
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_USER")
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["INTAKE_TOKEN"] and example["FLOWER_PASSWORD"]


def test_config_never_prints_any_secret() -> None:
    env = {
        "PROMPT_TASKS_REDIS_PASSWORD": "redis-pw-1a2b",
        "PROMPT_TASKS_S3_SECRET_KEY": "s3-secret-3c4d",
        "PROMPT_TASKS_S3_ACCESS_KEY": "s3-access-5e6f",
        "PROMPT_TASKS_INTAKE_TOKEN": "intake-token-7a8b",
        "PROMPT_TASKS_FLOWER_PASSWORD": "flower-pw-9c0d",
        "PROMPT_TASKS_BROKER_URL": "amqp://guest:amqp-pw-e1f2@127.0.0.1:5672//",
        "PROMPT_TASKS_APDB_URL": "postgresql+psycopg2://u:pg-pw-3a4b@db:5432/apdb",
    }
    for args in (["config"], ["config", "--json"]):
        result = CliRunner().invoke(main, args, env=env)
        assert result.exit_code == 0, result.output
        for secret in env.values():
            for part in (secret, secret.split(":")[-1].split("@")[0]):
                if "-" in part and "/" not in part:
                    assert part not in result.output, part
