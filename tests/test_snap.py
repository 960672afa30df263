"""wait_for_snaps against the real Redis, the real S3 gateway and a running dispatcher."""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from prompt_tasks.context import Context
from prompt_tasks.flow.dispatcher import Dispatcher
from prompt_tasks.flow.snap import WaitPlan, decide, wait_for_snaps
from prompt_tasks.model.objectkeys import format_key
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.objstore import ensure_bucket
from prompt_tasks.settings import Settings
from prompt_tasks.store.arrivals import Arrival, abort_visit, signal_end


def _group() -> str:
    n = uuid.uuid4().int
    return f"2026-11-24T02:{n % 60:02d}:{n // 60 % 60:02d}.{n // 3600 % 10**6:06d}"


@pytest.fixture
def ctx(settings: Settings) -> Iterator[Context]:
    context = Context(settings)
    yield context
    context.close()


@pytest.fixture
def dispatching(ctx: Context) -> Iterator[None]:
    """A dispatcher running in a thread for the duration of the test."""
    from prompt_tasks.flow.dispatcher import dispatcher_for

    dispatcher: Dispatcher = dispatcher_for(ctx)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.1), daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(10)


class Waiter(threading.Thread):
    """Runs one wait_for_snaps call in a thread and keeps its status."""

    def __init__(self, call: Callable[[], StageStatus]) -> None:
        super().__init__(daemon=True)
        self.call = call
        self.status: StageStatus | None = None

    def run(self) -> None:
        self.status = self.call()

    def result(self, timeout: float = 30.0) -> StageStatus:
        self.join(timeout)
        assert self.status is not None, "wait did not return"
        return self.status


def _put(ctx: Context, key: str, data: bytes = b"raw") -> None:
    ctx.s3.put_object(ctx.settings.raw_bucket, key, io.BytesIO(data), len(data))


def _start_wait(ctx: Context, group: str, detector: int, nimages: int, **kwargs: object) -> Waiter:
    kwargs.setdefault("timeout", 20.0)
    waiter = Waiter(lambda: wait_for_snaps(ctx, "SimCam", group, detector, nimages,
                                           time.time() + 1, **kwargs))  # type: ignore[arg-type]
    waiter.start()
    time.sleep(0.2)  # let it block on the wake key
    return waiter


def test_a_put_wakes_the_wait(ctx: Context, dispatching: None) -> None:
    group = _group()
    waiter = _start_wait(ctx, group, 4, 1)
    assert waiter.status is None
    key = format_key("SimCam", 4, group, 0)
    _put(ctx, key)
    status = waiter.result()
    assert status.outcome is Outcome.OK and status.stage == "wait"
    assert status.data["snaps"]["0"]["key"] == key
    assert status.data["wakeups"] >= 1 and status.data["listed"] == []
    assert status.data["began"] <= status.data["snaps"]["0"]["t"] <= status.data["ended"]
    assert StageStatus.from_dict(status.to_dict()) == status


def test_an_event_before_the_wait_still_counts(ctx: Context, dispatching: None) -> None:
    group = _group()
    _put(ctx, format_key("SimCam", 5, group, 0))
    deadline = time.monotonic() + 10
    while not ctx.redis.exists(f"arrivals:SimCam:{group}:5") and time.monotonic() < deadline:
        time.sleep(0.01)
    status = wait_for_snaps(ctx, "SimCam", group, 5, 1, time.time(), timeout=5)
    assert status.outcome is Outcome.OK and status.data["wakeups"] == 0


def test_two_snaps(ctx: Context, dispatching: None) -> None:
    group = _group()
    waiter = _start_wait(ctx, group, 6, 2)
    _put(ctx, format_key("SimCam", 6, group, 0))
    _put(ctx, format_key("SimCam", 6, group, 0))  # the same snap again: still one
    time.sleep(0.2)
    assert waiter.status is None
    _put(ctx, format_key("SimCam", 6, group, 1))
    assert sorted(waiter.result().data["snaps"]) == ["0", "1"]


