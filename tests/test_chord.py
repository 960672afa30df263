"""A visit's chord through a real Celery worker on the private Redis.

One in-process worker (thread pool) consumes the ``wait`` and ``summary`` queues and the
detector queues of ``ChordCam``; the detector stages are the placeholders, made to fail
through the fault-injection keys. The module's fixtures never flush Redis while the worker
runs (that would drop its remote-control bindings): the module has its own private Redis and
each test its own group id.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit, tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.stack.servers import redis_binary
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import fault_key
from tests.servers import celery_app_for, missing, private_servers
from tests.servers import test_settings as private_settings

INSTRUMENT = "ChordCam"
DETECTORS = list(range(9))
UNCONSUMED = 99  # a detector whose queue nobody consumes
_groups = itertools.count()


@pytest.fixture(scope="module")
def chord_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A private Redis for this module alone (no other test can flush it under the worker)."""
    try:
        redis_binary()
    except FileNotFoundError as exc:
        missing(str(exc))
    # payload "noop": these tests exercise the chord, not the Butler work (ChordCam has no plugin)
    settings = private_settings(tmp_path_factory.mktemp("chord"), deadline_margin_s=2.0, ledger_ttl_s=600,
                             payload="noop")
    with private_servers(settings, s3=False) as ready:
        _events_redis[:] = [ready.events_redis]
        yield ready


@pytest.fixture(scope="module")
def app(chord_settings: Settings) -> Iterator[Celery]:
    with celery_app_for(chord_settings) as celery_app:
        yield celery_app


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[object]:
    queues = ["default", "wait", "summary"] + [detector_queue(INSTRUMENT, d) for d in DETECTORS]
    with start_worker(app, pool="threads", concurrency=8, queues=queues, perform_ping_check=True,
                      hostname="detector-1@chord", shutdown_timeout=30) as controller:
        yield controller
    client = redis.Redis.from_url(app.prompt_settings.broker)  # type: ignore[attr-defined]
    client.delete(detector_queue(INSTRUMENT, UNCONSUMED))
    client.close()


