"""Retry policy: which errors are transient, the backoff, the redelivery cap, through a real worker."""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from celery import Celery, Task, shared_task
from celery.contrib.testing.worker import start_worker

from prompt_tasks.celery import broker_transport_options, celery_config
from prompt_tasks.errors import BadRaw, PermanentError, RetryLater
from prompt_tasks.flow import retry
from prompt_tasks.flow.policy import POLICIES, StagePolicy, backoff, retry_countdown
from prompt_tasks.flow.stage import StageTask
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import free_port
from prompt_tasks.store.keys import delivery_key, fault_key
from prompt_tasks.store.metrics import read_counters

QUEUE = "retry-tests"
INSTRUMENT = "RetryCam"


def _no_retry_client(port: int) -> redis.Redis:
    """A client that fails at once (redis-py otherwise retries a refused connection with backoff)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


@shared_task(bind=True, base=StageTask, name="tests.retry.flaky_stage", stage="ingest", chained=False)
def flaky_stage(self: Task, visit: dict[str, Any], detector: int, dead_port: int) -> StageStatus:
    """Fails with a real Redis connection error on its first attempt, then succeeds."""
    if self.request.retries == 0:
        _no_retry_client(dead_port).ping()
    return StageStatus("ingest", Outcome.OK, visit["instrument"], visit["groupId"], detector)


# --------------------------------------------------------------------------- classification


def _real_redis_error() -> Exception:
    try:
        _no_retry_client(free_port()).ping()
    except redis.ConnectionError as exc:
        return exc
    raise AssertionError("nothing listens there, yet it answered")


def _real_s3_error() -> Exception:
    from minio import Minio

    client = Minio(f"127.0.0.1:{free_port()}", access_key="a", secret_key="b", secure=False)
    client._http.connection_pool_kw["retries"] = 0  # type: ignore[attr-defined]
    try:
        client.bucket_exists("raws")
    except Exception as exc:  # noqa: BLE001 - whatever urllib3 raises is what we classify
        return exc
    raise AssertionError("nothing listens there, yet it answered")


def _real_registry_error() -> Exception:
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"postgresql+psycopg2://u:p@127.0.0.1:{free_port()}/db",
                                      connect_args={"connect_timeout": 2})
    try:
        engine.connect()
    except sqlalchemy.exc.OperationalError as exc:
        return exc
    finally:
        engine.dispose()
    raise AssertionError("nothing listens there, yet it answered")


def test_connection_errors_of_every_client_are_transient() -> None:
    from kombu.exceptions import OperationalError
    from minio.error import ServerError

    for exc in (_real_redis_error(), _real_s3_error(), _real_registry_error(),
                OperationalError("broker gone"), ServerError("slow down", 503), TimeoutError("t"),
                RetryLater("later")):
        assert retry.is_transient(exc), repr(exc)
        assert isinstance(retry.as_retry(exc), RetryLater)


def test_a_wrapped_transient_error_is_transient() -> None:
    try:
        try:
            raise _real_redis_error()
        except redis.ConnectionError as inner:
            raise RuntimeError("preload failed") from inner
    except RuntimeError as outer:
        assert retry.is_transient(outer)


def test_permanent_errors_are_not_retried() -> None:
    from minio.error import ServerError

    for exc in (PermanentError("bad"), BadRaw("truncated"), ValueError("x"), KeyError("k"),
                ServerError("not found", 404)):
        assert not retry.is_transient(exc), repr(exc)
        assert retry.as_retry(exc) is None
    try:  # a permanent error caused by a transient one is still permanent
        raise BadRaw("header unreadable") from _real_redis_error()
    except BadRaw as exc:
        assert not retry.is_transient(exc)


def test_backoff_grows_is_jittered_and_capped() -> None:
    policy = StagePolicy(soft_time_limit=1.0, time_limit=2.0, max_retries=3, backoff_base_s=1.0,
                         backoff_cap_s=10.0, jitter=(0.8, 1.2))
    rng = random.Random(8)
    for attempt, base in enumerate((1.0, 2.0, 4.0, 8.0)):
        for _ in range(50):
            assert 0.8 * base <= backoff(attempt, policy, rng=rng) <= min(10.0, 1.2 * base)
    assert all(backoff(20, policy, rng=rng) <= 10.0 for _ in range(50))
    assert backoff(0, policy, hint=0.05, rng=rng) <= 0.06
    for stage in POLICIES:
        assert retry_countdown(stage, 0) > 0


def test_delivery_counter(rdb: redis.Redis) -> None:
    assert [retry.count_delivery(rdb, "t1", 0) for _ in range(3)] == [1, 2, 3]
    assert retry.count_delivery(rdb, "t1", 1) == 1  # a retry is a new attempt
    assert 0 < rdb.ttl(delivery_key("t1", 0)) <= 24 * 3600
    assert retry.redelivered_reason(4) == "redelivered 3 times (worker crashed?)"


def test_visibility_timeout_covers_the_longest_stage_and_restore_is_tuned(settings: Settings) -> None:
    assert Settings().visibility_timeout > max(policy.time_limit for policy in POLICIES.values())
    options = broker_transport_options(settings)
    assert options["visibility_timeout"] == settings.visibility_timeout
    assert options["unacked_restore_interval"] == settings.restore_interval_s
    assert options["unacked_restore_throttle"] == 1
    config = celery_config(settings)
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["broker_transport"] == "prompt_tasks.fleet.brokers:RedisTransport"
    rabbit = settings.model_copy(update={"broker_url": "amqp://guest:guest@127.0.0.1:5672//"})
    assert broker_transport_options(rabbit) == {}
    assert celery_config(rabbit)["broker_transport"] is None


# --------------------------------------------------------------------------- a real worker


@pytest.fixture
def worker(celery_app: Celery) -> Iterator[Celery]:
    with start_worker(celery_app, pool="threads", concurrency=4, queues=[QUEUE], perform_ping_check=False,
                      hostname="detector-9@retry", shutdown_timeout=30):
        yield celery_app


def _visit(group: str) -> dict[str, Any]:
    return {"instrument": INSTRUMENT, "groupId": group, "startTime": tai_now(), "nimages": 1}


def _send(app: Celery, name: str, **kwargs: Any) -> dict[str, Any]:
    return app.signature(name, kwargs=kwargs, queue=QUEUE).apply_async().get(timeout=60)


def test_transient_error_is_retried_then_succeeds(worker: Celery, rdb: redis.Redis) -> None:
    status = _send(worker, "tests.retry.flaky_stage", visit=_visit("flaky"), detector=1, dead_port=free_port())
    assert status["outcome"] == "ok", status
    assert read_counters(rdb, "retries") == {"stage=ingest": 1}
    assert read_counters(rdb, "outcomes") == {"outcome=ok,stage=ingest": 1}


def test_permanent_error_fails_at_once(worker: Celery, rdb: redis.Redis) -> None:
    rdb.set(fault_key(INSTRUMENT, "bad", 1, "ingest"), "corrupt raw", ex=60)
    status = _send(worker, "prompt_tasks.ingest", status={"stage": "wait", "outcome": "ok", "instrument": INSTRUMENT,
                   "group": "bad", "detector": 1}, visit=_visit("bad"), detector=1)
    assert (status["outcome"], status["code"]) == ("failed", "permanent")
    assert "corrupt raw" in status["reason"]
    assert read_counters(rdb, "retries") == {}
    assert read_counters(rdb, "failures") == {"code=permanent,stage=ingest": 1}


def test_persisting_transient_error_gives_up(worker: Celery, rdb: redis.Redis) -> None:
    rdb.set(fault_key(INSTRUMENT, "down", 1, "prepare"), "retry", ex=60)
    status = _send(worker, "prompt_tasks.prepare_repo", visit=_visit("down"), detector=1)
    assert status["outcome"] == "failed"
    assert status["reason"].startswith(f"gave up after {POLICIES['prepare'].max_retries} retries")
    assert read_counters(rdb, "retries") == {"stage=prepare": POLICIES["prepare"].max_retries}


def test_redelivered_too_often_is_failed_not_run(worker: Celery, rdb: redis.Redis, settings: Settings) -> None:
    task_id = "crashes-its-worker"
    for _ in range(settings.max_deliveries):  # as if it had killed its worker that many times
        retry.count_delivery(rdb, task_id, 0)
    rdb.set(fault_key(INSTRUMENT, "crashy", 1, "prepare"), "crash", ex=60)  # would run otherwise
    result = worker.signature("prompt_tasks.prepare_repo", kwargs={"visit": _visit("crashy"), "detector": 1},
                              queue=QUEUE).apply_async(task_id=task_id)
    status = result.get(timeout=60)
    assert (status["outcome"], status["code"]) == ("failed", retry.REDELIVERED_CODE)
    assert f"redelivered {settings.max_deliveries} times (worker crashed?)" in status["reason"]
    assert read_counters(rdb, "redeliveries") == {"stage=prepare": 1}


def _events(app: Celery, group: str, detector: int, keep: Callable[[dict[str, Any]], bool],
            enough: Callable[[list[dict[str, Any]]], bool], wait: float) -> list[dict[str, Any]]:
    """The events ``keep`` picks while one ``prepare_repo`` call runs on ``app``'s worker, until
    ``enough`` of them or ``wait`` seconds."""
    import threading

    got: list[dict[str, Any]] = []
    ready = threading.Event()
    deadline = time.monotonic() + wait

    def listen() -> None:
        with app.connection_for_read() as conn:
            def on_event(event: dict[str, Any]) -> None:
                if keep(event):
                    got.append(event)
                receiver.should_stop = enough(got) or time.monotonic() > deadline  # heartbeats call here too

            receiver = app.events.Receiver(conn, handlers={"*": on_event})
            ready.set()
            with contextlib.suppress(TimeoutError):  # no event at all for ``wait`` seconds
                receiver.capture(limit=None, timeout=wait, wakeup=False)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()
    ready.wait(10)
    time.sleep(1.0)  # the receiver's queue is bound once capture starts
    _send(app, "prompt_tasks.prepare_repo", visit=_visit(group), detector=detector)
    thread.join(wait + 20)
    return got


def _stage_events(app: Celery, group: str, detector: int, wait: float = 8.0) -> list[dict[str, Any]]:
    """The ``task-stage`` events of one ``prepare_repo`` call (a start and an end)."""
    return _events(app, group, detector, lambda e: e.get("type") == "task-stage", lambda got: len(got) >= 2, wait)


def _task_events(app: Celery, group: str, wait: float = 5.0) -> list[str]:
    """Types of Celery's own task events of one ``prepare_repo`` call, up to its ``task-succeeded``."""
    got = _events(app, group, 5, lambda e: e.get("type", "").startswith("task-") and e["type"] != "task-stage",
                  lambda got: any(e["type"] == "task-succeeded" for e in got), wait)
    return [e["type"] for e in got]


