"""One suite, both brokers: chords, waits and deadlines on Redis and RabbitMQ; crash redelivery on RabbitMQ.

The result backend stays Redis. RabbitMQ is the machine's server on 127.0.0.1:5672; each test
run gets its own virtual host (created and deleted with ``rabbitmqctl``), so nothing is shared
with other users of that server. Without RabbitMQ the RabbitMQ cases skip locally and fail
under CI. The stage payload is ``noop`` (routing is under test, not the Butler work).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.objectkeys import SnapKey, format_key
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.arrivals import record_arrival
from prompt_tasks.store.keys import fault_key
from prompt_tasks.store.metrics import read_counters
from tests.fleetkit import Fleet, make_visit, node_alive, summary_of, wait_until
from tests.servers import missing

INSTRUMENT = "SimCam"
DETECTORS = list(range(6))
RABBIT = ("127.0.0.1", 5672)

pytestmark = pytest.mark.slow


def _rabbit_listening() -> bool:
    try:
        with socket.create_connection(RABBIT, timeout=1):
            return True
    except OSError:
        return False


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def rabbit_vhost() -> Iterator[str]:
    """A private virtual host on the machine's RabbitMQ, removed afterwards."""
    if not _rabbit_listening():
        missing(f"RabbitMQ is not listening on {RABBIT[0]}:{RABBIT[1]}")
    if shutil.which("rabbitmqctl") is None:
        missing("rabbitmqctl is not installed (needed to create a private vhost)")
    vhost = f"prompt-tasks-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        _ctl("add_vhost", vhost)
        _ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    except (subprocess.SubprocessError, OSError) as exc:
        missing(f"cannot create a RabbitMQ vhost: {exc}")
    try:
        yield vhost
    finally:
        subprocess.run(["rabbitmqctl", "delete_vhost", vhost], check=False, capture_output=True, timeout=60)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_settings(request: pytest.FixtureRequest, settings: Settings) -> Settings:
    update: dict[str, object] = {"payload": "noop", "deadline_margin_s": 3.0, "wait_margin_s": 20.0,
                                 "ledger_ttl_s": 600}
    if request.param == "rabbitmq":
        vhost = request.getfixturevalue("rabbit_vhost")
        update["broker_url"] = f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/{vhost}"
    return settings.model_copy(update=update)


@pytest.fixture
def app(broker_settings: Settings) -> Iterator[Celery]:
    from prompt_tasks.celery import create_app
    from prompt_tasks.context import drop_context

    celery_app = create_app(broker_settings)
    yield celery_app
    drop_context(celery_app, close=True)
    celery_app.close()


@pytest.fixture
def worker(app: Celery) -> Iterator[Celery]:
    queues = ["wait", "summary", "default"] + [detector_queue(INSTRUMENT, d) for d in DETECTORS]
    with start_worker(app, pool="threads", concurrency=8, queues=queues, perform_ping_check=False,
                      hostname="detector-5@brokers", shutdown_timeout=30):
        yield app


def _arrived(rdb: redis.Redis, visit: NextVisit, detectors: list[int]) -> None:
    for det in detectors:
        record_arrival(rdb, SnapKey(INSTRUMENT, det, visit.groupId, 0, "raw.fits"),
                       format_key(INSTRUMENT, det, visit.groupId, 0), 80, "")


def test_chord_completes_with_a_failed_detector(worker: Celery, broker_settings: Settings, rdb: redis.Redis) -> None:
    # the snaps are all there, so the chord ends at once; the deadline (the visit's end, 30 s
    # away, plus the margin) must not race it on a loaded machine
    visit = make_visit(INSTRUMENT, nimages=1, duration=30.0)
    _arrived(rdb, visit, DETECTORS)
    rdb.set(fault_key(INSTRUMENT, visit.groupId, 2, "ingest"), "bad raw", ex=120)
    announce(worker, broker_settings, visit, detectors=DETECTORS)
    summary = wait_until(lambda: summary_of(rdb, visit), 60, "summary")
    assert summary["by"] == "chord"
    assert summary["counts"]["ok"] == len(DETECTORS) - 1 and summary["counts"]["failed"] == 1
    assert summary["detectors"]["2"]["stage"] == "ingest"


