"""The project's image as the fleet runs it: every worker role answers, bucket events flow."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.docker.conftest import Fleet, docker
from workers import CELERY_ROLES

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def workers(fleet: Fleet) -> Iterator[list[str]]:
    names = []
    try:
        for role in CELERY_ROLES:
            name = f"{role}-{uuid.uuid4().hex[:6]}"
            fleet.run(name, "prompt-tasks", "worker", role)
            names.append(name)
        yield names
    finally:
        for name in names:
            docker("rm", "-f", name)


def test_every_worker_role_answers_ping(fleet: Fleet, workers: list[str]) -> None:
    probe = f"probe-{uuid.uuid4().hex[:6]}"
    fleet.run(probe, "sleep", "600")
    try:
        deadline = time.monotonic() + 120
        nodes: set[str] = set()
        while time.monotonic() < deadline and len(nodes) < len(CELERY_ROLES):
            try:
                out = fleet.exec(probe, "celery", "-A", "prompt_tasks", "inspect", "ping", "--json", "--timeout=5")
            except subprocess.CalledProcessError:  # no node replied yet
                continue
            nodes = {name.split("@")[0].split("-")[0] for name in json.loads(out.splitlines()[-1])}
        assert nodes == set(CELERY_ROLES)
    finally:
        docker("rm", "-f", probe)


def test_put_into_minio_reaches_the_event_list(fleet: Fleet, image: str) -> None:
    script = (
        "import io, redis\n"
        "from prompt_tasks.settings import Settings\n"
        "from prompt_tasks.objstore import ensure_bucket, make_client\n"
        "s = Settings(); c = make_client(s); ensure_bucket(c, s)\n"
        "c.put_object(s.raw_bucket, 'SimCam/1/2026-11-24T01:00:00.000/0/raw.fits', io.BytesIO(b'x'), 1)\n"
        "item = redis.Redis.from_url(s.events_redis).blpop([s.event_list], timeout=60)\n"
        "assert item is not None\n"
        "print(item[1].decode())\n"
    )
    name = f"put-{uuid.uuid4().hex[:6]}"
    fleet.run(name, "sleep", "600", image=image)
    try:
        body = json.loads(fleet.exec(name, "python", "-c", script).splitlines()[-1])
        assert body[0]["Event"][0]["eventName"] == "s3:ObjectCreated:Put"
    finally:
        docker("rm", "-f", name)
