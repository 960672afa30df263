"""Catch-up: the failure record, the redo planner, the window, the CLI and a redo through a worker."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import redis
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner

from prompt_tasks.cli import main
from prompt_tasks.context import Context
from prompt_tasks.daytime import catchup
from prompt_tasks.daytime.catchup import CatchupRecord, in_window, plan_runs
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import CATCHUP_PENDING, fault_key
from tests.fleetkit import make_visit, put_raw, summary_of, wait_until

INSTRUMENT = "SimCam"


def _rec(key_group: str, failed_at: float, state: str = "pending", attempts: int = 0, expected: int = 1,
         code: str = "timed_out") -> CatchupRecord:
    return CatchupRecord(INSTRUMENT, key_group, 1, "wait", "timed_out", "r", code, failed_at,
                         expected_snaps=expected, state=state, attempts=attempts)


def test_window_plain_and_wrapping() -> None:
    def at(h, m=0):
        return datetime(2026, 11, 24, h, m, tzinfo=UTC)
    assert in_window("08:00-18:00", at(8)) and in_window("08:00-18:00", at(17, 59))
    assert not in_window("08:00-18:00", at(18)) and not in_window("08:00-18:00", at(3))
    assert in_window("20:00-06:00", at(23)) and in_window("20:00-06:00", at(5))
    assert not in_window("20:00-06:00", at(12))
    assert in_window("00:00-00:00", at(12))


def test_plan_runs_picks_pending_redoable_with_raws_oldest_first() -> None:
    records = [
        _rec("g3", 3.0), _rec("g1", 1.0), _rec("g2", 2.0, expected=2),
        _rec("done", 0.5, state="done"), _rec("tired", 0.6, attempts=3), _rec("abort", 0.7, code="aborted"),
        _rec("unknown", 0.8, expected=0),
    ]
    present = {r.key: 1 for r in records}
    chosen = plan_runs(records, present, max_attempts=3, limit=10)
    assert [r.group for r in chosen] == ["unknown", "g1", "g3"]  # g2 lacks a raw
    assert [r.group for r in plan_runs(records, present, max_attempts=3, limit=1)] == ["unknown"]
    assert plan_runs(records, {}, max_attempts=3, limit=10) == []


def test_failures_of_a_summary() -> None:
    record = ledger.VisitRecord(INSTRUMENT, "g", {"instrument": INSTRUMENT, "groupId": "g", "nimages": 2,
                                                  "detector": 4}, {})
    summary = {"instrument": INSTRUMENT, "group": "g", "detectors": {
        "1": {"outcome": "ok", "stage": "run"},
        "2": {"outcome": "failed", "stage": "run", "reason": "PipelineError: x", "code": "pipeline_error"},
        "3": {"outcome": "timed_out", "stage": "wait", "reason": "0 of 2", "code": "timed_out"},
        "4": {"outcome": "skipped", "stage": "prepare", "reason": "no pipeline", "code": ""},
    }}
    out = catchup.failures_of(record, summary, lambda i, g, d: f"{i}/{d}/{g}/", now=5.0)
    assert [(r.detector, r.code, r.raw_prefix) for r in out] == [(2, "pipeline_error", "SimCam/2/g/"),
                                                               (3, "timed_out", "SimCam/3/g/")]
    assert all(r.expected_snaps == 2 and "detector" not in r.visit for r in out)


def test_record_is_durable_and_settles(rdb: redis.Redis) -> None:
    summary = {"instrument": INSTRUMENT, "group": "g", "detectors": {
        "2": {"outcome": "failed", "stage": "run", "reason": "boom", "code": "internal"}}}
    assert catchup.record_failures(rdb, None, summary) == 1
    rec = catchup.read_record(rdb, INSTRUMENT, "g", 2)
    assert rec is not None and rec.state == "pending" and rec.raw_prefix == "SimCam/2/g/"
    assert rdb.zscore(CATCHUP_PENDING, rec.key) is not None
    rec.attempts, rec.state = 1, "queued"
    catchup._save(rdb, rec)
    assert catchup.record_failures(rdb, None, summary) == 0  # a queued redo settles it itself
    failed = catchup.finish_attempt(rdb, {"outcome": "failed", "stage": "run", "reason": "again", "code": "x"},
                                    INSTRUMENT, "g", 2, max_attempts=1)
    assert failed is not None and failed.state == "abandoned" and failed.reason == "again"
    assert rdb.zscore(CATCHUP_PENDING, rec.key) is None
    assert [r.state for r in catchup.list_records(rdb)] == ["abandoned"]


def test_failed_detector_is_recorded_listed_and_redone(settings: Settings, rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app

    fast = settings.model_copy(update={"payload": "noop", "wait_margin_s": 1.0, "catchup_window": "00:00-00:00"})
    app = create_app(fast)
    queues = ["wait", "summary", "default", "catchup", detector_queue(INSTRUMENT, 0), detector_queue(INSTRUMENT, 1)]
    try:
        with start_worker(app, pool="threads", concurrency=8, queues=queues, perform_ping_check=False,
                          hostname="detector-8@catchup", shutdown_timeout=30):
            visit = make_visit(INSTRUMENT, nimages=1)
            put_raw(fast, visit, 0)  # detector 1's raw is late: its wait times out
            rdb.set(fault_key(INSTRUMENT, visit.groupId, 0, "run"), "pipeline exploded", ex=300)
            announce(app, fast, visit, detectors=[0, 1])
            summary = wait_until(lambda: summary_of(rdb, visit), 60, "summary")
            assert {d: e["outcome"] for d, e in summary["detectors"].items()} == {"0": "failed", "1": "timed_out"}
            env = child_env(fast)
            listed = CliRunner().invoke(main, ["catchup", "list", "--json"], env=env)
            assert listed.exit_code == 0, listed.output
            assert {(r["detector"], r["code"]) for r in json.loads(listed.output)} == {(0, "permanent"), (1, "timed_out")}
            table = CliRunner().invoke(main, ["catchup", "list"], env=env)
            assert visit.groupId in table.output and "pending" in table.output

            rdb.delete(fault_key(INSTRUMENT, visit.groupId, 0, "run"))  # fixed by day
            put_raw(fast, visit, 1)
            ran = CliRunner().invoke(main, ["catchup", "run", "--json"], env=env)
            assert ran.exit_code == 0, ran.output
            assert sorted(json.loads(ran.output)["sent"]) == sorted(
                catchup.record_key(INSTRUMENT, visit.groupId, d) for d in (0, 1))
            wait_until(lambda: {r.state for r in catchup.list_records(rdb)} == {"done"}, 60, "both redone")
            assert all(r.attempts == 1 and r.history[-1]["outcome"] == "ok" for r in catchup.list_records(rdb))
            record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
            assert record is not None and record.detectors[1].outcome == "ok"
    finally:
        app.close()


def test_beat_job_acts_only_in_its_window_and_never_with_visits_in_flight(settings: Settings,
                                                                          rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app

    app = create_app(settings)
    ctx = Context(settings.model_copy(update={"catchup_window": "08:00-09:00"}))
    try:
        night = datetime(2026, 11, 24, 2, 0, tzinfo=UTC)
        assert catchup.beat_run(app, ctx, night)["skipped"].startswith("outside")
        ledger.create_visit(ctx.redis, make_visit(INSTRUMENT), [0], 600, deadline=time.time() + 60)
        day = datetime(2026, 11, 24, 8, 30, tzinfo=UTC)
        assert catchup.beat_run(app, ctx, day)["skipped"] == "visits in flight"
    finally:
        ctx.close()
        app.close()


def test_a_detector_that_finished_after_its_deadline_is_settled_not_redone(settings: Settings,
                                                                          rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app
    from prompt_tasks.model.status import Outcome, StageStatus

    visit = make_visit(INSTRUMENT)
    ledger.create_visit(rdb, visit, [1], 600, deadline=time.time())
    summary = {"instrument": INSTRUMENT, "group": visit.groupId, "detectors": {
        "1": {"outcome": "failed", "stage": "run", "reason": ledger.DEADLINE_REASON, "code": ledger.DEADLINE_CODE}}}
    catchup.record_failures(rdb, ledger.read_visit(rdb, INSTRUMENT, visit.groupId), summary)
    ledger.record_stage_end(rdb, StageStatus("run", Outcome.OK, INSTRUMENT, visit.groupId, 1), 600)  # late
    app = create_app(settings)
    ctx = Context(settings)
    try:
        assert catchup.run_catchup(app, ctx, force=True)["sent"] == []
    finally:
        ctx.close()
        app.close()
    rec = catchup.read_record(rdb, INSTRUMENT, visit.groupId, 1)
    assert rec is not None and rec.state == "done" and rec.history[-1]["reason"] == "completed after the summary"
