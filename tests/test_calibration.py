"""The raw-calibration route: a calibration raw with no ``next_visit`` is ingested and verified.

Real parts only: the session's Redis and S3 gateway, the session's tiny SimCam central repo
(3 detectors of 256²), a real local repo per test, raws from the SimCam simulator, the
dispatcher in a thread and a real Celery worker on the ``catchup`` queue.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from prompt_tasks.context import Context
from prompt_tasks.daytime.calibration import (
    calib_visit,
    process_calib,
    read_result,
    result_field,
    verdict_summary,
)
from prompt_tasks.model.status import Outcome
from prompt_tasks.settings import Settings
from prompt_tasks.store.keys import calib_route_key
from tests.butlerkit import NIGHT_START, central_fixture, visit_spec, worker_settings, world

DETECTOR = 1
#: Calibration exposures are taken days after the other tests' visits: exposure ids are times,
#: and what is exported lands in the session's shared central repo.
CALIB_START = NIGHT_START + 5 * 86400.0


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture
def route_settings(central: Settings, settings: Settings, tmp_path: Path) -> Settings:
    del settings  # every Redis database emptied
    return worker_settings(central, tmp_path / "local", export_max_age_s=3600.0)


@pytest.fixture
def ctx(route_settings: Settings) -> Iterator[Context]:
    context = Context(route_settings)
    yield context
    context.close()


def _put_calib(settings: Settings, imgtype: str, start: float, detector: int = DETECTOR,
               data: bytes | None = None) -> tuple[str, str]:
    """Simulate a calibration raw and PUT it under its DMTN-219 key; (group, key)."""
    from prompt_tasks.instruments.simcam.night import raw_key
    from prompt_tasks.instruments.simcam.raws import simulate_calibration
    from prompt_tasks.objstore import make_client

    spec = visit_spec(start, snaps=1, survey=f"CALIB-{imgtype}")
    if data is None:
        data = simulate_calibration(world(), imgtype, start, detector, physical_filter="SimCam-r")
    key = raw_key(world(), spec, detector, 0)
    make_client(settings).put_object(settings.raw_bucket, key, io.BytesIO(data), len(data))
    return spec.group, key


def _route(ctx: Context, group: str, key: str, calib_type: str, detector: int = DETECTOR) -> Any:
    return process_calib(ctx, "SimCam", group, detector, 0, ctx.settings.raw_bucket, key, calib_type)


# --------------------------------------------------------------------------- pure parts


def test_calib_visit_is_selected_for_verification() -> None:
    import astropy.units as u
    from astropy.time import Time
    from lsst.daf.butler import Timespan

    from prompt_tasks.butler.selection import load_selection, select
    from prompt_tasks.butler.stages import default_selection_path

    begin = Time(NIGHT_START, format="unix_tai", scale="tai")
    exposure = {"physical_filter": "SimCam-g", "timespan": Timespan(begin, begin + 1 * u.s)}
    visit = calib_visit("SimCam", "2026-11-24T02:00:00.000", 3, "flat", exposure)
    assert (visit.survey, visit.filters, visit.detector) == ("CALIB-FLAT", "SimCam-g", 3)
    assert visit.startTime == pytest.approx(NIGHT_START)
    selection = select(load_selection(default_selection_path("SimCam")), visit)
    assert [c.name for c in selection.candidates] == ["CalibVerify"]


def test_verdict_summary_keeps_the_verdict_and_numbers() -> None:
    summary = verdict_summary({"type": "bias", "passed": False, "failures": ["noise"], "noise": 5.1234567891,
                               "table": [1, 2]})
    assert summary == {"passed": False, "failures": ["noise"], "type": "bias", "noise": 5.123457}
    assert verdict_summary(None) is None
    assert result_field(4, 1) == "4:1:result" and calib_route_key("SimCam", "g") == "calib-route:SimCam:g"


# --------------------------------------------------------------------------- the plain function


def test_bias_and_flat_are_ingested_verified_recorded_and_exported(ctx: Context, rdb: redis.Redis) -> None:
    from lsst.daf.butler import Butler

    from prompt_tasks.butler.export import pending
    from prompt_tasks.butler.localrepo import repos_of
    from prompt_tasks.butler.stages import export_pending

    bias_group, bias_key = _put_calib(ctx.settings, "BIAS", CALIB_START)
    flat_group, flat_key = _put_calib(ctx.settings, "FLAT", CALIB_START + 60.0)

    for group, key, kind in ((bias_group, bias_key, "bias"), (flat_group, flat_key, "flat")):
        status = _route(ctx, group, key, kind)
        assert status.outcome is Outcome.OK, status.reason
        data = status.data
        assert data["observation_type"] == kind
        assert data["selection"]["candidates"] == ["CalibVerify"]
        assert data["run"]["pipeline"] == "CalibVerify" and data["run"]["quanta"] == {"calibVerify": 1}
        verdict = data["verdict"]
        assert verdict is not None and verdict["passed"] is True, verdict
        assert verdict["failures"] == []
        assert {"open", "ingest", "select", "preload"} <= set(data["times"])
        assert sum(data["preload"]["transferred"].values()) + sum(data["preload"]["reused"].values()) >= 1
        recorded = read_result(rdb, "SimCam", group, DETECTOR, 0)
        assert recorded is not None and recorded.to_dict() == status.to_dict()
        assert not rdb.exists(f"visit:SimCam:{group}")  # no ledger: the group stays unannounced

    local = repos_of(ctx).local("SimCam", DETECTOR)
    raws = local.query_datasets("raw", collections="SimCam/raw/all", instrument="SimCam", explain=False)
    assert len(raws) == 2
    assert pending(ctx.redis) == 2

    # a redelivered message does nothing new
    first = read_result(rdb, "SimCam", bias_group, DETECTOR, 0)
    again = _route(ctx, bias_group, bias_key, "bias")
    assert again.to_dict() == first.to_dict()  # type: ignore[union-attr]
    assert pending(ctx.redis) == 2
    assert len(local.query_datasets("raw", collections="SimCam/raw/all", instrument="SimCam", explain=False)) == 2

    # the outputs and the raws reach the central repo
    done = export_pending(ctx, lambda delay: None, force=True)
    assert done["requests"] == 2 and done["dropped"] == 0
    central = Butler.from_config(ctx.settings.central_repo_uri, writeable=False)
    try:
        runs = sorted({read_result(rdb, "SimCam", g, DETECTOR, 0).data["run"]["run"]  # type: ignore[union-attr]
                       for g in (bias_group, flat_group)})
        verdicts = central.query_datasets("calib_verify_metrics", collections=runs, instrument="SimCam",
                                          explain=False)
        exposures = {read_result(rdb, "SimCam", g, DETECTOR, 0).data["exposure"]  # type: ignore[union-attr]
                     for g in (bias_group, flat_group)}
        assert {ref.dataId["exposure"] for ref in verdicts} == exposures
        assert all(central.get(ref)["passed"] is True for ref in verdicts)
        exported = central.query_datasets("raw", collections="SimCam/raw/all", instrument="SimCam",
                                          where="exposure IN (exps)", bind={"exps": list(exposures)},
                                          explain=False)
        assert len(exported) == 2
    finally:
        central.close()


def test_corrupt_raw_fails_readably_and_is_recorded(ctx: Context, rdb: redis.Redis) -> None:
    from prompt_tasks.instruments.simcam.raws import simulate_calibration

    good = simulate_calibration(world(), "DARK", CALIB_START + 120.0, DETECTOR)
    group, key = _put_calib(ctx.settings, "DARK", CALIB_START + 120.0, data=good[: len(good) // 2])
    status = _route(ctx, group, key, "dark")
    assert status.outcome is Outcome.FAILED and status.code == "bad_raw"
    assert "truncated" in status.reason and key in status.reason
    assert read_result(rdb, "SimCam", group, DETECTOR, 0) is not None

    group, key = _put_calib(ctx.settings, "BIAS", CALIB_START + 180.0, data=b"not a FITS file at all")
    status = _route(ctx, group, key, "bias")
    assert status.code == "bad_raw" and "not a FITS file" in status.reason


def test_science_raw_is_not_verified_as_a_calibration(ctx: Context) -> None:
    from prompt_tasks.instruments.simcam.night import raw_key
    from prompt_tasks.instruments.simcam.raws import simulate_visit

    spec = visit_spec(CALIB_START + 240.0, snaps=1)
    data = simulate_visit(world(), spec, [DETECTOR])[(DETECTOR, 0)]
    key = raw_key(world(), spec, DETECTOR, 0)
    ctx.s3.put_object(ctx.settings.raw_bucket, key, io.BytesIO(data), len(data))
    status = _route(ctx, spec.group, key, "bias")
    assert status.code == "bad_raw" and "not a calibration exposure" in status.reason


# --------------------------------------------------------------------------- end to end


def test_bias_put_with_no_visit_is_verified_by_a_worker(route_settings: Settings, rdb: redis.Redis) -> None:
    from celery.contrib.testing.worker import start_worker

    from prompt_tasks.celery import create_app
    from prompt_tasks.context import drop_context
    from prompt_tasks.flow.dispatcher import CALIB_QUEUE, dispatcher_for

    app = create_app(route_settings)
    ctx = Context(route_settings)
    stop = threading.Event()
    dispatcher = dispatcher_for(ctx, known=frozenset({"SimCam"}), celery_app=app)
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.2), daemon=True)
    thread.start()
    try:
        with start_worker(app, pool="solo", queues=[CALIB_QUEUE], perform_ping_check=False,
                          hostname="compute-1@calib", shutdown_timeout=30):
            group, _ = _put_calib(route_settings, "BIAS", CALIB_START + 300.0)
            deadline = time.monotonic() + 120
            result = None
            # the body records the result, then the task records it again naming its worker
            while (result is None or "worker" not in result.data) and time.monotonic() < deadline:
                result = read_result(rdb, "SimCam", group, DETECTOR, 0)
                time.sleep(0.2)
        assert result is not None, rdb.hgetall(calib_route_key("SimCam", group))
        assert result.outcome is Outcome.OK, result.reason
        assert result.data["verdict"]["passed"] is True
        assert result.data["worker"] == "compute-1@calib"
        route = rdb.hgetall(calib_route_key("SimCam", group))
        assert set(route) == {f"{DETECTOR}:0", result_field(DETECTOR, 0)}  # the dispatcher's note and ours
    finally:
        stop.set()
        thread.join(10)
        ctx.close()
        drop_context(app, close=True)
        app.close()


def test_noop_payload_only_records(settings: Settings, rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app
    from prompt_tasks.context import drop_context
    from prompt_tasks.flow.dispatcher import CALIB_TASK

    app = create_app(settings.model_copy(update={"payload": "noop"}))
    try:
        kwargs = {"instrument": "SimCam", "group": "g1", "detector": 2, "snap": 0, "bucket": "raws",
                  "key": "SimCam/2/g1/0/bias.fits", "calib_type": "bias"}
        status = app.tasks[CALIB_TASK].apply(kwargs=kwargs).get()
        assert status["outcome"] == "ok" and status["stage"] == "calib" and status["data"]["placeholder"]
        recorded = read_result(rdb, "SimCam", "g1", 2, 0)
        assert recorded is not None and recorded.data["placeholder"] is True
        assert not rdb.exists("visit:SimCam:g1")
    finally:
        drop_context(app, close=True)
        app.close()
