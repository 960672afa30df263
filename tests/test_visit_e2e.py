"""Whole visits through the chord on real workers: SimCam raws in S3, real repos, the APDB.

A real worker process (prefork, one child, as in production) consumes SimCam's detector
queues, ``export``, ``summary`` and ``default``; an in-process worker (threads) the ``wait``
queue; a dispatcher thread turns bucket events into arrivals. Raws come from the SimCam simulator and are PUT into the private
S3 gateway; the central repo is the session's (3 detectors of 256² pixels).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker

from prompt_tasks.butler.export import is_exported
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.objstore import configure_s3
from prompt_tasks.settings import Settings
from prompt_tasks.store.keys import visit_key
from tests.butlerkit import central_fixture, next_visit, put_raws, visit_spec, world
from tests.servers import celery_app_for

pytestmark = pytest.mark.slow

DETECTORS = [0, 1]
_visits = itertools.count()


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    return central_fixture(tmp_path_factory, servers)


@pytest.fixture(scope="module")
def e2e_settings(central: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    client = redis.Redis.from_url(central.redis_url(0))
    client.flushall()
    client.close()
    return central.model_copy(update={
        "local_repo_root": tmp_path_factory.mktemp("e2e-local"),
        "export_max_age_s": 0.5,
        "ledger_ttl_s": 3600,
        "deadline_margin_s": 240.0,
    })


@pytest.fixture(scope="module")
def app(e2e_settings: Settings) -> Iterator[Celery]:
    with celery_app_for(e2e_settings) as celery_app:
        yield celery_app


@pytest.fixture(scope="module")
def fleet(app: Celery, e2e_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A detector worker process, an in-process ``wait`` worker and a dispatcher thread."""
    from prompt_tasks.context import context_of
    from prompt_tasks.flow.dispatcher import dispatcher_for
    from prompt_tasks.stack.env import child_env

    ctx = context_of(app)
    dispatcher = dispatcher_for(ctx)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop, 0.1), daemon=True)
    thread.start()
    queues = [detector_queue("SimCam", d) for d in range(3)] + ["export", "summary", "default"]
    argv = [sys.executable, "-m", "celery", "-A", "prompt_tasks", "worker", "-P", "prefork", "-c", "1",
            "-Q", ",".join(queues), "-n", "detector-1@e2e", "--loglevel", "WARNING", "--without-mingle",
            "--without-gossip"]
    log_path = tmp_path_factory.mktemp("e2e-logs") / "detector-1.log"
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, env=child_env(e2e_settings), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        with start_worker(app, pool="threads", concurrency=8, queues=["wait"], perform_ping_check=False,
                          hostname="wait@e2e", shutdown_timeout=30):
            _wait_for_worker(app, "detector-1@e2e", proc, log_path)
            yield
    finally:
        stop.set()
        thread.join(10)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the session we created: the worker and its child
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _wait_for_worker(app: Celery, name: str, proc: subprocess.Popen[bytes], log_path: Path,
                     timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited: {log_path.read_text()[-3000:]}")
        replies = app.control.ping(destination=[name], timeout=1.0) or []
        if any(name in reply for reply in replies):
            return
    raise AssertionError(f"worker {name} did not answer within {timeout} s: {log_path.read_text()[-3000:]}")


@pytest.fixture
def rdb(e2e_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(e2e_settings.events_redis, decode_responses=True)
    yield client
    client.close()


def _spec(**overrides: Any) -> Any:
    # visits start "now" (the wait stage compares startTime with the clock), a minute apart
    return visit_spec(time.time() + 60.0 * next(_visits), **overrides)


def _run_visit(app: Celery, settings: Settings, spec: Any, detectors: list[int] = DETECTORS,
               replace: dict[tuple[int, int], bytes] | None = None, **visit_fields: Any) -> dict[str, Any]:
    """Announce ``spec``, PUT its raws, wait for the chord's summary."""
    visit = NextVisit.model_validate(next_visit(spec, **visit_fields))
    announced = announce(app, settings, visit, detectors=detectors)
    put_raws(settings, spec, detectors, replace=replace)
    return app.AsyncResult(announced.chord_id).get(timeout=240)


def _detector_fields(rdb: redis.Redis, spec: Any, detector: int) -> dict[str, str]:
    raw = rdb.hgetall(visit_key("SimCam", spec.group))
    prefix = f"d{detector:03d}."
    return {key[len(prefix):]: value for key, value in raw.items() if key.startswith(prefix)}


def _wait_exported(rdb: redis.Redis, spec: Any, detectors: list[int], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if all(is_exported(rdb, "SimCam", spec.group, d) for d in detectors):
            return
        time.sleep(0.2)
    raise AssertionError(f"{spec.group} not exported within {timeout} s")


def _dia_sources(settings: Settings, visit: int) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.apdb_uri)
    try:
        with engine.connect() as conn:
            columns = {c["name"] for c in sqlalchemy.inspect(engine).get_columns("DiaSource")}
            column = "visit" if "visit" in columns else "ccdVisitId"
            return int(conn.execute(sqlalchemy.text(
                f'SELECT COUNT(*) FROM "DiaSource" WHERE "{column}" = :v'), {"v": visit}).scalar() or 0)
    finally:
        engine.dispose()


def test_full_visit_ends_in_the_central_repo_and_the_apdb(app: Celery, fleet: None, e2e_settings: Settings,
                                                          rdb: redis.Redis) -> None:
    from lsst.daf.butler import Butler

    spec = _spec()
    summary = _run_visit(app, e2e_settings, spec)
    assert summary["counts"]["ok"] == len(DETECTORS), json.dumps(summary["detectors"], indent=1)
    for det in DETECTORS:
        fields = _detector_fields(rdb, spec, det)
        assert fields["run.pipeline"] == "ApPipe"
        assert int(fields["prepare.transferred"]) > 0
    _wait_exported(rdb, spec, DETECTORS)
    configure_s3(e2e_settings)  # the raws are read from the S3 server, whatever another test set
    central = Butler.from_config(e2e_settings.central_repo_uri)
    try:
        raws = central.query_datasets("raw", collections="SimCam/raw/all", find_first=False, explain=False,
                                      data_id={"instrument": "SimCam"}, where="group = g",
                                      bind={"g": spec.group})
        assert {(r.dataId["exposure"], r.dataId["detector"]) for r in raws} == {
            (spec.exposure(s), d) for s in range(spec.snaps) for d in DETECTORS}
        runs = list(central.collections.query(f"SimCam/prompt/{spec.day_obs}/ApPipe/*"))
        assert len(runs) == 1
        for name in ("visit_image", "difference_image", "dia_source"):
            refs = central.query_datasets(name, collections=runs[0], explain=False,
                                          data_id={"instrument": "SimCam", "visit": spec.visit})
            assert {r.dataId["detector"] for r in refs} == set(DETECTORS), name
        # raws (named where they are, in the raw bucket) and outputs are readable through the central repo
        assert central.get(raws[0]).data.shape == (256, 256)
        regions = {(r.visit, r.detector) for r in central.query_dimension_records(
            "visit_detector_region", instrument="SimCam", explain=False)}
        assert {(spec.visit, d) for d in DETECTORS} <= regions
    finally:
        central.close()
    assert _dia_sources(e2e_settings, spec.visit) > 0


def test_second_visit_reuses_the_local_repo(app: Celery, fleet: None, e2e_settings: Settings,
                                            rdb: redis.Redis) -> None:
    first = _spec()
    assert _run_visit(app, e2e_settings, first, detectors=[0])["counts"]["ok"] == 1
    second = _spec()
    summary = _run_visit(app, e2e_settings, second, detectors=[0])
    assert summary["counts"]["ok"] == 1
    fields = _detector_fields(rdb, second, 0)
    preload = json.loads(fields["prepare.preload"])
    assert preload["transferred"].get("calibration", 0) == 0
    assert preload["reused"]["calibration"] == 3
    assert fields["prepare.transferred"] == "0"


def test_outside_the_templates_falls_back_and_none_skips(app: Celery, fleet: None, e2e_settings: Settings,
                                                         rdb: redis.Redis) -> None:
    away = _spec(ra=105.5)
    summary = _run_visit(app, e2e_settings, away, detectors=[1])
    assert summary["counts"]["ok"] == 1, summary["detectors"]
    fields = _detector_fields(rdb, away, 1)
    assert fields["run.pipeline"] == "SingleFrame"
    attempts = json.loads(fields["run.attempts"])
    # no template: ApPipe's graph is empty (or, on a repo that never had templates, its build
    # fails for want of the template dataset type); either way SingleFrame runs
    assert attempts[0]["pipeline"] == "ApPipe" and not attempts[0]["ran"]
    assert attempts[0]["reason"] == "empty quantum graph" or "template_coadd" in attempts[0]["reason"]
    assert summary["detectors"]["1"]["reason"].startswith("ran SingleFrame (ApPipe: ")

    engineering = _spec(survey="engineering-tests")
    skipped = _run_visit(app, e2e_settings, engineering, detectors=[1])
    assert skipped["counts"]["skipped"] == 1
    assert skipped["detectors"]["1"]["stage"] == "prepare" and "ignore" in skipped["detectors"]["1"]["reason"]


def test_corrupt_raw_fails_only_its_detector_visit(app: Celery, fleet: None, e2e_settings: Settings,
                                                   rdb: redis.Redis) -> None:
    from prompt_tasks.instruments.simcam.raws import simulate_snap

    spec = _spec()
    good = simulate_snap(world(), spec, 1, 1)
    summary = _run_visit(app, e2e_settings, spec, replace={(1, 1): good[: len(good) // 3]})
    assert summary["detectors"]["0"]["outcome"] == "ok"
    bad = summary["detectors"]["1"]
    assert bad["outcome"] == "failed" and bad["stage"] == "ingest" and bad["code"] == "bad_raw"
    assert "truncated" in bad["reason"]
    after = _run_visit(app, e2e_settings, _spec(), detectors=[1])
    assert after["counts"]["ok"] == 1, after["detectors"]
