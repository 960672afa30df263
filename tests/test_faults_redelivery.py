"""A redelivery that comes after the visit gave up, and after catch-up redid the detector-visit.

With Redis as broker, the task of a SIGKILLed compute worker comes back only after the
visibility timeout. Here (timeout shortened) the sequence a night can produce is played with
the real roles as processes and the real Butler payload (Trivial pipeline, 256² raws, one
detector): the worker dies in ``run_pipeline``; the visit fails that detector at its deadline
and records it for catch-up; catch-up redoes it on another worker; then the redelivered
``run_pipeline`` arrives. The central repo must still hold one set of outputs, the ledger
and the catch-up record say ok once, and no process logs a traceback.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from prompt_tasks.butler.export import is_exported
from prompt_tasks.daytime import catchup
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit, tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import fault_key
from prompt_tasks.store.metrics import read_counters
from tests.butlerkit import central_fixture, next_visit, put_raws, visit_spec
from tests.fleetkit import Fleet, fleet_of, node_alive, summary_of, wait_until

pytestmark = pytest.mark.slow

DETECTOR = 0
QUEUE = detector_queue("SimCam", DETECTOR)
#: Seconds a delivered task stays unacknowledged before Redis gives it to another worker.
VISIBILITY_S = 30


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture
def fleet_settings(settings: Settings, central: Settings, tmp_path: Path) -> Settings:
    from prompt_tasks.instruments import load_plugin

    selection = tmp_path / "selection.yaml"
    selection.write_text(json.dumps({"instruments": {"SimCam": {
        "pipelines_dir": str(load_plugin("SimCam").pipelines_dir), "rules": [{"pipelines": ["Trivial"]}]}}}))
    return central.model_copy(update={
        "local_repo_root": tmp_path / "local", "pipelines_config": selection, "export_max_age_s": 0.5,
        "ledger_ttl_s": 3600, "deadline_margin_s": 20.0, "wait_margin_s": 20.0,
        "visibility_timeout": VISIBILITY_S, "restore_interval_s": 1,
    })


@pytest.fixture
def fleet(fleet_settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    with fleet_of(fleet_settings, tmp_path) as started:
        yield started


def test_redelivery_after_deadline_and_catchup_changes_nothing(fleet: Fleet, fleet_settings: Settings,
                                                               rdb: redis.Redis) -> None:
    from lsst.daf.butler import Butler

    from prompt_tasks.celery import create_app
    from prompt_tasks.context import Context

    app = create_app(fleet_settings)
    try:
        fleet.role("wait")
        fleet.role("summary")
        fleet.dispatcher()
        fleet.detector(1, queues=[QUEUE])
        wait_until(lambda: node_alive(app, "wait@") and node_alive(app, "summary@")
                   and node_alive(app, "detector-1@"), 180, "workers up")

        spec = visit_spec(tai_now() - 5.0, snaps=1, survey="REDELIVERY")  # ends about now
        visit = NextVisit.model_validate(next_visit(spec))
        rdb.set(fault_key("SimCam", spec.group, DETECTOR, "run"), "sleep:120", ex=900)  # a run to kill
        announce(app, fleet_settings, visit, detectors=[DETECTOR])
        put_raws(fleet_settings, spec, [DETECTOR])
        wait_until(lambda: "run.start" in ledger.read_visit(rdb, "SimCam", spec.group).detectors[DETECTOR].times,
                   120, "the detector running its pipeline")
        fleet.kill("detector-1")
        rdb.delete(fault_key("SimCam", spec.group, DETECTOR, "run"))

        # The deadline gives up on the detector and records it for catch-up.
        summary = wait_until(lambda: summary_of(rdb, visit), 120, "the deadline's summary", step=0.5)
        assert summary["counts"]["failed"] == 1, summary
        assert [r.state for r in catchup.list_records(rdb)] == ["pending"]

        # Catch-up redoes it on a fresh compute worker (its catchup queue only, for now).
        fleet.detector(2)
        node = wait_until(lambda: _node(app, "detector-2@"), 120, "the second worker up")
        ctx = Context(fleet_settings)
        try:
            assert len(catchup.run_catchup(app, ctx, force=True)["sent"]) == 1
        finally:
            ctx.close()
        wait_until(lambda: [r.state for r in catchup.list_records(rdb)] == ["done"], 120, "catch-up done")
        wait_until(lambda: is_exported(rdb, "SimCam", spec.group, DETECTOR), 60, "catch-up exported")

        # Then the killed run_pipeline comes back from Redis, to the new owner of its queue.
        app.control.add_consumer(QUEUE, destination=[node], reply=True, timeout=10)
        redone_end = ledger.read_visit(rdb, "SimCam", spec.group).detectors[DETECTOR].times["run.end"]
        wait_until(lambda: read_counters(rdb, "redeliveries").get("stage=run", 0) >= 1, VISIBILITY_S + 60,
                   "the redelivery")
        wait_until(lambda: "run redelivered after" in fleet.logs() or ledger.read_visit(
            rdb, "SimCam", spec.group).detectors[DETECTOR].times["run.end"] != redone_end,
            60, "the redelivered run_pipeline handled")
        time.sleep(3.0)  # let whatever it starts (chord callback, export) finish
        record = ledger.read_visit(rdb, "SimCam", spec.group)
        assert record is not None
        det = record.detectors[DETECTOR]
        assert det.outcome == "ok" and det.stage == "run", det  # not "skipped: empty quantum graph"
        assert det.times["run.end"] == redone_end  # the redelivery ran nothing
        records = catchup.list_records(rdb)
        assert [(r.state, r.attempts) for r in records] == [("done", 1)], records
        assert sum(1 for h in records[0].history if h.get("outcome") == "ok") == 1
        final = summary_of(rdb, visit)
        assert final is not None and final["counts"].get("ok", 0) <= 1
        logs = fleet.logs()
        assert "Traceback" not in logs and "CRITICAL" not in logs, logs[-4000:]
    finally:
        app.close()

    central = Butler.from_config(fleet_settings.central_repo_uri)
    try:
        data_id = {"instrument": "SimCam", "exposure": spec.visit}
        for name in ("raw", "raw_summary"):
            refs = central.query_datasets(name, collections="*", find_first=False, explain=False,
                                          data_id=data_id)
            assert [r.dataId["detector"] for r in refs] == [DETECTOR], (name, refs)  # one set
    finally:
        central.close()


def _node(app: object, prefix: str) -> str | None:
    """The node name of the live worker whose name starts with ``prefix``."""
    replies = app.control.ping(timeout=1.0) or []  # type: ignore[attr-defined]
    return next((node for reply in replies for node in reply if node.startswith(prefix)), None)
