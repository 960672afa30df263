"""Prepare never waits behind a run: a compute worker's second slot prepares the next visit
while the previous visit's pipeline still runs on the same detector (real worker processes,
the framework-only payload, a pipeline stretched by an injected ``sleep``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import fault_key
from tests.fleetkit import Fleet, fleet_of, make_visit, node_alive, put_raw, summary_of, wait_until

pytestmark = pytest.mark.slow

INSTRUMENT = "SimCam"


@pytest.fixture
def fleet(settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    fleet_settings = settings.model_copy(update={
        "payload": "noop", "ledger_ttl_s": 600, "deadline_margin_s": 60.0, "wait_margin_s": 5.0})
    with fleet_of(fleet_settings, tmp_path) as started:
        yield started


def _times(rdb: redis.Redis, visit: NextVisit) -> dict[str, float]:
    record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
    return dict(record.detectors[0].times) if record is not None and 0 in record.detectors else {}


def test_the_next_visit_is_prepared_while_the_previous_pipeline_runs(fleet: Fleet, rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app

    app = create_app(fleet.settings)
    try:
        fleet.role("wait")
        fleet.role("summary")
        fleet.dispatcher()
        fleet.detector(1, queues=[detector_queue(INSTRUMENT, 0)])  # the role's own pool: two slots
        wait_until(lambda: node_alive(app, "wait@") and node_alive(app, "summary@")
                   and node_alive(app, "detector-"), 120, "workers up")
        first, second = make_visit(INSTRUMENT), make_visit(INSTRUMENT, start_in=1.0)
        rdb.set(fault_key(INSTRUMENT, first.groupId, 0, "run"), "sleep:8", ex=600)  # a long pipeline
        announce(app, fleet.settings, first, detectors=[0])
        put_raw(fleet.settings, first, 0)
        wait_until(lambda: "run.start" in _times(rdb, first), 60, "the first visit's pipeline running")
        announce(app, fleet.settings, second, detectors=[0])
        wait_until(lambda: "prepare.end" in _times(rdb, second), 60, "the second visit prepared")
        assert "run.end" not in _times(rdb, first)  # prepared beside the run, not after it
        put_raw(fleet.settings, second, 0)
        for visit in (first, second):
            summary = wait_until(lambda v=visit: summary_of(rdb, v), 90, f"summary of {visit.groupId}")
            assert summary["counts"]["ok"] == 1, summary
        assert _times(rdb, second)["prepare.end"] < _times(rdb, first)["run.end"]
    finally:
        app.close()
