"""The visit ledger: record parsing (pure), writes on the real Redis, first-writer-wins."""

from __future__ import annotations

import json
import time

import redis

from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import visit_key

TTL = 600


def _visit(group: str = "2026-11-24T01:00:00.000", **extra: object) -> NextVisit:
    values: dict[str, object] = {"instrument": "SimCam", "groupId": group, "startTime": 1000.0,
                                 "duration": 30.0, "nimages": 2}
    values.update(extra)
    return NextVisit.model_validate(values)


def test_parse_record_pure() -> None:
    raw = {
        "instrument": "SimCam",
        "group": "g1",
        "visit": json.dumps({"instrument": "SimCam", "groupId": "g1"}),
        "detectors": "[0, 1, 2]",
        "received": "100.0",
        "expected_end": "130.0",
        "deadline": "250.0",
        "d000.prepare.start": "101.0",
        "d000.prepare.end": "102.5",
        "d000.prepare.worker": "detector-1@h",
        "d000.snap.0": "110.0",
        "d000.snap.1": "120.0",
        "d000.run.start": "121.0",
        "d000.run.end": "124.0",
        "d000.outcome": "ok",
        "d000.stage": "run",
        "d000.worker": "detector-1@h",
        "d001.prepare.start": "101.0",
        "d001.outcome": "failed",
        "d001.stage": "ingest",
        "d001.reason": "PermanentError: bad",
        "d001.code": "permanent",
        "d001.snap.x": "junk",
        "d002.prepare.start": "not a number",
        "unrelated": "x",
    }
    record = ledger.parse_record(raw)
    assert record is not None
    assert (record.instrument, record.group, record.key) == ("SimCam", "g1", "SimCam/g1")
    assert sorted(record.detectors) == [0, 1, 2]
    d0, d1, d2 = (record.detectors[d] for d in (0, 1, 2))
    assert d0.final and d0.duration("prepare") == 1.5 and d0.snaps == {0: 110.0, 1: 120.0}
    assert d0.workers == {"prepare": "detector-1@h"} and d0.progress == "run done"
    assert d1.final and d1.code == "permanent" and d1.snaps == {}
    assert not d2.final and d2.progress == "pending" and d2.times == {"received": 100.0}
    assert record.counts() == {"ok": 1, "failed": 1, "pending": 1}
    assert json.loads(json.dumps(record.to_dict()))["detectors"]["0"]["snaps"] == {"0": 110.0, "1": 120.0}
    assert ledger.parse_record({}) is None


def test_build_summary_from_ledger_marks_unfinished_as_deadline_failures() -> None:
    record = ledger.parse_record({
        "instrument": "SimCam", "group": "g", "detectors": "[3, 4, 5]", "received": "10",
        "expected_end": "20",
        "d003.prepare.start": "11", "d003.prepare.end": "12", "d003.run.start": "13",
        "d003.run.end": "15", "d003.outcome": "ok", "d003.stage": "run",
        "d004.prepare.start": "11", "d004.prepare.end": "12", "d004.outcome": "ok", "d004.stage": "prepare",
        "d005.outcome": "timed_out", "d005.stage": "wait", "d005.reason": "no snap",
    })
    summary = ledger.build_summary(record, "SimCam", "g", None, by="deadline", now=40.0)
    assert summary["counts"]["ok"] == 1 and summary["counts"]["failed"] == 1
    assert summary["counts"]["timed_out"] == 1
    assert summary["detectors"]["4"]["reason"] == ledger.DEADLINE_REASON
    assert summary["detectors"]["4"]["stage"] == "prepare"  # where it stopped: stage and progress agree
    assert summary["stage_times"]["prepare"]["n"] == 2
    assert summary["elapsed_s"] == 30.0 and summary["after_expected_end_s"] == -5.0


def test_build_summary_prefers_chord_statuses() -> None:
    statuses = [
        StageStatus("run", Outcome.OK, "SimCam", "g", 0, data={"worker": "w1"}).to_dict(),
        StageStatus("ingest", Outcome.FAILED, "SimCam", "g", 1, reason="bad", code="bad_raw").to_dict(),
        {"not": "a status"},
    ]
    summary = ledger.build_summary(None, "SimCam", "g", statuses, by="chord", now=1.0)
    assert summary["n_detectors"] == 2
    assert summary["detectors"]["0"] == {"outcome": "ok", "stage": "run", "reason": "", "code": "", "worker": "w1"}
    assert summary["counts"]["failed"] == 1


