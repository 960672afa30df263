"""Faults survived, against real processes (issue 8).

Each test gets its own Redis (append-only, with a password) and S3 gateway, since some stop and
restart them, and real worker processes (the project's ``detector`` role command line, an
auxiliary worker on ``wait``/``summary``/``default``, the ``prompt-tasks dispatcher``), all
started here and stopped by their pids. The stages' Butler payload is ``noop`` (the Butler work
is not what is under test); faults are injected with :func:`prompt_tasks.flow.stage.fault_key`.
Redelivery after a crash is made quick with a short visibility timeout and restore sweep.
Waits are bounded generously; nothing asserts a duration.

1. a compute worker SIGKILLed in the middle of ``run_pipeline``;
2. a pool child SIGKILLed (as by the OOM killer), and ``--max-memory-per-child`` exceeded;
3. Redis restarted in the middle of the night;
4. the S3 server down while snaps are due;
5. a visit aborted mid-exposure, one whose snaps never come, one with a snap of two missing;
6. the same next_visit twice and the same bucket event twice.

After each, the stack's log files are searched for the Redis password and the S3 secret.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote_plus

import psutil
import pytest
import redis
from celery import Celery

from prompt_tasks.context import Context
from prompt_tasks.daytime import catchup
from prompt_tasks.fleet.controller import QueueController
from prompt_tasks.fleet.roles import ROLES
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.objectkeys import SnapKey
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.objstore import ensure_bucket, make_client, wait_live
from prompt_tasks.settings import Settings
from prompt_tasks.stack.process import ManagedProcess
from prompt_tasks.stack.servers import redis_binary, start_redis, start_s3, wait_redis
from prompt_tasks.store import ledger
from prompt_tasks.store.arrivals import abort_visit, arrivals_for, record_arrival
from prompt_tasks.store.keys import AFFINITY_STATE, fault_key
from prompt_tasks.store.metrics import read_counters
from tests.fleetkit import (
    Fleet,
    make_visit,
    node_alive,
    put_raw,
    raw_key,
    summary_of,
    wait_until,
)
from tests.servers import missing
from tests.servers import test_settings as private_settings

INSTRUMENT = "SimCam"
DETECTORS = [0, 1]
QUEUES = [detector_queue(INSTRUMENT, d) for d in DETECTORS]
REDIS_SECRET = "faults-redis-Secret-7f3a"

pytestmark = pytest.mark.slow
S3_SECRET = "faults-s3-Secret-91bc"


@dataclass
class Stack:
    """A private stack of one test: settings, servers (restartable), the app, the fleet."""

    settings: Settings
    app: Celery
    fleet: Fleet
    redis_proc: ManagedProcess
    s3_proc: ManagedProcess
    rdb: redis.Redis

    def restart_redis(self, down_s: float = 1.0) -> None:
        self.redis_proc.stop()
        time.sleep(down_s)
        self.redis_proc = start_redis(self.settings, self.settings.state_path / "redis", self.settings.state_path / "run")
        assert wait_redis(self.settings, timeout=30), self.redis_proc.tail()

    def stop_s3(self) -> None:
        self.s3_proc.stop()

    def start_s3(self) -> None:
        self.s3_proc = start_s3(self.settings, self.settings.state_path / "s3", self.settings.state_path / "run")
        assert wait_live(self.settings, timeout=30), self.s3_proc.tail()

    def ctx(self) -> Context:
        return Context(self.settings)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    try:
        redis_binary()
    except FileNotFoundError as exc:
        missing(str(exc))
    settings = private_settings(
        tmp_path / "state", redis_aof=True, redis_password=REDIS_SECRET, s3_secret_key=S3_SECRET,
        payload="noop", visibility_timeout=8, restore_interval_s=1, max_deliveries=3,
        ledger_ttl_s=600, arrival_ttl_s=600, deadline_margin_s=40.0, wait_margin_s=3.0, quiet_period_s=1.0,
    )
    run_dir = settings.state_path / "run"
    redis_proc = start_redis(settings, settings.state_path / "redis", run_dir)
    s3_proc = None
    fleet = Fleet(settings, tmp_path)
    app = None
    try:
        assert wait_redis(settings, timeout=30), redis_proc.tail()
        s3_proc = start_s3(settings, settings.state_path / "s3", run_dir)
        assert wait_live(settings, timeout=30), s3_proc.tail()
        ensure_bucket(make_client(settings), settings)
        from prompt_tasks.celery import create_app

        app = create_app(settings)
        rdb = redis.Redis.from_url(settings.events_redis, decode_responses=True)
        made = Stack(settings, app, fleet, redis_proc, s3_proc, rdb)
        yield made
        logs = fleet.logs() + "".join(p.read_text(errors="replace") for p in run_dir.glob("*.log"))
        assert logs, "the processes wrote no logs"
        for secret in (REDIS_SECRET, S3_SECRET):
            assert secret not in logs, "a secret reached the logs"
        assert "Unrecoverable error" not in logs, "a worker died"
        rdb.close()
        redis_proc, s3_proc = made.redis_proc, made.s3_proc
    finally:
        fleet.stop_all()
        if app is not None:
            app.close()
        if s3_proc is not None:
            s3_proc.stop()
        redis_proc.stop()


def _index_raws(rdb: redis.Redis, visit: NextVisit, detectors: list[int], snaps: int = 1) -> None:
    """Index raws as arrived (the dispatcher's job) for tests where the bucket is not under test."""
    for det in detectors:
        for snap in range(snaps):
            record_arrival(rdb, SnapKey(INSTRUMENT, det, visit.groupId, snap, "raw.fits"),
                           raw_key(visit, det, snap), 80, "")


def _summary(stack: Stack, visit: NextVisit, timeout: float = 90.0) -> dict:
    return wait_until(lambda: summary_of(stack.rdb, visit), timeout, f"summary of {visit.groupId}")


def _stamped(stack: Stack, visit: NextVisit, detector: int, name: str) -> bool:
    record = ledger.read_visit(stack.rdb, visit.instrument, visit.groupId)
    return record is not None and name in record.detectors[detector].times


def _counter(rdb: redis.Redis, name: str, label: str) -> int:
    return read_counters(rdb, name).get(label, 0)


def _aux_and_detectors(stack: Stack, *indexes: int, extra: tuple[str, ...] = (), **kwargs: object) -> None:
    stack.fleet.aux()
    for index in indexes:
        stack.fleet.detector(index, *extra, **kwargs)  # type: ignore[arg-type]
    wait_until(lambda: node_alive(stack.app, "aux@") and node_alive(stack.app, "detector-", len(indexes)),
               120, "workers up")


def _settled(ctl: QueueController, n: int) -> bool:
    observed = ctl.observe()
    if len(observed) != n or sorted(observed) != ctl.workers:
        return False
    return all([w for w, qs in observed.items() if q in qs] == [ctl.assignment.get(q)] for q in QUEUES)


# --------------------------------------------------------------------------- 1


def test_worker_sigkilled_mid_run_is_redone_elsewhere(stack: Stack) -> None:
    _aux_and_detectors(stack, 1, 2)
    ctl = QueueController(stack.app, stack.settings, queues=QUEUES).start()
    try:
        wait_until(lambda: _settled(ctl, 2), 120, "two compute workers own the queues")
        visit = make_visit(INSTRUMENT)
        _index_raws(stack.rdb, visit, DETECTORS)
        stack.rdb.set(fault_key(INSTRUMENT, visit.groupId, 0, "run"), "sleep:3", ex=600)
        announce(stack.app, stack.settings, visit, detectors=DETECTORS)
        wait_until(lambda: _stamped(stack, visit, 0, "run.start"), 60, "detector 0 running")
        victim = ctl.assignment[QUEUES[0]]
        stack.fleet.kill(victim.split("@")[0])  # SIGKILL the worker and its pool child
        summary = _summary(stack, visit)
        assert summary["counts"]["ok"] == 2, summary
        assert summary["by"] == "chord"
        record = ledger.read_visit(stack.rdb, INSTRUMENT, visit.groupId)
        assert record is not None
        assert record.detectors[0].workers["run"] != victim  # redone elsewhere
        assert _counter(stack.rdb, "redeliveries", "stage=run") >= 1
        # each detector-visit's run completed exactly once (the killed one never finished)
        assert _counter(stack.rdb, "outcomes", "outcome=ok,stage=run") == 2
        assert catchup.list_records(stack.rdb) == []
    finally:
        ctl.stop()


# --------------------------------------------------------------------------- 2


def test_pool_child_killed_and_memory_limit(stack: Stack) -> None:
    # every task leaves its pool process above 1 KiB: each is replaced after its task
    stack.fleet.settings = stack.settings.model_copy(update={"max_memory_per_child_kb": 1})
    _aux_and_detectors(stack, 1, queues=QUEUES)
    visit = make_visit(INSTRUMENT)
    _index_raws(stack.rdb, visit, DETECTORS)
    stack.rdb.set(fault_key(INSTRUMENT, visit.groupId, 0, "run"), "sleep:3", ex=600)
    announce(stack.app, stack.settings, visit, detectors=DETECTORS)
    wait_until(lambda: _stamped(stack, visit, 0, "run.start"), 60, "detector 0 running")
    worker = psutil.Process(stack.fleet.pid("detector-1"))
    # the light slot's child may be between its memory-limit exit and its replacement right now;
    # detector 0's pipeline runs in one of the children there are, so all of them are killed
    children = worker.children()
    assert 1 <= len(children) <= ROLES["detector"].concurrency, children
    for child in children:
        child.kill()  # as the out-of-memory killer would (one of them runs detector 0's pipeline)
    summary = _summary(stack, visit)
    assert summary["counts"]["ok"] == 2, summary
    assert _counter(stack.rdb, "redeliveries", "stage=run") >= 1
    assert _counter(stack.rdb, "outcomes", "outcome=ok,stage=run") == 2
    # the first child, its replacement after the kill, and replacements after the memory limit
    assert sum(read_counters(stack.rdb, "pool_children").values()) >= 3
    assert worker.is_running()


# --------------------------------------------------------------------------- 3


def _post(stack: Stack, visit: NextVisit, detector: int) -> bool:
    """POST ``visit`` (fan-out form: one detector) to the intake process; True once accepted."""
    import httpx

    body = {**visit.to_json_dict(), "detector": detector}
    url = f"http://{stack.settings.host}:{stack.settings.intake_port}/next-visit"
    try:
        return httpx.post(url, json=body, timeout=10).status_code == 202
    except httpx.HTTPError:
        return False


def test_redis_restart_mid_night(stack: Stack) -> None:

    stack.settings = stack.settings.model_copy(update={"deadline_margin_s": 20.0})
    stack.fleet.settings = stack.settings
    # the production processes: intake (router + queue controller), dispatcher, waits on gevent,
    # summaries on prefork, a prefork compute worker whose queues the controller assigns
    script = str(Path(sys.executable).parent / "prompt-tasks")
    stack.fleet._spawn("intake", [script, "intake", "--no-stream", "--loglevel", "WARNING"])
    stack.fleet.role("wait")
    stack.fleet.role("summary")
    stack.fleet.detector(1)
    stack.fleet.dispatcher()
    wait_until(lambda: node_alive(stack.app, "wait@") and node_alive(stack.app, "summary@")
               and node_alive(stack.app, "detector-1@"), 120, "workers up")
    # in flight across the restart: announced, waiting for snaps due in a few seconds
    before = [make_visit(INSTRUMENT, nimages=1, duration=8.0) for _ in DETECTORS]
    for det, visit in zip(DETECTORS, before, strict=True):
        wait_until(lambda v=visit, d=det: _post(stack, v, d), 120, "announced through the intake")
    wait_until(lambda: all(_stamped(stack, v, d, "wait.start") for d, v in zip(DETECTORS, before, strict=True)),
               60, "waiting")
    stack.restart_redis()
    restarted = time.time()
    for det, visit in zip(DETECTORS, before, strict=True):
        put_raw(stack.settings, visit, det)
    # announced after the restart through the intake process, which reconnects by itself, 20 s
    # ahead of its exposure as a summit announces: twice in CI a visit announced only 3 to 5 s
    # ahead timed out before its raw was listed in the bucket (reconnection ate its margin);
    # how long the announcement and the PUT took is shown if it happens again
    after = make_visit(INSTRUMENT, nimages=1, start_in=20.0)
    began = time.time()
    wait_until(lambda: _post(stack, after, 0), 60, "announced after the restart")
    announced = time.time()
    put_raw(stack.settings, after, 0)
    timing = (f"PUTs of the raws in flight {began - restarted:.2f} s, announcement {announced - began:.2f} s, "
              f"its raw's PUT {time.time() - announced:.2f} s")
    summary = _summary(stack, after, 120)
    assert summary["counts"]["ok"] == 1, (timing, summary)
    # the queue controller in the intake carried on too
    wait_until(lambda: float(stack.rdb.hget(AFFINITY_STATE, "checked") or 0) > restarted, 30, "controller ticking")
    for det, visit in zip(DETECTORS, before, strict=True):
        summary = _summary(stack, visit, 120)
        entry = summary["detectors"][str(det)]
        # completed, or recorded for catch-up: never silently lost
        assert entry["outcome"] == "ok" or catchup.read_record(stack.rdb, INSTRUMENT, visit.groupId, det), summary


# --------------------------------------------------------------------------- 4


def test_s3_down_while_snaps_are_due(stack: Stack) -> None:
    _aux_and_detectors(stack, 1, queues=QUEUES)
    stack.fleet.dispatcher()
    short = make_visit(INSTRUMENT, nimages=1)  # its wait times out (+3 s) while S3 is down
    longer = make_visit(INSTRUMENT, nimages=1, duration=15.0)  # its wait outlives the outage
    stack.stop_s3()
    announce(stack.app, stack.settings, short, detectors=[0])
    announce(stack.app, stack.settings, longer, detectors=[0])
    timed_out = _summary(stack, short, 60)
    assert timed_out["detectors"]["0"]["outcome"] == "timed_out", timed_out
    record = catchup.read_record(stack.rdb, INSTRUMENT, short.groupId, 0)
    assert record is not None and record.state == "pending"
    stack.start_s3()
    put_raw(stack.settings, longer, 0)
    put_raw(stack.settings, short, 0)
    assert _summary(stack, longer, 60)["counts"]["ok"] == 1  # found after S3 came back
    ctx = stack.ctx()
    try:
        result = catchup.run_catchup(stack.app, ctx, force=True)
    finally:
        ctx.close()
    assert result["sent"] == [record.key]
    done = wait_until(lambda: (r := catchup.read_record(stack.rdb, INSTRUMENT, short.groupId, 0))
                      and r.state == "done" and r, 60, "catch-up redo of the timed-out visit")
    assert done.attempts == 1


# --------------------------------------------------------------------------- 5


def test_aborted_missing_and_partial_visits(stack: Stack) -> None:
    _aux_and_detectors(stack, 1, queues=QUEUES)
    aborted = make_visit(INSTRUMENT, nimages=2, duration=20.0)
    never = make_visit(INSTRUMENT, nimages=1)
    partial = make_visit(INSTRUMENT, nimages=2)
    _index_raws(stack.rdb, aborted, [0], snaps=1)
    put_raw(stack.settings, partial, 0, snap=0)
    _index_raws(stack.rdb, partial, [0], snaps=1)
    for visit in (aborted, never, partial):
        announce(stack.app, stack.settings, visit, detectors=[0])
    wait_until(lambda: _stamped(stack, aborted, 0, "wait.start"), 60, "waiting on the aborted visit")
    abort_visit(stack.rdb, INSTRUMENT, aborted.groupId, reason="dome closed")
    outcomes = {v.groupId: _summary(stack, v, 60)["detectors"]["0"] for v in (aborted, never, partial)}
    assert outcomes[aborted.groupId]["outcome"] == "aborted"
    assert outcomes[never.groupId]["outcome"] == "timed_out"
    assert outcomes[partial.groupId]["outcome"] == "timed_out"
    assert "1 of 2 snaps" in outcomes[partial.groupId]["reason"]
    records = {r.group: r for r in catchup.list_records(stack.rdb)}
    assert set(records) == {aborted.groupId, never.groupId, partial.groupId}
    assert not records[aborted.groupId].redoable
    put_raw(stack.settings, partial, 0, snap=1)  # the missing snap turns up later
    ctx = stack.ctx()
    try:
        result = catchup.run_catchup(stack.app, ctx, force=True)
    finally:
        ctx.close()
    assert result["sent"] == [records[partial.groupId].key]
    assert records[never.groupId].key in result["waiting"]
    wait_until(lambda: catchup.read_record(stack.rdb, INSTRUMENT, partial.groupId, 0).state == "done",
               60, "the partial visit caught up")


# --------------------------------------------------------------------------- 6


def _event_body(settings: Settings, key: str) -> str:
    record = {"eventName": "s3:ObjectCreated:Put", "eventSource": "minio:s3", "eventTime": "2026-11-24T04:00:00Z",
              "s3": {"bucket": {"name": settings.raw_bucket}, "object": {"key": quote_plus(key), "size": 80, "eTag": "e"}}}
    return json.dumps([{"Event": [record], "EventTime": "2026-11-24T04:00:00Z"}])


def test_duplicate_next_visit_and_duplicate_event(stack: Stack) -> None:
    _aux_and_detectors(stack, 1, queues=QUEUES)
    stack.fleet.dispatcher()
    visit = make_visit(INSTRUMENT, nimages=1, duration=5.0)
    first = announce(stack.app, stack.settings, visit, detectors=DETECTORS)
    second = announce(stack.app, stack.settings, visit, detectors=DETECTORS)
    assert not first.duplicate and second.duplicate and second.chord_id is None
    for det in DETECTORS:
        key = put_raw(stack.settings, visit, det)
        stack.rdb.rpush(stack.settings.event_list, _event_body(stack.settings, key))  # delivered again
    summary = _summary(stack, visit)
    assert summary["counts"]["ok"] == 2
    for det in DETECTORS:
        assert list(arrivals_for(stack.rdb, INSTRUMENT, visit.groupId, det)) == [0]
    wait_until(lambda: stack.rdb.llen(stack.settings.event_list) == 0, 30, "events consumed")
    assert _counter(stack.rdb, "outcomes", "outcome=ok,stage=run") == 2  # one processing
    assert _counter(stack.rdb, "outcomes", "outcome=ok,stage=prepare") == 2
