"""The container suite: the project's image against real Redis and MinIO containers.

It needs a Docker daemon; where ``docker info`` fails (these build machines) every test here
is skipped with that reason, CI or not. The containers are started with the ``docker`` CLI,
the way pytest-celery's container fixtures do it; pytest-celery itself is deliberately not a
dependency: installed, its plugin registers itself for every test and replaces the classic
``celery_app``/``celery_worker`` fixtures of the main suite, which runs in-process workers
against private real servers instead.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-09-07T16-13-09Z"
REDIS_IMAGE = "redis:7.4.1"
IMAGE = "prompt-tasks:test"

def docker_unavailable() -> str | None:
    """Why the suite cannot run here, or None when a Docker daemon answers."""
    if shutil.which("docker") is None:
        return "no docker CLI on this machine (the container suite needs a Docker daemon)"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        return f"`docker info` failed, no Docker daemon: {probe.stderr.strip()[:200]}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    ours = [item for item in items if here in Path(str(item.fspath)).parents]
    if not ours:
        return
    reason = docker_unavailable()
    for item in ours:
        item.add_marker(pytest.mark.docker)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def docker(*args: str, timeout: float = 600) -> str:
    out = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=True)
    return out.stdout.strip()


@dataclass(frozen=True)
class Fleet:
    """The containers of one test session on their own network."""

    network: str
    redis_url: str
    s3_endpoint: str

    def env(self) -> dict[str, str]:
        """PROMPT_TASKS_* settings of a process inside the network."""
        return {
            "PROMPT_TASKS_BROKER_URL": f"{self.redis_url}/0",
            "PROMPT_TASKS_RESULT_BACKEND": f"{self.redis_url}/1",
            "PROMPT_TASKS_EVENT_REDIS_URL": f"{self.redis_url}/0",
            "PROMPT_TASKS_S3_ENDPOINT": self.s3_endpoint,
            "PROMPT_TASKS_S3_ACCESS_KEY": "prompt-tasks",
            "PROMPT_TASKS_S3_SECRET_KEY": "prompt-tasks-secret",
        }

    def run(self, name: str, *command: str, image: str = IMAGE) -> str:
        """Start a detached container of ``image`` in the network."""
        env = [arg for key, value in self.env().items() for arg in ("-e", f"{key}={value}")]
        return docker("run", "-d", "--rm", "--name", name, "--hostname", name,
                      "--network", self.network, *env, image, *command)

    def exec(self, container: str, *command: str) -> str:
        return docker("exec", container, *command, timeout=120)


def _wait(check: Callable[[], object], timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except subprocess.CalledProcessError:
            pass
        time.sleep(1)
    raise TimeoutError("container not ready")


@pytest.fixture(scope="session")
def image() -> str:
    docker("build", "-t", IMAGE, str(ROOT), timeout=1800)
    return IMAGE


@pytest.fixture(scope="session")
def fleet(image: str) -> Iterator[Fleet]:
    tag = uuid.uuid4().hex[:8]
    network = f"prompt-tasks-test-{tag}"
    docker("network", "create", network)
    started: list[str] = []
    try:
        redis_name, minio_name = f"redis-{tag}", f"minio-{tag}"
        docker("run", "-d", "--rm", "--name", redis_name, "--network", network, REDIS_IMAGE,
               "redis-server", "--appendonly", "yes")
        started.append(redis_name)
        _wait(lambda: docker("exec", redis_name, "redis-cli", "ping") == "PONG")
        docker("run", "-d", "--rm", "--name", minio_name, "--network", network,
               "-e", "MINIO_ROOT_USER=prompt-tasks", "-e", "MINIO_ROOT_PASSWORD=prompt-tasks-secret",
               "-e", "MINIO_NOTIFY_REDIS_ENABLE_1=on", "-e", f"MINIO_NOTIFY_REDIS_ADDRESS_1={redis_name}:6379",
               "-e", "MINIO_NOTIFY_REDIS_KEY_1=bucketevents", "-e", "MINIO_NOTIFY_REDIS_FORMAT_1=access",
               MINIO_IMAGE, "server", "/data")
        started.append(minio_name)
        _wait(lambda: docker("exec", minio_name, "mc", "ready", "local") is not None)
        yield Fleet(network, f"redis://{redis_name}:6379", f"http://{minio_name}:9000")
    finally:
        for name in reversed(started):
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        subprocess.run(["docker", "network", "rm", network], capture_output=True, check=False)