def test_create_is_idempotent_and_indexed(rdb: redis.Redis, settings: Settings) -> None:
    visit = _visit()
    assert ledger.create_visit(rdb, visit, [2, 1, 0], TTL, deadline=200.0, received=time.time())
    assert not ledger.create_visit(rdb, visit, [0], TTL, deadline=200.0)
    key = visit_key("SimCam", visit.groupId)
    assert key == "visit:SimCam:2026-11-24T01:00:00.000"
    assert 0 < rdb.ttl(key) <= TTL
    record = ledger.read_visit(rdb, "SimCam", visit.groupId)
    assert record is not None and sorted(record.detectors) == [0, 1, 2]
    assert record.visit["nimages"] == 2 and record.deadline == 200.0
    assert ledger.in_flight(rdb) == [("SimCam", visit.groupId)]
    assert ledger.recent(rdb) == [("SimCam", visit.groupId)]
    ledger.delete_visit(rdb, "SimCam", visit.groupId)
    assert ledger.read_visit(rdb, "SimCam", visit.groupId) is None and ledger.in_flight(rdb) == []


def test_stamps_and_statuses(rdb: redis.Redis, settings: Settings) -> None:
    visit = _visit("g-stamps")
    ledger.create_visit(rdb, visit, [7], TTL, deadline=0.0)
    ledger.stamp(rdb, "SimCam", "g-stamps", 7, "prepare.start", TTL, when=5.0)
    ledger.stamp_snap(rdb, "SimCam", "g-stamps", 7, 0, TTL, when=6.0)
    ledger.stamp_snap(rdb, "SimCam", "g-stamps", 7, 0, TTL, when=9.0)  # the first arrival counts
    status = StageStatus("prepare", Outcome.OK, "SimCam", "g-stamps", 7, finished=8.0)
    ledger.record_stage_end(rdb, status, TTL, worker="detector-2@h")
    rec = ledger.read_visit(rdb, "SimCam", "g-stamps").detectors[7]  # type: ignore[union-attr]
    assert {k: v for k, v in rec.times.items() if k != "received"} == {"prepare.start": 5.0, "prepare.end": 8.0}
    assert rec.snaps == {0: 6.0} and rec.workers == {"prepare": "detector-2@h"}
    assert (rec.outcome, rec.stage, rec.final, rec.progress) == ("ok", "prepare", False, "prepare done")
    # the wait stage's status carries each snap's arrival
    waited = StageStatus("wait", Outcome.OK, "SimCam", "g-stamps", 7, finished=12.0,
                         data={"snaps": {"1": {"key": "k", "t": 11.0}, "x": {"t": 1.0}}})
    ledger.record_stage_end(rdb, waited, TTL, worker="wait@h")
    rec = ledger.read_visit(rdb, "SimCam", "g-stamps").detectors[7]  # type: ignore[union-attr]
    assert rec.snaps == {0: 6.0, 1: 11.0} and rec.workers["wait"] == "wait@h"


def test_summary_first_writer_wins(rdb: redis.Redis, settings: Settings) -> None:
    visit = _visit("g-summary")
    ledger.create_visit(rdb, visit, [0, 1], TTL, deadline=0.0)
    first = {"by": "deadline", "detectors": {
        "0": {"outcome": "failed", "reason": ledger.DEADLINE_REASON, "code": ledger.DEADLINE_CODE},
    }}
    assert ledger.write_summary(rdb, "SimCam", "g-summary", first, by="deadline", ttl_s=TTL, when=50.0)
    assert not ledger.write_summary(rdb, "SimCam", "g-summary", {"by": "chord"}, by="chord", ttl_s=TTL)
    record = ledger.read_visit(rdb, "SimCam", "g-summary")
    assert record is not None
    assert record.summary == first and record.summary_by == "deadline" and record.summarized == 50.0
    assert record.detectors[0].reason == ledger.DEADLINE_REASON and record.detectors[0].outcome == "failed"
    assert ledger.in_flight(rdb) == [] and ledger.recent(rdb) == [("SimCam", "g-summary")]