def test_unknown_nimages_ends_with_the_end_signal(ctx: Context, dispatching: None) -> None:
    group = _group()
    waiter = _start_wait(ctx, group, 7, 0, quiet_period=60.0)
    _put(ctx, format_key("SimCam", 7, group, 0))
    time.sleep(0.3)
    assert waiter.status is None
    signal_end(ctx.redis, "SimCam", group)
    status = waiter.result()
    assert status.outcome is Outcome.OK and list(status.data["snaps"]) == ["0"]


def test_unknown_nimages_ends_after_the_quiet_period(ctx: Context, dispatching: None) -> None:
    group = _group()
    waiter = _start_wait(ctx, group, 8, 0, quiet_period=0.5)
    _put(ctx, format_key("SimCam", 8, group, 0))
    status = waiter.result()
    assert status.outcome is Outcome.OK and list(status.data["snaps"]) == ["0"]


def test_abort_ends_the_wait(ctx: Context, dispatching: None) -> None:
    group = _group()
    waiters = [_start_wait(ctx, group, detector, 1, poll_s=30.0) for detector in (1, 2)]
    abort_visit(ctx.redis, "SimCam", group, "dome closed")
    for waiter in waiters:
        status = waiter.result(timeout=5)
        assert status.outcome is Outcome.ABORTED and "dome closed" in status.reason
    assert wait_for_snaps(ctx, "SimCam", group, 3, 1, time.time()).outcome is Outcome.ABORTED


def test_nothing_arrives_times_out(ctx: Context) -> None:
    group = _group()
    status = wait_for_snaps(ctx, "SimCam", group, 9, 1, time.time(), timeout=0.3)
    assert status.outcome is Outcome.TIMED_OUT and status.code == "timed_out"
    assert status.data["snaps"] == {} and status.data["listed"] == []


def test_a_block_longer_than_redis_py_default_read_timeout_is_no_error(ctx: Context) -> None:
    """A 6 s slice on the wake key: redis-py's default read timeout (5 s) would end it in a
    timeout error, and every wait would be retried (a task resent, ~2 s late) instead."""
    started = time.monotonic()
    status = wait_for_snaps(ctx, "SimCam", _group(), 9, 1, time.time(), timeout=6.5, poll_s=6.0)
    assert status.outcome is Outcome.TIMED_OUT and status.code == "timed_out"
    assert time.monotonic() - started >= 6.0


def test_more_waits_at_once_than_redis_py_default_pool_all_end_normally(ctx: Context) -> None:
    """150 waits blocked on their wake keys at once (a gevent wait worker runs up to 500):
    redis-py's default pool holds 100 connections, and the 101st wait failed with "Too many
    connections" (retried, then given up: the detector-visit lost)."""
    from concurrent.futures import ThreadPoolExecutor

    group = _group()
    with ThreadPoolExecutor(150) as pool:
        statuses = list(pool.map(
            lambda det: wait_for_snaps(ctx, "SimCam", group, det, 1, time.time(), timeout=1.5, poll_s=1.0),
            range(150)))
    assert {s.outcome for s in statuses} == {Outcome.TIMED_OUT}


def test_default_timeout_is_expected_end_plus_margin(ctx: Context) -> None:
    status = wait_for_snaps(ctx, "SimCam", _group(), 9, 1, time.time() - ctx.settings.wait_margin_s)
    assert status.outcome is Outcome.TIMED_OUT


def test_lost_notification_is_found_by_the_listing(ctx: Context, dispatching: None) -> None:
    group = _group()
    key = format_key("SimCam", 10, group, 0)
    ensure_bucket(ctx.s3, ctx.settings, notify=False)
    try:
        _put(ctx, key, b"0123456789")
        _put(ctx, format_key("SimCam", 11, group, 0))  # another detector: not ours
        time.sleep(0.3)
        assert not ctx.redis.exists(f"arrivals:SimCam:{group}:10")  # no notification came
        status = wait_for_snaps(ctx, "SimCam", group, 10, 1, time.time(), timeout=0.5)
    finally:
        ensure_bucket(ctx.s3, ctx.settings, notify=True)
    assert status.outcome is Outcome.OK
    assert status.data["listed"] == [key]
    assert status.data["snaps"]["0"]["key"] == key and status.data["snaps"]["0"]["size"] == 10


