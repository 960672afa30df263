"""Detector affinity end to end: the queue controller and real compute-worker processes.

Three ``prompt-tasks``-style detector workers run as subprocesses (the project's own
``detector`` role command line, stopped by the pid we started), an in-process worker serves
``wait`` and ``summary``, and a :class:`QueueController` in this process assigns the nine
``RouteCam`` detector queues. The module has its own private Redis (a flush by another test
would drop the workers' remote-control bindings); each visit has its own group id. Rebalance times are logged,
never asserted.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.contrib.testing.worker import start_worker
from click.testing import CliRunner

from prompt_tasks.fleet.controller import (
    QueueController,
    adopted_assignment,
    plan_actions,
    read_assignment,
    read_events,
)
from prompt_tasks.flow.router import announce, detector_queue
from prompt_tasks.model.objectkeys import SnapKey, format_key
from prompt_tasks.model.visit import NextVisit, tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.stack.servers import redis_binary
from prompt_tasks.store import ledger
from prompt_tasks.store.arrivals import record_arrival
from prompt_tasks.store.keys import fault_key
from tests.servers import celery_app_for, missing, private_servers
from tests.servers import test_settings as private_settings
from workers import ROLES, celery_argv

log = logging.getLogger(__name__)

INSTRUMENT = "RouteCam"
DETECTORS = list(range(9))
QUEUES = [detector_queue(INSTRUMENT, d) for d in DETECTORS]
AUX = "aux@routing"
_groups = itertools.count()


@pytest.fixture(scope="module")
def route_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """A private Redis for this module alone (no other test can flush it under the workers)."""
    try:
        redis_binary()
    except FileNotFoundError as exc:
        missing(str(exc))
    # payload "noop": these tests exercise routing, not the Butler work (RouteCam has no plugin)
    settings = private_settings(tmp_path_factory.mktemp("routing"), ledger_ttl_s=600, payload="noop")
    with private_servers(settings, s3=False) as ready:
        yield ready


@pytest.fixture(scope="module")
def app(route_settings: Settings) -> Iterator[Celery]:
    with celery_app_for(route_settings) as celery_app:
        yield celery_app


@pytest.fixture(scope="module")
def aux_worker(app: Celery) -> Iterator[object]:
    with start_worker(app, pool="threads", concurrency=8, queues=["default", "wait", "summary"],
                      perform_ping_check=True, hostname=AUX, shutdown_timeout=30) as worker:
        yield worker


class Fleet:
    """Detector-worker subprocesses, started and stopped by the pids we recorded."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.env = child_env(settings)
        self.log_dir = log_dir
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, index: int) -> None:
        argv = celery_argv(ROLES["detector"], index=index, loglevel="WARNING")
        with open(self.log_dir / f"detector-{index}.log", "ab") as out:
            self.procs[index] = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                 start_new_session=True)

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(index)
        if proc.poll() is None:
            os.killpg(proc.pid, sig)  # the group we created: the worker and its pool child
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)

    def stop_all(self) -> None:
        for index in list(self.procs):
            self.kill(index, signal.SIGTERM)


