"""Security basics: the fleet speaks JSON only; a pickled message never runs."""

from __future__ import annotations

import pytest
from celery import Celery
from celery.contrib.testing.worker import start_worker
from celery.exceptions import TimeoutError as ResultTimeout

from prompt_tasks.celery import celery_config
from prompt_tasks.settings import Settings


def test_json_only_configuration() -> None:
    conf = celery_config(Settings())
    assert conf["accept_content"] == ["json"]
    assert conf["result_accept_content"] == ["json"]
    assert conf["task_serializer"] == conf["result_serializer"] == conf["event_serializer"] == "json"


def test_pickle_message_is_refused(celery_app: Celery) -> None:
    with start_worker(celery_app, pool="solo", queues=["security"], perform_ping_check=False):
        pickled = celery_app.send_task("celery.ping", queue="security", serializer="pickle")
        plain = celery_app.send_task("celery.ping", queue="security")
        assert plain.get(timeout=30) == "pong"
        with pytest.raises(ResultTimeout):
            pickled.get(timeout=2)
        assert not pickled.ready()