def test_decide_is_pure() -> None:
    plan = WaitPlan(nimages=0, expected_end=100.0, deadline=300.0, quiet_period=10.0)
    one = {0: Arrival(0, "k", 1, "", 95.0)}
    assert decide(plan, {}, ended=True, now=50.0) == (False, 300.0)
    assert decide(plan, one, ended=True, now=50.0) == (True, 50.0)
    assert decide(plan, one, ended=False, now=105.0) == (False, 110.0)
    assert decide(plan, one, ended=False, now=110.0) == (True, 110.0)
    known = WaitPlan(nimages=2, expected_end=100.0, deadline=300.0, quiet_period=10.0)
    assert decide(known, one, ended=True, now=50.0) == (False, 300.0)


def test_wait_task_on_a_real_wait_worker(ctx: Context, dispatching: None, celery_app: object) -> None:
    from celery import Celery
    from celery.contrib.testing.worker import start_worker

    assert isinstance(celery_app, Celery)
    group = _group()
    visit = {"instrument": "SimCam", "groupId": group, "startTime": time.time(), "duration": 5.0, "nimages": 1}
    previous = StageStatus("prepare", Outcome.OK, "SimCam", group, 4).to_dict()
    with start_worker(celery_app, pool="threads", concurrency=4, queues=["wait"], perform_ping_check=False,
                      hostname="wait@snap-test", shutdown_timeout=10):
        result = celery_app.signature("prompt_tasks.wait_for_snap", args=[previous],
                                      kwargs={"visit": visit, "detector": 4}, queue="wait").apply_async()
        time.sleep(0.5)
        assert not result.ready()
        key = format_key("SimCam", 4, group, 0)
        _put(ctx, key)
        status = StageStatus.from_dict(result.get(timeout=30))
    assert status.outcome is Outcome.OK and status.stage == "wait"
    assert status.data["snaps"]["0"]["key"] == key
    assert status.data["worker"] == "wait@snap-test"


def test_listing_resolves_sidecar_keys(ctx: Context) -> None:
    import json

    group = _group()
    key = format_key("LSSTCam", 94, group, 0)
    other = format_key("LSSTCam", 94, _group(), 0)  # same day and detector, another group
    ensure_bucket(ctx.s3, ctx.settings, notify=False)
    try:
        for image, image_group in ((key, group), (other, "another")):
            sidecar = json.dumps({"GROUPID": image_group, "CURINDEX": 1}).encode()
            _put(ctx, image.removesuffix(".fits") + ".json", sidecar)
            _put(ctx, image)
        status = wait_for_snaps(ctx, "LSSTCam", group, 94, 1, time.time(), timeout=0.2)
    finally:
        ensure_bucket(ctx.s3, ctx.settings, notify=True)
    assert status.outcome is Outcome.OK and status.data["listed"] == [key]


def test_losing_redis_asks_for_a_retry(tmp_path: object) -> None:
    from pathlib import Path

    from prompt_tasks.errors import RetryLater
    from prompt_tasks.stack.servers import start_redis, wait_redis
    from tests.servers import test_settings as private_settings

    assert isinstance(tmp_path, Path)
    own = private_settings(tmp_path)
    proc = start_redis(own, tmp_path / "redis", tmp_path / "run")
    ctx = Context(own)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            wait_for_snaps(ctx, "SimCam", _group(), 1, 1, time.time(), timeout=60, poll_s=0.2)
        except BaseException as exc:  # noqa: BLE001 - kept for the assertion
            errors.append(exc)

    try:
        assert wait_redis(own)
        thread = threading.Thread(target=wait, daemon=True)
        thread.start()
        time.sleep(0.5)
        proc.stop()
        thread.join(60)
        assert not thread.is_alive()
    finally:
        proc.stop()
        ctx.close()
    assert len(errors) == 1 and isinstance(errors[0], RetryLater)
