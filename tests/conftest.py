"""Fixtures shared by the suite: private real servers, settings, the Celery app, workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from prompt_tasks.objstore import configure_s3
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import redis_binary
from tests.servers import celery_app_for, missing, private_servers, test_settings

pytest_plugins = ["tests.simcam_fixtures"]


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Settings of a private Redis and S3 gateway shared by the whole session."""
    try:
        redis_binary()
    except FileNotFoundError as exc:
        missing(str(exc))
    settings = test_settings(tmp_path_factory.mktemp("stack"))
    with private_servers(settings) as ready:
        configure_s3(ready)  # this process reads central repos whose files are on these servers
        yield ready


@pytest.fixture
def settings(servers: Settings) -> Iterator[Settings]:
    """Per-test settings on the session's servers, with every Redis database emptied first."""
    client = redis.Redis.from_url(servers.redis_url(0))
    client.flushall()
    client.close()
    yield servers


@pytest.fixture
def rdb(settings: Settings) -> Iterator[redis.Redis]:
    """A client of the events/ledger Redis (strings decoded)."""
    client = redis.Redis.from_url(settings.events_redis, decode_responses=True)
    yield client
    client.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path


@pytest.fixture
def celery_app(settings: Settings) -> Iterator[Celery]:
    """A Celery app on the private servers with every task module of the fleet registered."""
    with celery_app_for(settings) as app:
        yield app
