"""Fault 1 with the real Butler payload: a compute worker SIGKILLed in the middle of ``run_pipeline``.

The production roles run as processes (two compute workers under the queue controller, the
``wait`` and ``summary`` workers, the dispatcher) on the session's servers and tiny SimCam
central repo; raws come from the SimCam simulator. The detector-visit being run when its worker
is killed is redone by the other worker once the visibility timeout (shortened here) returns
the task; the visit's summary is complete and the central repo holds exactly one set of
outputs for each detector.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from prompt_tasks.butler.export import is_exported
from prompt_tasks.daytime import catchup
from prompt_tasks.fleet.controller import QueueController
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import fault_key
from prompt_tasks.store.metrics import read_counters
from tests.butlerkit import central_fixture, next_visit, put_raws, visit_spec
from tests.fleetkit import Fleet, fleet_of, node_alive, summary_of, wait_until

pytestmark = pytest.mark.slow

DETECTORS = [0, 1]
QUEUES = [detector_queue("SimCam", d) for d in DETECTORS]


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture
def fleet_settings(settings: Settings, central: Settings, tmp_path: Path) -> Settings:
    # Redelivery after a crash within ~30 s: longer than any stage takes here, so nothing runs twice
    # while its worker lives.
    return central.model_copy(update={
        "local_repo_root": tmp_path / "local", "export_max_age_s": 0.5, "ledger_ttl_s": 3600,
        "deadline_margin_s": 300.0, "visibility_timeout": 30, "restore_interval_s": 1,
    })


@pytest.fixture
def fleet(fleet_settings: Settings, tmp_path: Path) -> Iterator[Fleet]:
    with fleet_of(fleet_settings, tmp_path) as started:
        yield started


def test_worker_killed_mid_run_is_redone_with_one_set_of_outputs(fleet: Fleet, fleet_settings: Settings,
                                                                 rdb: redis.Redis) -> None:
    from lsst.daf.butler import Butler

    from prompt_tasks.celery import create_app

    app = create_app(fleet_settings)
    ctl = None
    try:
        fleet.role("wait")
        fleet.role("summary")
        fleet.detector(1)
        fleet.detector(2)
        fleet.dispatcher()
        wait_until(lambda: node_alive(app, "wait@") and node_alive(app, "summary@")
                   and node_alive(app, "detector-", 2), 180, "workers up")
        ctl = QueueController(app, fleet_settings, queues=QUEUES).start()
        wait_until(lambda: len(set(ctl.assignment.values())) == 2 and len(ctl.assignment) == 2, 120,
                   "each worker owns one detector queue")

        spec = visit_spec(time.time())
        visit = NextVisit.model_validate(next_visit(spec))
        rdb.set(fault_key("SimCam", spec.group, 0, "run"), "sleep:5", ex=900)  # a long run to kill
        announce(app, fleet_settings, visit, detectors=DETECTORS)
        put_raws(fleet_settings, spec, DETECTORS)
        wait_until(lambda: "run.start" in ledger.read_visit(rdb, "SimCam", spec.group).detectors[0].times,
                   240, "detector 0 running its pipeline")
        victim = ctl.assignment[QUEUES[0]]
        fleet.kill(victim.split("@")[0])

        summary = wait_until(lambda: summary_of(rdb, visit), 300, "the visit's summary", step=0.5)
        assert summary["counts"]["ok"] == len(DETECTORS), summary["detectors"]
        record = ledger.read_visit(rdb, "SimCam", spec.group)
        assert record is not None and record.detectors[0].workers["run"] != victim
        assert read_counters(rdb, "redeliveries").get("stage=run", 0) >= 1
        assert catchup.list_records(rdb) == []
        wait_until(lambda: all(is_exported(rdb, "SimCam", spec.group, d) for d in DETECTORS), 180, "exported")
    finally:
        if ctl is not None:
            ctl.stop()
        app.close()

    central = Butler.from_config(fleet_settings.central_repo_uri)
    try:
        runs = list(central.collections.query(f"SimCam/prompt/{spec.day_obs}/ApPipe/*"))
        assert runs
        for name in ("visit_image", "difference_image"):
            refs = central.query_datasets(name, collections=runs, find_first=False, explain=False,
                                          data_id={"instrument": "SimCam", "visit": spec.visit})
            detectors = sorted(r.dataId["detector"] for r in refs)
            assert detectors == DETECTORS, (name, detectors)  # one set: no detector twice
    finally:
        central.close()