@pytest.fixture
def rdb(chord_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(chord_settings.events_redis, decode_responses=True)
    yield client
    client.close()


def _visit(**extra: object) -> NextVisit:
    values: dict[str, object] = {"instrument": INSTRUMENT, "groupId": f"2026-11-24T02:00:{next(_groups):02d}.000",
                                 "startTime": tai_now(), "duration": 0.0, "nimages": 1}
    values.update(extra)
    visit = NextVisit.model_validate(values)
    _snaps_arrived(visit)
    return visit


def _snaps_arrived(visit: NextVisit) -> None:
    """Index the visit's raws as arrived, so the real wait stage finds them at once."""
    from prompt_tasks.model.objectkeys import SnapKey, format_key
    from prompt_tasks.store.arrivals import record_arrival

    client = redis.Redis.from_url(_events_redis[0])
    try:
        for detector in [*DETECTORS, UNCONSUMED]:
            key = format_key(INSTRUMENT, detector, visit.groupId, 0)
            record_arrival(client, SnapKey(INSTRUMENT, detector, visit.groupId, 0, "raw.fits"), key, 1, "")
    finally:
        client.close()


#: The events Redis of the module's servers (set by ``chord_settings``).
_events_redis: list[str] = []


def _summary(app: Celery, chord_id: str | None) -> dict:
    assert chord_id
    return app.AsyncResult(chord_id).get(timeout=60)


def _wait_for_summary(rdb: redis.Redis, visit: NextVisit, timeout: float = 60.0) -> ledger.VisitRecord:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        record = ledger.read_visit(rdb, visit.instrument, visit.groupId)
        if record is not None and record.summary is not None:
            return record
        time.sleep(0.1)
    raise AssertionError(f"no summary for {visit.key} within {timeout} s")


def test_nine_detectors_complete(app: Celery, worker: object, chord_settings: Settings, rdb: redis.Redis) -> None:
    visit = _visit(startTime=tai_now() + 3600)  # the deadline is far away
    result = announce(app, chord_settings, visit, detectors=DETECTORS)
    summary = _summary(app, result.chord_id)
    assert summary["written"] and summary["by"] == "chord"
    assert summary["counts"]["ok"] == 9 and summary["n_detectors"] == 9
    assert set(summary["detectors"]) == {str(d) for d in DETECTORS}
    record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
    assert record is not None and record.summary_by == "chord" and record.summarized is not None
    for det in DETECTORS:
        rec = record.detectors[det]
        assert rec.final and rec.outcome == "ok" and rec.stage == "run"
        for stage in ledger.STAGES:
            assert f"{stage}.start" in rec.times and f"{stage}.end" in rec.times
            assert rec.workers[stage] == "detector-1@chord"
    assert ledger.in_flight(rdb, 100).count((INSTRUMENT, visit.groupId)) == 0
    # the deadline, when it comes, changes nothing
    late = app.signature("prompt_tasks.visit_deadline", kwargs={"instrument": INSTRUMENT, "group": visit.groupId},
                         queue="summary").apply_async().get(timeout=30)
    assert late["written"] is False
    assert ledger.read_visit(rdb, INSTRUMENT, visit.groupId).summary_by == "chord"  # type: ignore[union-attr]


def test_one_failing_detector_still_summarized(app: Celery, worker: object, chord_settings: Settings,
                                               rdb: redis.Redis) -> None:
    visit = _visit(startTime=tai_now() + 3600)
    rdb.set(fault_key(INSTRUMENT, visit.groupId, 4, "ingest"), "fail", ex=300)
    summary = _summary(app, announce(app, chord_settings, visit, detectors=DETECTORS).chord_id)
    assert (summary["counts"]["ok"], summary["counts"]["failed"]) == (8, 1)
    failed = summary["detectors"]["4"]
    assert failed["stage"] == "ingest" and failed["code"] == "permanent" and "injected fault" in failed["reason"]
    rec = ledger.read_visit(rdb, INSTRUMENT, visit.groupId).detectors[4]  # type: ignore[union-attr]
    assert "run.start" not in rec.times  # the chain short-circuited


def test_retry_then_give_up_and_crash(app: Celery, worker: object, chord_settings: Settings,
                                      rdb: redis.Redis) -> None:
    visit = _visit(startTime=tai_now() + 3600)
    rdb.set(fault_key(INSTRUMENT, visit.groupId, 2, "prepare"), "retry", ex=300)
    rdb.set(fault_key(INSTRUMENT, visit.groupId, 6, "run"), "crash", ex=300)
    summary = _summary(app, announce(app, chord_settings, visit, detectors=DETECTORS).chord_id)
    assert summary["counts"]["ok"] == 7
    assert summary["detectors"]["2"]["code"] == "retry"
    assert summary["detectors"]["2"]["reason"].startswith("gave up after 3 retries")
    assert summary["detectors"]["6"]["code"] == "internal"
    assert "RuntimeError" in summary["detectors"]["6"]["reason"]


def test_unconsumed_queue_is_summarized_by_the_deadline(app: Celery, worker: object, chord_settings: Settings,
                                                        rdb: redis.Redis) -> None:
    visit = _visit()  # ends now; the deadline is 2 s away
    result = announce(app, chord_settings, visit, detectors=[0, 1, UNCONSUMED])
    record = _wait_for_summary(rdb, visit)
    assert record.summary_by == "deadline"
    summary = record.summary
    assert summary is not None
    assert (summary["counts"]["ok"], summary["counts"]["failed"]) == (2, 1)
    assert summary["detectors"][str(UNCONSUMED)]["reason"] == ledger.DEADLINE_REASON
    assert record.detectors[UNCONSUMED].reason == ledger.DEADLINE_REASON
    assert app.AsyncResult(result.chord_id).state == "PENDING"  # the chord itself never completes


def test_visits_in_flight_complete_independently(app: Celery, worker: object, chord_settings: Settings,
                                                 rdb: redis.Redis) -> None:
    visits = [_visit(startTime=tai_now() + 3600) for _ in range(3)]
    rdb.set(fault_key(INSTRUMENT, visits[1].groupId, 0, "wait"), "fail", ex=300)
    for visit in visits[::2]:
        rdb.set(fault_key(INSTRUMENT, visit.groupId, 3, "prepare"), "sleep:0.3", ex=300)
    chords = [announce(app, chord_settings, visit, detectors=DETECTORS).chord_id for visit in visits]
    assert {g for _, g in ledger.in_flight(rdb, 100)} >= {v.groupId for v in visits[::2]}
    summaries = [_summary(app, chord_id) for chord_id in chords]
    assert [s["group"] for s in summaries] == [v.groupId for v in visits]
    assert [s["counts"]["ok"] for s in summaries] == [9, 8, 9]
    assert summaries[1]["detectors"]["0"]["stage"] == "wait"


def test_failed_status_and_jitter() -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from prompt_tasks.errors import BadRaw
    from prompt_tasks.flow.policy import POLICIES, jittered
    from prompt_tasks.flow.stage import failed_status

    soft = failed_status("run", "X", "g", 3, SoftTimeLimitExceeded())
    assert (soft.outcome.value, soft.code, soft.stage, soft.detector) == ("failed", "time_limit", "run", 3)
    bad = failed_status("ingest", "X", "g", 3, BadRaw("truncated"))
    assert bad.code == "bad_raw" and bad.reason == "BadRaw: truncated"
    assert failed_status("run", "X", "g", 3, ValueError("x")).code == "internal"
    policy = POLICIES["prepare"]
    for _ in range(100):
        assert 0.8 * 2.0 <= jittered(2.0, policy) <= 1.4 * 2.0
    assert jittered(-1.0, policy) == 0.0


def test_check_fault_modes(rdb: redis.Redis) -> None:
    from prompt_tasks.errors import PermanentError, RetryLater
    from prompt_tasks.flow.stage import check_fault

    group = "fault-modes"
    check_fault(rdb, INSTRUMENT, group, 1, "run")  # no key: nothing happens
    for mode, error in (("fail", PermanentError), ("retry", RetryLater), ("crash", RuntimeError)):
        rdb.set(fault_key(INSTRUMENT, group, 1, "run"), mode, ex=60)
        with pytest.raises(error):
            check_fault(rdb, INSTRUMENT, group, 1, "run")
    rdb.delete(fault_key(INSTRUMENT, group, 1, "run"))
