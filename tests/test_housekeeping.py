"""Housekeeping and scaling out: decisions, the expiry sweep, and two worker "hosts" on one broker.

The two-host test runs two compute-worker processes with different host parts in their node
names (``detector-1@host-a``, ``detector-2@host-b``) and separate local repo roots, as two
machines would, against one Redis; the queue controller balances the detector queues over
both; a visit runs each detector on its owner; the housekeeping broadcast makes each "host"
delete the local repos of detectors the other one owns; the fleet gauges and the metrics
endpoint see both workers.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery

from prompt_tasks.butler.cache import CacheEntry
from prompt_tasks.context import Context
from prompt_tasks.daytime import catchup
from prompt_tasks.fleet import housekeeping
from prompt_tasks.fleet.controller import QueueController
from prompt_tasks.fleet.gauges import fleet_gauges
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import AFFINITY_ASSIGNMENT, VISITS_RECENT, visit_key
from tests.fleetkit import Fleet, make_visit, node_alive, summary_of, wait_until

INSTRUMENT = "SimCam"
DETECTORS = [0, 1, 2, 3]
QUEUES = [detector_queue(INSTRUMENT, d) for d in DETECTORS]


# --------------------------------------------------------------------------- decisions


def test_hosts_of_node_names() -> None:
    assert housekeeping.host_of("detector-1@host-a") == "host-a"
    assert housekeeping.same_host("detector-1@host-a", "detector-7@host-a")
    assert not housekeeping.same_host("detector-1@host-a", "detector-2@host-b")


def test_repos_to_delete_keeps_what_this_host_owns() -> None:
    existing = [("SimCam", 0), ("SimCam", 1), ("SimCam", 2), ("SimCam", 3)]
    assignment = {
        "detector-1@a": [detector_queue("SimCam", 0)],
        "detector-3@a": [detector_queue("SimCam", 1)],  # same host: shares the local repo root
        "detector-2@b": [detector_queue("SimCam", 2), detector_queue("SimCam", 3)],
    }
    idle = {repo: 100.0 for repo in existing}
    assert housekeeping.repos_to_delete(existing, assignment, "detector-1@a", idle, 10.0) == [("SimCam", 2), ("SimCam", 3)]
    idle[("SimCam", 3)] = 1.0  # used a second ago: kept for now
    assert housekeeping.repos_to_delete(existing, assignment, "detector-1@a", idle, 10.0) == [("SimCam", 2)]
    assert housekeeping.repos_to_delete(existing, {}, "detector-1@a", idle, 10.0) == []  # no record: keep all


def test_datasets_to_drop_by_age_then_budget() -> None:
    now = 1000.0
    entries = {"old": CacheEntry("bias", 10, 0.0), "a": CacheEntry("flat", 40, 900.0),
               "b": CacheEntry("template", 40, 950.0), "c": CacheEntry("refcat", 40, 990.0)}
    assert housekeeping.datasets_to_drop(entries, budget=200, max_age_s=500.0, now=now) == ["old"]
    assert housekeeping.datasets_to_drop(entries, budget=80, max_age_s=500.0, now=now) == ["old", "a"]
    assert housekeeping.datasets_to_drop(entries, budget=1000, max_age_s=5000.0, now=now) == []


def test_expiry_sweep(settings: Settings, rdb: redis.Redis) -> None:
    fresh, gone = make_visit(INSTRUMENT), make_visit(INSTRUMENT)
    for visit in (fresh, gone):
        ledger.create_visit(rdb, visit, [0], 600, deadline=time.time() + 60)
    rdb.delete(visit_key(INSTRUMENT, gone.groupId))  # expired record, index entry left
    rdb.zadd(VISITS_RECENT, {"SimCam/ancient": time.time() - settings.ledger_ttl_s - 10})
    rdb.hset(f"arrivals:SimCam:{fresh.groupId}:0", "0", "{}")  # an index key without a TTL
    done = catchup.CatchupRecord(INSTRUMENT, "old", 1, "run", "failed", "r", "x",
                                 time.time() - settings.ledger_ttl_s - 10, state="done",
                                 resolved_at=time.time() - settings.ledger_ttl_s - 5)
    catchup._save(rdb, done)
    counts = housekeeping.expiry_sweep(rdb, settings)
    assert counts == {"index_removed": 3, "ttl_set": 1, "catchup_removed": 1}
    assert [g for _, g in ledger.recent(rdb)] == [fresh.groupId]
    assert 0 < rdb.ttl(f"arrivals:SimCam:{fresh.groupId}:0") <= settings.arrival_ttl_s
    assert catchup.list_records(rdb) == []


# --------------------------------------------------------------------------- two hosts


@pytest.fixture
def two_hosts(settings: Settings, tmp_path: Path) -> Iterator[tuple[Settings, Celery, Fleet, dict[str, Path]]]:
    from prompt_tasks.celery import create_app

    fleet_settings = settings.model_copy(update={"payload": "noop", "repo_idle_s": 0.0, "ledger_ttl_s": 600})
    fleet = Fleet(fleet_settings, tmp_path)
    roots = {"host-a": tmp_path / "host-a" / "local", "host-b": tmp_path / "host-b" / "local"}
    app = create_app(fleet_settings)
    try:
        fleet.aux()
        for index, host in ((1, "host-a"), (2, "host-b")):
            fleet.detector(index, host=host, env={"PROMPT_TASKS_LOCAL_REPO_ROOT": str(roots[host])})
        wait_until(lambda: node_alive(app, "aux@") and node_alive(app, "detector-", 2), 120, "workers up")
        yield fleet_settings, app, fleet, roots
    finally:
        fleet.stop_all()
        app.close()


def _fake_repo(root: Path, detector: int) -> Path:
    path = root / INSTRUMENT / f"{detector:03d}"
    path.mkdir(parents=True)
    (path / "prompt_tasks_ready").write_text(f"{INSTRUMENT}\n")
    old = time.time() - 3600
    os.utime(path, (old, old))
    return path


@pytest.mark.slow
def test_two_hosts_share_the_detectors_and_keep_only_their_repos(
        two_hosts: tuple[Settings, Celery, Fleet, dict[str, Path]], rdb: redis.Redis) -> None:
    settings, app, _, roots = two_hosts
    ctl = QueueController(app, settings, queues=QUEUES).start()
    try:
        wait_until(lambda: len(housekeeping_assignment(rdb)) == 2 and sum(
            len(qs) for qs in housekeeping_assignment(rdb).values()) == len(QUEUES), 120, "queues balanced")
        by_worker = housekeeping_assignment(rdb)
        assert sorted(housekeeping.host_of(w) for w in by_worker) == ["host-a", "host-b"]
        assert sorted(len(qs) for qs in by_worker.values()) == [2, 2]
        owner = {q: w for w, qs in by_worker.items() for q in qs}

        visit = make_visit(INSTRUMENT)
        from prompt_tasks.model.objectkeys import SnapKey, format_key
        from prompt_tasks.store.arrivals import record_arrival

        for det in DETECTORS:
            record_arrival(rdb, SnapKey(INSTRUMENT, det, visit.groupId, 0, "raw.fits"),
                           format_key(INSTRUMENT, det, visit.groupId, 0), 80, "")
        announce(app, settings, visit, detectors=DETECTORS)
        summary = wait_until(lambda: summary_of(rdb, visit), 90, "summary")
        assert summary["counts"]["ok"] == len(DETECTORS)
        record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
        assert record is not None
        for det in DETECTORS:
            assert record.detectors[det].workers["run"] == owner[detector_queue(INSTRUMENT, det)]

        # every host once held every detector's repo; housekeeping keeps only its own
        for root in roots.values():
            for det in DETECTORS:
                _fake_repo(root, det)
        ctx = Context(settings)
        try:
            replies = housekeeping.broadcast_housekeeping(app, ctx)
            assert sorted(replies) == sorted(by_worker)
            for node, reply in replies.items():
                assert reply["ok"], reply
                mine = {int(q.rsplit(".", 1)[1]) for q in by_worker[node]}
                root = roots[housekeeping.host_of(node)]
                left = sorted(int(p.name) for p in (root / INSTRUMENT).iterdir() if p.is_dir())
                assert left == sorted(mine), (node, left)
                assert sorted(reply["deleted"]) == sorted(f"{INSTRUMENT}/{d}" for d in DETECTORS if d not in mine)

            gauges = fleet_gauges(app, ctx)
            assert {"aux@faults"} | set(by_worker) <= set(gauges["alive"])
            assert set(QUEUES) <= set(gauges["queues"]) and gauges["queues"]["summary"] == 0
        finally:
            ctx.close()

        from prompt_tasks.fleet.prometheus import MetricsServer

        server = MetricsServer(app, settings).start()
        try:
            url = f"http://{settings.host}:{settings.metrics_port}/metrics"
            text = urllib.request.urlopen(url, timeout=10).read().decode()
        finally:
            server.stop()
        assert 'prompt_tasks_stage_seconds_count{stage="run"} 4.0' in text
        assert 'prompt_tasks_outcomes_total{outcome="ok",stage="run"} 4.0' in text
        assert f'prompt_tasks_queue_depth{{queue="{QUEUES[0]}"}} 0.0' in text
        for node in by_worker:
            assert f'prompt_tasks_worker_last_seen_seconds{{node="{node}"}}' in text
    finally:
        ctl.stop()


def housekeeping_assignment(rdb: redis.Redis) -> dict[str, list[str]]:
    return {str(w): json.loads(qs) for w, qs in rdb.hgetall(AFFINITY_ASSIGNMENT).items()}


def test_beat_schedule_names_registered_tasks_on_a_worker_queue(settings: Settings) -> None:
    import beat_schedule
    import prompt_tasks.fleet.operations
    import prompt_tasks.flow.tasks  # noqa: F401
    from prompt_tasks.celery import create_app

    app = create_app(settings)
    try:
        entries = beat_schedule.schedule(settings)
        assert {"catchup", "housekeeping", "expiry", "fleet-gauges"} <= set(entries)
        for entry in entries.values():
            assert entry["task"] in app.tasks
            # a worker queue, never a broadcast queue (DESIGN.md)
            assert entry["options"]["queue"] in ("default", "export")
        assert entries["catchup"]["schedule"] == settings.catchup_interval_s
        assert app.conf.beat_schedule == entries
    finally:
        app.close()


@pytest.mark.slow
def test_the_intake_process_serves_metrics(settings: Settings, rdb: redis.Redis, tmp_path: Path) -> None:
    from prompt_tasks.store.metrics import count, observe

    observe(rdb, "stage", 0.4, stage="ingest")
    count(rdb, "failures", stage="run", code="pipeline_error")
    fleet = Fleet(settings, tmp_path)
    script = Path(sys.executable).parent / "prompt-tasks"
    fleet._spawn("intake", [str(script), "intake", "--no-stream", "--no-controller", "--loglevel", "WARNING"])
    url = f"http://{settings.host}:{settings.metrics_port}/metrics"

    def scrape() -> str | None:
        try:
            return urllib.request.urlopen(url, timeout=5).read().decode()
        except OSError:
            return None

    try:
        text = wait_until(scrape, 60, "/metrics of the intake")
    finally:
        fleet.stop_all()
    assert 'prompt_tasks_stage_seconds_bucket{le="0.5",stage="ingest"} 1.0' in text
    assert 'prompt_tasks_failures_total{code="pipeline_error",stage="run"} 1.0' in text
    assert 'prompt_tasks_queue_depth{queue="wait"} 0.0' in text


@pytest.fixture(scope="session")
def central(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    from tests.butlerkit import central_fixture

    return central_fixture(tmp_path_factory, servers)


@pytest.mark.slow
def test_stale_cached_datasets_leave_a_real_local_repo(central: Settings, settings: Settings,
                                                       tmp_path: Path) -> None:
    import uuid

    from lsst.daf.butler import Butler

    from prompt_tasks.butler.cache import CacheIndex
    from prompt_tasks.butler.localrepo import repos_of
    from prompt_tasks.butler.stages import prepare
    from tests.butlerkit import NIGHT_START, next_visit, visit_spec, worker_settings

    worker = worker_settings(central, tmp_path / "local", cache_max_age_s=600.0, repo_idle_s=60.0)
    ctx = Context(worker)
    try:
        assert prepare(ctx, next_visit(visit_spec(NIGHT_START)), 1).ok
        path = repos_of(ctx).path_of(INSTRUMENT, 1)
    finally:
        ctx.close()
    cached = sorted(CacheIndex(path).entries)
    assert cached
    me = "detector-1@here"
    owned = {me: [detector_queue(INSTRUMENT, 1)]}
    assert housekeeping.housekeep_local(worker, me, owned)["dropped"] == 0  # fresh: kept
    later = time.time() + 3600  # an hour on, nothing used: everything is past its age
    result = housekeeping.housekeep_local(worker, me, owned, now=later)
    assert result == {"deleted": [], "dropped": len(cached), "repos": 1}
    assert CacheIndex(path).entries == {}
    local = Butler.from_config(str(path))
    try:
        assert local.get_many_datasets([uuid.UUID(hex=h) for h in cached]) == []
    finally:
        local.close()
    # another host's detector now: the whole repo goes
    moved = {"detector-2@elsewhere": [detector_queue(INSTRUMENT, 1)]}
    assert housekeeping.housekeep_local(worker, me, moved, now=later)["deleted"] == [f"{INSTRUMENT}/1"]
    assert not path.exists()