def test_wait_is_woken_by_a_late_snap(worker: Celery, broker_settings: Settings, rdb: redis.Redis) -> None:
    visit = make_visit(INSTRUMENT, nimages=1, duration=5.0)
    announce(worker, broker_settings, visit, detectors=[0, 1])
    wait_until(lambda: all(
        "wait.start" in rec.times for rec in ledger.read_visit(rdb, INSTRUMENT, visit.groupId).detectors.values()),
        60, "both waiting")
    _arrived(rdb, visit, [0, 1])
    summary = wait_until(lambda: summary_of(rdb, visit), 60, "summary")
    assert summary["counts"]["ok"] == 2


def test_deadline_summarizes_a_chord_that_cannot_complete(worker: Celery, broker_settings: Settings,
                                                          rdb: redis.Redis) -> None:
    visit = make_visit(INSTRUMENT, nimages=1)
    _arrived(rdb, visit, [0, 99])
    announce(worker, broker_settings, visit, detectors=[0, 99])  # nobody consumes detector 99's queue
    summary = wait_until(lambda: summary_of(rdb, visit), 60, "summary by the deadline")
    assert summary["by"] == "deadline"
    assert summary["detectors"]["0"]["outcome"] == "ok"
    assert summary["detectors"]["99"]["code"] == ledger.DEADLINE_CODE
    with worker.connection_for_write() as conn:  # leave no message behind on the shared broker
        conn.default_channel.queue_purge(detector_queue(INSTRUMENT, 99))


@pytest.fixture
def rabbit_app(settings: Settings, rabbit_vhost: str) -> Iterator[tuple[Settings, Celery]]:
    from prompt_tasks.celery import create_app

    rabbit = settings.model_copy(update={
        "payload": "noop", "ledger_ttl_s": 600, "deadline_margin_s": 60.0,
        "broker_url": f"amqp://guest:guest@{RABBIT[0]}:{RABBIT[1]}/{rabbit_vhost}",
    })
    celery_app = create_app(rabbit)
    yield rabbit, celery_app
    celery_app.close()


def test_crashed_worker_task_is_redelivered_at_once(rabbit_app: tuple[Settings, Celery], rdb: redis.Redis,
                                                    tmp_path: Path) -> None:
    """A compute worker SIGKILLed mid-run; RabbitMQ hands its task to the replacement at once (no
    visibility timeout; the same on Redis is ``tests/test_faults.py``)."""
    settings, app = rabbit_app
    fleet = Fleet(settings, tmp_path)
    queues = [detector_queue(INSTRUMENT, d) for d in (0, 1)]
    try:
        fleet.aux()
        fleet.detector(1, queues=queues)
        wait_until(lambda: node_alive(app, "aux@") and node_alive(app, "detector-1@"), 120, "workers up")
        visit = make_visit(INSTRUMENT, nimages=1)
        _arrived(rdb, visit, [0, 1])
        rdb.set(fault_key(INSTRUMENT, visit.groupId, 0, "run"), "sleep:3", ex=300)
        announce(app, settings, visit, detectors=[0, 1])
        wait_until(lambda: "run.start" in ledger.read_visit(rdb, INSTRUMENT, visit.groupId).detectors[0].times,
                   60, "detector 0 running")
        fleet.kill("detector-1")
        fleet.detector(2, queues=queues)
        summary = wait_until(lambda: summary_of(rdb, visit), 90, "summary")
        assert summary["counts"]["ok"] == 2
        record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
        assert record is not None and record.detectors[0].workers["run"].startswith("detector-2@")
        assert read_counters(rdb, "redeliveries").get("stage=run", 0) >= 1
    finally:
        fleet.stop_all()