@pytest.fixture(scope="module")
def fleet(route_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    started = Fleet(route_settings, tmp_path_factory.mktemp("fleet"))
    try:
        for index in (1, 2, 3):
            started.start(index)
        yield started
    finally:
        started.stop_all()


@pytest.fixture(scope="module")
def controller(app: Celery, route_settings: Settings, aux_worker: object, fleet: Fleet) -> Iterator[QueueController]:
    ctl = QueueController(app, route_settings, queues=QUEUES).start()
    try:
        _wait_until(lambda: _settled(ctl, 3), 120, "three detector workers with their queues")
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture
def rdb(route_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(route_settings.events_redis, decode_responses=True)
    yield client
    client.close()


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.25)
    raise AssertionError(f"not reached within {timeout} s: {what}")


def _settled(ctl: QueueController, n_workers: int) -> bool:
    """True when n workers live and every queue is consumed by exactly its assigned owner."""
    observed = ctl.observe()
    if len(observed) != n_workers or sorted(observed) != ctl.workers:
        return False
    consumers = {q: [w for w, queues in observed.items() if q in queues] for q in QUEUES}
    return all(consumers[q] == [ctl.assignment.get(q)] for q in QUEUES)


def _visit(rdb: redis.Redis) -> NextVisit:
    """A visit of one snap per detector, its raws already indexed as arrived."""
    visit = NextVisit.model_validate({
        "instrument": INSTRUMENT, "groupId": f"2026-11-24T03:00:{next(_groups):02d}.000",
        "startTime": tai_now() + 3600, "nimages": 1,
    })
    for det in DETECTORS:
        snap = SnapKey(INSTRUMENT, det, visit.groupId, 0, "raw.fits")
        record_arrival(rdb, snap, format_key(INSTRUMENT, det, visit.groupId, 0), 1, "")
    return visit


def _run_visit(app: Celery, settings: Settings, rdb: redis.Redis) -> dict[int, dict[str, str]]:
    """Run one visit to its summary; detector → stage → worker that ran it."""
    visit = _visit(rdb)
    announced = announce(app, settings, visit, detectors=DETECTORS)
    summary = app.AsyncResult(announced.chord_id).get(timeout=120)
    assert summary["counts"]["ok"] == len(DETECTORS), summary
    record = ledger.read_visit(rdb, INSTRUMENT, visit.groupId)
    assert record is not None
    return {det: dict(rec.workers) for det, rec in record.detectors.items()}


def _check_on_owners(ran: dict[int, dict[str, str]], owners: dict[str, str]) -> None:
    for det, stages in ran.items():
        owner = owners[detector_queue(INSTRUMENT, det)]
        assert {stages[s] for s in ("prepare", "ingest", "run")} == {owner}, (det, stages, owner)
        assert stages["wait"] == AUX


def _log_rebalances(rdb: redis.Redis, label: str) -> None:
    for event in read_events(rdb, 3):
        log.warning("%s: rebalance at %.3f took %.3f s, moved %d, joined %s, left %s", label, event["t"],
                    event["took_s"], len(event["moved"]), event["joined"], event["left"])


def test_assignment_is_balanced_and_visible(controller: QueueController, route_settings: Settings,
                                            rdb: redis.Redis) -> None:
    by_worker = read_assignment(rdb)
    assert sorted(by_worker) == controller.workers and len(by_worker) == 3
    assert sorted(q for qs in by_worker.values() for q in qs) == QUEUES
    assert all(len(qs) == 3 for qs in by_worker.values())
    from prompt_tasks.cli import main

    runner = CliRunner()
    env = child_env(route_settings)
    out = runner.invoke(main, ["workers", "--json"], env=env)
    assert out.exit_code == 0, out.output
    shown = json.loads(out.output)
    assert shown["assignment"] == by_worker
    # every worker beats, consuming at least what it was assigned
    assert all(set(queues) <= set(shown["beats"][worker]) for worker, queues in by_worker.items())
    table = runner.invoke(main, ["workers"], env=env)
    assert table.exit_code == 0 and "RouteCam" in table.output and "last rebalance" in table.output
    status = runner.invoke(main, ["status", "--once"], env=env)
    assert status.exit_code == 0, status.output


def test_each_detector_runs_on_its_owner_visit_after_visit(app: Celery, controller: QueueController,
                                                           route_settings: Settings, rdb: redis.Redis) -> None:
    owners = dict(controller.assignment)
    history: dict[int, set[str]] = {det: set() for det in DETECTORS}
    for _ in range(3):
        ran = _run_visit(app, route_settings, rdb)
        _check_on_owners(ran, owners)
        for det, stages in ran.items():
            history[det].add(stages["run"])
    assert all(len(workers) == 1 for workers in history.values())
    assert controller.assignment == owners


def test_killed_worker_queues_move_and_return(app: Celery, controller: QueueController, fleet: Fleet,
                                             route_settings: Settings, rdb: redis.Redis) -> None:
    original = dict(controller.assignment)
    victim = next(w for w in controller.workers if w.startswith("detector-2@"))
    fleet.kill(2)
    took = _wait_until(lambda: _settled(controller, 2), 120, "queues moved off the killed worker")
    log.warning("queues moved %.1f s after the kill", took)
    _log_rebalances(rdb, "after kill")
    degraded = dict(controller.assignment)
    assert victim not in degraded.values()
    for queue, worker in original.items():  # survivors kept their queues
        if worker != victim:
            assert degraded[queue] == worker
    _check_on_owners(_run_visit(app, route_settings, rdb), degraded)

    fleet.start(2)
    took = _wait_until(lambda: _settled(controller, 3), 180, "the restarted worker got its queues back")
    log.warning("assignment restored %.1f s after the restart", took)
    _log_rebalances(rdb, "after restart")
    assert controller.assignment == original
    _check_on_owners(_run_visit(app, route_settings, rdb), original)


def test_plan_actions_touches_only_managed_queues() -> None:
    desired = {"q1": "w1", "q2": "w2", "q3": "w2"}
    observed = {"w1": {"q1", "q2", "catchup"}, "w2": {"q3"}, "w3": {"q1"}}
    cancel, add = plan_actions(desired, observed, ["q1", "q2", "q3"])
    assert cancel == [("w1", "q2"), ("w3", "q1")]
    assert add == [("w2", "q2")]


def test_soft_time_limit_becomes_a_failed_status(app: Celery, controller: QueueController, rdb: redis.Redis) -> None:
    """A stage over its soft time limit (prefork worker) returns a status instead of raising."""
    group = f"2026-11-24T04:00:{next(_groups):02d}.000"
    rdb.set(fault_key(INSTRUMENT, group, 0, "prepare"), "sleep:10", ex=300)
    signature = app.signature(
        "prompt_tasks.prepare_repo",
        kwargs={"visit": {"instrument": INSTRUMENT, "groupId": group}, "detector": 0},
        queue=detector_queue(INSTRUMENT, 0),
    ).set(soft_time_limit=1, time_limit=30)
    status = signature.apply_async().get(timeout=60)
    assert status["outcome"] == "failed" and status["code"] == "time_limit"
    assert status["data"]["worker"] == controller.assignment[detector_queue(INSTRUMENT, 0)]


def test_adopted_assignment() -> None:
    observed = {"w2": {"q1", "q3", "catchup"}, "w1": {"q1", "q2"}}
    assert adopted_assignment(observed, ["q1", "q2", "q3"]) == {"q1": "w1", "q2": "w1", "q3": "w2"}


def test_a_restarted_controller_moves_nothing(app: Celery, controller: QueueController,
                                              route_settings: Settings) -> None:
    _wait_until(lambda: _settled(controller, 3), 120, "a settled fleet")
    second = QueueController(app, route_settings, queues=QUEUES)
    try:
        event = second.tick()
    finally:
        second.stop()
    assert second.assignment == controller.assignment
    assert event is not None and event["moved"] == [] and (event["added"], event["cancelled"]) == (0, 0)