def test_stage_progress_events(settings: Settings) -> None:
    """With task events on from the start, each stage sends ``task-stage`` events (start, end)
    that Flower and monitors can follow."""
    from tests.servers import celery_app_for

    with celery_app_for(settings.model_copy(update={"task_events": True})) as app:
        assert app.conf.worker_send_task_events
        with start_worker(app, pool="threads", concurrency=4, queues=[QUEUE], perform_ping_check=False,
                          hostname="detector-9@events", shutdown_timeout=30):
            got = _stage_events(app, "events", 3)
    assert [(e["phase"], e["stage"], e["detector"]) for e in got] == [("start", "prepare", 3), ("end", "prepare", 3)]
    assert got[1]["outcome"] in ("ok", "failed") and got[1]["group"] == "events"


def test_no_stage_events_unless_asked_for(celery_app: Celery) -> None:
    """By default a worker publishes no task events until a monitor enables them, as Flower does
    every few seconds while it runs (``enable_events``): then Celery's own task events flow."""
    assert not celery_app.conf.worker_send_task_events
    # with its heartbeat, as the fleet's workers run: their event dispatcher is live, task events off
    with start_worker(celery_app, pool="threads", concurrency=4, queues=[QUEUE], perform_ping_check=False,
                      hostname="detector-9@quiet", shutdown_timeout=30, without_heartbeat=False):
        assert _stage_events(celery_app, "quiet", 4, wait=3.0) == []
        assert _task_events(celery_app, "quiet", wait=3.0) == []
        assert celery_app.control.enable_events(reply=True, timeout=5)  # what Flower sends
        assert "task-succeeded" in _task_events(celery_app, "watched")


