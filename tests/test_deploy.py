"""The Kubernetes manifests: every role deployed as the project runs it, settings real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from prompt_tasks.cli import main as cli
from prompt_tasks.settings import Settings
from workers import ROLES

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


@pytest.fixture(scope="module")
def documents() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def _by_kind(documents: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents if d["kind"] == kind}


def test_every_role_is_a_deployment(documents: list[dict[str, Any]]) -> None:
    deployments = _by_kind(documents, "Deployment")
    assert set(ROLES) <= set(deployments)
    assert deployments["beat"]["spec"]["replicas"] == 1
    assert deployments["beat"]["spec"]["strategy"]["type"] == "Recreate"


def test_commands_name_real_roles_and_commands(documents: list[dict[str, Any]]) -> None:
    for name, deployment in _by_kind(documents, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        command = container["command"]
        if command[0] == "prompt-tasks":
            assert command[1] in cli.commands, f"{name}: unknown command {command[1]}"
            if command[1] == "worker":
                assert command[2] in ROLES and ROLES[command[2]].kind == "worker"
        else:
            assert command[:3] == ["celery", "-A", "prompt_tasks"]
            assert command[3] == ROLES[name].kind


def test_settings_are_real_and_secrets_are_secret(documents: list[dict[str, Any]]) -> None:
    fields = {f"PROMPT_TASKS_{name.upper()}" for name in Settings.model_fields}
    config = _by_kind(documents, "ConfigMap")["prompt-tasks-config"]["data"]
    secret = _by_kind(documents, "Secret")["prompt-tasks-secrets"]["stringData"]
    assert set(config) <= fields
    assert {k for k in secret if k.startswith("PROMPT_TASKS_")} <= fields
    for key in config:
        assert not any(word in key for word in ("SECRET", "PASSWORD", "TOKEN")), key
    settings = Settings()
    minio = _by_kind(documents, "StatefulSet")["minio"]
    env = {e["name"]: e.get("value") for e in minio["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MINIO_NOTIFY_REDIS_KEY_1"] == config.get("PROMPT_TASKS_EVENT_LIST", settings.event_list)
    assert env["MINIO_NOTIFY_REDIS_FORMAT_1"] == "access"
    assert config["PROMPT_TASKS_EVENT_REDIS_URL"].startswith(f"redis://{env['MINIO_NOTIFY_REDIS_ADDRESS_1']}/")


def test_autoscaling_targets_the_compute_workers(documents: list[dict[str, Any]]) -> None:
    (scaled,) = _by_kind(documents, "ScaledObject").values()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "detector"
    assert "prompt_tasks_queue_depth" in scaled["spec"]["triggers"][0]["metadata"]["query"]
