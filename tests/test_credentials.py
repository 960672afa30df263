"""Credentials: the compose file turns on the intake's and Flower's, secrets stay out of ``config``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from prompt_tasks.cli import main
from prompt_tasks.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_compose_configures_intake_and_flower_credentials() -> None:
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    token = services["intake"]["environment"]["PROMPT_TASKS_INTAKE_TOKEN"]
    assert token.startswith("${INTAKE_TOKEN:?")  # required: compose refuses to start without it
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_USER")
    example = dict(line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["INTAKE_TOKEN"] == example["FLOWER_PASSWORD"] == ""  # to fill in, no shipped value


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


# --- the embedded stack's own secrets (issue 17) -----------------------------------------


def test_compose_requires_every_secret_from_the_env_file() -> None:
    """No password ships as a default: each is ``${VAR:?message}``, set in ``.env``."""
    text = (ROOT / "docker-compose.yml").read_text()
    for var in ("REDIS_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD", "FLOWER_PASSWORD",
                "INTAKE_TOKEN"):
        uses = re.findall(r"\$\{" + var + r"(:[-?][^}]*)?\}", text)
        assert uses, var
        assert all(use.startswith(":?") for use in uses), (var, uses)
    example = (ROOT / ".env.example").read_text()
    assert "REDIS_PASSWORD=" in example


def test_embedded_redis_never_runs_unprotected(tmp_path: Path) -> None:
    from prompt_tasks.stack.servers import redis_argv

    for password in (None, "pw"):
        argv = " ".join(redis_argv(Settings(state_dir=tmp_path, redis_password=password), tmp_path))
        assert "--protected-mode no" not in argv


@pytest.mark.slow
def test_stack_up_generates_and_every_process_uses_redis_and_s3_secrets(tmp_path: Path) -> None:
    """First ``stack up``: a random Redis password and S3 keys (mode 600); Redis refuses
    strangers; ``Settings`` and ``celery -A prompt_tasks`` find them; explicit ones win."""
    import os
    import stat
    import subprocess
    import sys

    import redis as redis_lib
    from minio import Minio

    from prompt_tasks.stack.servers import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPT_TASKS_")}
    env.update({"PROMPT_TASKS_STATE_DIR": str(tmp_path), "PROMPT_TASKS_REDIS_PORT": str(free_port()),
                "PROMPT_TASKS_S3_PORT": str(free_port()), "PROMPT_TASKS_REDIS_AOF": "false"})
    bin_dir = Path(sys.executable).parent
    skip = [a for role in ("detector", "wait", "summary", "beat", "flower", "dispatcher", "intake")
            for a in ("--skip", role)]
    up = subprocess.run([str(bin_dir / "prompt-tasks"), "stack", "up", *skip], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        files = [tmp_path / name for name in ("redis-password", "s3-access-key", "s3-secret-key")]
        for path in files:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
            assert len(path.read_text().strip()) >= 16
            assert path.read_text().strip() not in up.stdout + up.stderr  # never printed
        port = int(env["PROMPT_TASKS_REDIS_PORT"])
        stranger = redis_lib.Redis(port=port)
        with pytest.raises(redis_lib.AuthenticationError):
            stranger.ping()
        stranger.close()
        settings = Settings(state_dir=tmp_path, redis_port=port, s3_port=int(env["PROMPT_TASKS_S3_PORT"]))
        assert settings.redis_password is not None
        assert settings.redis_password.get_secret_value() == files[0].read_text().strip()
        assert settings.s3_access_key.get_secret_value() == files[1].read_text().strip()
        client = redis_lib.Redis.from_url(settings.redis_url(0))
        assert client.ping()
        public = Minio(f"127.0.0.1:{settings.s3_port}", access_key="prompt-tasks",
                       secret_key="prompt-tasks-secret", secure=False)
        with pytest.raises(Exception, match=r"(?i)access|signature|denied|invalid"):
            public.bucket_exists(settings.raw_bucket)
        from prompt_tasks.objstore import make_client

        assert make_client(settings).bucket_exists(settings.raw_bucket)
        sent = subprocess.run([str(bin_dir / "celery"), "-A", "prompt_tasks", "call", "prompt_tasks.no_such_task"],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert client.llen("default") == 1  # the message reached the password-protected broker
        client.close()
        explicit = Settings(state_dir=tmp_path, redis_password="mine", s3_access_key="me")
        assert explicit.redis_password is not None and explicit.redis_password.get_secret_value() == "mine"
        assert explicit.s3_access_key.get_secret_value() == "me"
    finally:
        subprocess.run([str(bin_dir / "prompt-tasks"), "stack", "down"], env=env, cwd=tmp_path,
                       capture_output=True, timeout=60)
