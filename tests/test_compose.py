"""docker-compose.yml checked against the project's own settings, roles and commands.

No Docker engine runs here, so the file is loaded as YAML, its ``${VAR:-default}`` references
are resolved from their defaults (the secrets, ``${VAR:?message}``, as from a filled ``.env``),
and every service is compared with what the code expects.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
import yaml

from prompt_tasks.cli import main
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import ENV_PREFIX
from workers import CELERY_ROLES, ROLES

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
#: Ports commonly taken on a machine: the stack's published ports must avoid them.
COMMON_PORTS = {6379, 5432, 5672, 9000, 5555, 8080, 15672}
_VAR = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?:(?P<op>:?[-?])(?P<default>[^}]*))?\}")


def _value(match: re.Match[str]) -> str:
    """A required ``${VAR:?message}`` as a filled-in ``.env`` would give it, else the default."""
    if (match.group("op") or "").endswith("?"):
        return f"env-{match.group('name').lower().replace('_', '-')}"
    return match.group("default") or ""


def _interpolate(value: Any) -> Any:
    """Resolve ``${VAR:-default}`` like compose would with no ``.env``, and ``${VAR:?message}``
    (a secret, required) as if ``.env`` set it (``$$`` is a ``$``)."""
    if isinstance(value, str):
        return _VAR.sub(_value, value).replace("$$", "$")
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    return value


@pytest.fixture(scope="module")
def raw_text() -> str:
    return COMPOSE.read_text()


@pytest.fixture(scope="module")
def services(raw_text: str) -> dict[str, dict[str, Any]]:
    doc = _interpolate(yaml.safe_load(raw_text))
    return dict(doc["services"])


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def _settings(service: dict[str, Any]) -> Settings:
    """The settings a process of ``service`` builds from its environment."""
    values = {
        name.removeprefix(ENV_PREFIX).lower(): value
        for name, value in _env(service).items()
        if name.startswith(ENV_PREFIX)
    }
    return Settings(**values)


def _ours(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services.items() if str(s.get("image", "")).startswith("prompt-tasks:")}


def test_every_role_has_a_service(services: dict[str, dict[str, Any]]) -> None:
    assert set(ROLES) <= set(services)
    for name in ("redis", "minio", "postgres"):
        assert name in services


def test_every_role_service_runs_its_role(services: dict[str, dict[str, Any]]) -> None:
    for name, role in ROLES.items():
        command = services[name]["command"]
        if role.kind == "worker":
            assert command == ["prompt-tasks", "worker", name]
        elif role.kind in ("beat", "flower"):
            assert command[:4] == ["celery", "-A", "prompt_tasks", role.kind]
        else:
            assert command == ["prompt-tasks", name]


def _resolve(command: list[str]) -> None:
    """Fail unless ``command`` is a registered ``prompt-tasks`` command that parses."""
    cmd: click.Command = main
    args = list(command[1:])
    path = ["prompt-tasks"]
    while isinstance(cmd, click.Group) and args and not args[0].startswith("-"):
        name = args.pop(0)
        found = cmd.get_command(click.Context(cmd), name)
        assert found is not None, f"{' '.join(path)} has no command {name!r}"
        cmd = found
        path.append(name)
    cmd.make_context(" ".join(path), list(args))  # options and arguments parse
    if path[1:2] == ["worker"]:
        assert args[0] in CELERY_ROLES


def test_every_command_exists(services: dict[str, dict[str, Any]]) -> None:
    for name, service in _ours(services).items():
        command = service["command"]
        assert isinstance(command, list), f"{name}: use the exec form"
        if command[0] == "prompt-tasks":
            _resolve(command)
        else:
            assert command[:3] == ["celery", "-A", "prompt_tasks"], name
            assert command[3] in ("beat", "flower"), name  # workers go through `prompt-tasks worker`


def test_minio_notification_matches_what_the_dispatcher_reads(services: dict[str, dict[str, Any]]) -> None:
    minio = services["minio"]
    assert minio["image"] == MINIO_IMAGE
    env = _env(minio)
    dispatcher = _settings(services["dispatcher"])
    events = urlsplit(dispatcher.events_redis)
    target = dispatcher.event_arn.rsplit(":", 2)  # arn:minio:sqs::<id>:redis
    assert target[-1] == "redis"
    suffix = target[-2]
    assert env[f"MINIO_NOTIFY_REDIS_ENABLE_{suffix}"] == "on"
    assert env[f"MINIO_NOTIFY_REDIS_KEY_{suffix}"] == dispatcher.event_list
    assert env[f"MINIO_NOTIFY_REDIS_FORMAT_{suffix}"] == "access"
    assert env[f"MINIO_NOTIFY_REDIS_ADDRESS_{suffix}"] == f"{events.hostname}:{events.port}"
    assert env.get(f"MINIO_NOTIFY_REDIS_PASSWORD_{suffix}") == events.password
    assert events.path in ("", "/", "/0")  # MinIO writes events to db 0 whatever we configure
    assert events.hostname in services
    # the credentials and bucket agree with the server
    assert dispatcher.s3_access_key.get_secret_value() == env["MINIO_ROOT_USER"]
    assert dispatcher.s3_secret_key.get_secret_value() == env["MINIO_ROOT_PASSWORD"]
    assert urlsplit(dispatcher.s3_url).hostname == "minio"


def test_every_service_of_the_fleet_shares_broker_and_events(services: dict[str, dict[str, Any]]) -> None:
    fleet = {name: _settings(s) for name, s in _ours(services).items()}
    for attr in ("broker", "backend", "events_redis", "event_list", "raw_bucket", "s3_url", "central_repo_uri"):
        assert len({str(getattr(s, attr)) for s in fleet.values()}) == 1, attr
    any_settings = next(iter(fleet.values()))
    assert urlsplit(any_settings.broker).hostname == "redis"
    assert any_settings.event_list not in {q for r in ROLES.values() for q in r.queues}


def test_env_names_are_settings_fields(services: dict[str, dict[str, Any]]) -> None:
    fields = set(Settings.model_fields)
    for name, service in services.items():
        for var in _env(service):
            if var.startswith(ENV_PREFIX):
                assert var.removeprefix(ENV_PREFIX).lower() in fields, f"{name}: {var}"


def test_published_ports_do_not_clash(services: dict[str, dict[str, Any]]) -> None:
    seen: dict[int, str] = {}
    for name, service in services.items():
        for spec in service.get("ports") or []:
            host_ip, host_port, _container = str(spec).rsplit(":", 2)
            assert host_ip == "127.0.0.1", f"{name}: publish on loopback only"
            port = int(host_port)
            assert port not in seen, f"{name} and {seen.get(port)} both publish {port}"
            assert port not in COMMON_PORTS, f"{name} publishes the common port {port}"
            seen[port] = name
    assert not services["detector"].get("ports")  # scalable: no fixed host port
    assert "container_name" not in services["detector"]


def test_servers_persist_and_authenticate(services: dict[str, dict[str, Any]]) -> None:
    redis_cmd = services["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in redis_cmd
    assert "FLOWER_BASIC_AUTH" in _env(services["flower"])
    init = ROOT / "docker" / "postgres-init"
    assert any("btree_gist" in sql.read_text() for sql in init.glob("*.sql"))
    assert any(str(v).startswith("./docker/postgres-init:") for v in services["postgres"]["volumes"])


def test_env_example_lists_every_variable(raw_text: str) -> None:
    used = {m.group("name") for m in _VAR.finditer(raw_text)}
    example = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example


def test_dockerfile_builds_the_package_on_python_312() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12-slim$", text, re.MULTILINE)
    assert "pip install ." in text
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".state", ".git", ".env"} <= set(ignored)
