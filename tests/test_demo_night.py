"""The demo night's plan and its per-visit rows, read from a real ledger in Redis."""

from __future__ import annotations

import time

import redis

from prompt_tasks.demo.night import NIGHT_FILTERS, NIGHT_VISITS, _quality_cells, night_quality, visit_rows
from prompt_tasks.instruments.simcam.recovery import Recovery
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from tests.butlerkit import NIGHT_START, next_visit, visit_spec


class _Planned:
    def __init__(self, spec: object, index: int = 0) -> None:
        self.spec, self.index = spec, index


def test_rows_from_the_ledger(settings: Settings, rdb: redis.Redis) -> None:
    spec = visit_spec(NIGHT_START)
    visit = NextVisit.model_validate(next_visit(spec))
    ttl = 600
    now = time.time()
    ledger.create_visit(rdb, visit, [0, 1, 2], ttl, deadline=now + 60, received=now)
    for det in (0, 1, 2):
        ledger.stamp(rdb, visit.instrument, visit.groupId, det, "prepare.start", ttl, when=now)
        ledger.stamp(rdb, visit.instrument, visit.groupId, det, "prepare.end", ttl, when=now + 1.5)
    ledger.set_fields(rdb, visit.instrument, visit.groupId, {
        ledger.detector_field(0, "run.pipeline"): "ApPipe",
        ledger.detector_field(1, "run.pipeline"): "SingleFrame",
    }, ttl)
    statuses = [
        StageStatus("run", Outcome.OK, "SimCam", visit.groupId, 0).to_dict(),
        StageStatus("run", Outcome.OK, "SimCam", visit.groupId, 1).to_dict(),
        StageStatus("ingest", Outcome.FAILED, "SimCam", visit.groupId, 2, reason="s3://x: truncated",
                    code="bad_raw").to_dict(),
    ]
    record = ledger.read_visit(rdb, visit.instrument, visit.groupId)
    summary = ledger.build_summary(record, visit.instrument, visit.groupId, statuses, by="chord", now=now + 9)
    ledger.write_summary(rdb, visit.instrument, visit.groupId, summary, by="chord", ttl_s=ttl)

    [row] = visit_rows(settings, [_Planned(spec)], [0, 1, 2])
    assert (row["ok"], row["failed"], row["skipped"]) == (2, 1, 0)
    assert row["pipelines"] in ("ApPipe x1, SingleFrame x1", "SingleFrame x1, ApPipe x1")
    assert row["stage_times"]["prepare"]["median_s"] == 1.5
    assert row["reasons"] == {"s3://x: truncated": 1}
    assert row["filter"] == "SimCam-r" and row["day_obs"] == spec.day_obs
    assert row["recovery"] is None and _quality_cells(row) == ("-", "-")

    [row] = visit_rows(settings, [_Planned(spec)], [0, 1, 2], {0: Recovery(injected=10, found=9, false=5)})
    assert row["recovery"] == Recovery(10, 9, 5)
    assert _quality_cells(row) == ("9/10", "2.5")  # false DIA sources per ok detector-visit


def test_night_quality_sums_the_scored_visits() -> None:
    rows = [{"ok": 2, "recovery": Recovery(10, 9, 5)}, {"ok": 3, "recovery": Recovery(30, 27, 1)},
            {"ok": 3, "recovery": None}]
    line = night_quality(rows)
    assert "36 of 40 injected transients found (completeness 90%)" in line
    assert "1.2 false DIA sources per detector-visit (6 in 5)" in line
    assert "not scored" in night_quality([{"ok": 1, "recovery": None}])


def test_the_night_has_several_filters() -> None:
    assert NIGHT_VISITS >= 3 and len(set(NIGHT_FILTERS)) >= 3
