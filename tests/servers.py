"""Private real servers for the tests: a Redis and the S3 gateway on free loopback ports.

They are started from a temporary directory and stopped by the pid we recorded; nothing here
talks to services that happen to run on the machine.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from celery import Celery

from prompt_tasks.objstore import wait_live
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import (
    ensure_bucket_ready,
    free_port,
    start_redis,
    start_s3,
    wait_redis,
)


@contextmanager
def celery_app_for(settings: Settings) -> Iterator[Celery]:
    """A Celery app on ``settings`` with every task module of the fleet registered.

    Tasks are ``shared_task``s, so they bind to this app as to the production one.
    """
    from prompt_tasks.celery import TASK_MODULES, create_app
    from prompt_tasks.context import drop_context

    for module in TASK_MODULES:
        importlib.import_module(module)
    app = create_app(settings)
    app.loader.import_module("celery.contrib.testing.tasks")  # registers celery.ping
    app.set_current()
    try:
        yield app
    finally:
        drop_context(app, close=True)
        app.close()


@contextmanager
def postgres_schema(prefix: str) -> Iterator[tuple[str, str]]:
    """``(url, schema)``: a fresh schema on the test PostgreSQL server, dropped afterwards.

    The server comes from ``PROMPT_TASKS_TEST_POSTGRES_URL``; missing or unreachable, the test
    is skipped on a developer's machine and fails under CI.
    """
    import uuid

    import sqlalchemy

    from prompt_tasks.instruments.simcam.central import database_url

    raw = os.environ.get("PROMPT_TASKS_TEST_POSTGRES_URL")
    if not raw:
        missing("PROMPT_TASKS_TEST_POSTGRES_URL is not set")
    url = database_url(str(raw))
    schema = f"{prefix}_{uuid.uuid4().hex[:10]}"
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text(f'CREATE SCHEMA "{schema}"'))
    except sqlalchemy.exc.OperationalError as exc:
        engine.dispose()
        missing(f"PostgreSQL at PROMPT_TASKS_TEST_POSTGRES_URL is not reachable: {exc}")
    try:
        yield url, schema
    finally:
        with engine.begin() as conn:
            for name in (schema, f"{schema}_apdb"):  # an APDB may be given the companion schema
                conn.execute(sqlalchemy.text(f'DROP SCHEMA IF EXISTS "{name}" CASCADE'))
        engine.dispose()


def missing(reason: str) -> None:
    """Skip on a developer's machine; fail under CI (``CI`` set), where nothing may be missing."""
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_settings(state_dir: Path, **overrides: object) -> Settings:
    """Settings for a private stack under ``state_dir`` with fresh free ports."""
    values: dict[str, object] = {
        "state_dir": state_dir,
        "redis_port": free_port(),
        "s3_port": free_port(),
        "flower_port": free_port(),
        "intake_port": free_port(),
        "metrics_port": free_port(),
        "redis_aof": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def private_servers(settings: Settings, s3: bool = True) -> Iterator[Settings]:
    """Run a private Redis (and S3 gateway, with the raw bucket and its notification)."""
    run_dir = settings.state_path / "run"
    redis_proc = start_redis(settings, settings.state_path / "redis", run_dir)
    s3_proc = None
    try:
        if not wait_redis(settings):
            pytest.fail(f"private redis did not start:\n{redis_proc.tail()}")
        if s3:
            s3_proc = start_s3(settings, settings.state_path / "s3", run_dir)
            if not wait_live(settings, timeout=30):
                pytest.fail(f"private S3 gateway did not start:\n{s3_proc.tail()}")
            ensure_bucket_ready(settings)
        yield settings
    finally:
        if s3_proc is not None:
            s3_proc.stop()
        redis_proc.stop()
