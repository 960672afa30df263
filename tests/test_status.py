"""``prompt-tasks status`` against the real Redis: each detector-visit counted once, in its
current state, as the ledger says; readable in an 80-column captured terminal."""

from __future__ import annotations

import re
import time

import redis
from click.testing import CliRunner

from prompt_tasks.cli import main
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.store import ledger
from tests.fleetkit import make_visit

TTL = 600


def _end(client: redis.Redis, group: str, det: int, stage: str, outcome: Outcome = Outcome.OK) -> None:
    ledger.stamp(client, "SimCam", group, det, f"{stage}.start", TTL)
    ledger.record_stage_end(client, StageStatus(stage, outcome, "SimCam", group, det), TTL, worker="w@h")


def _through(client: redis.Redis, group: str, det: int, stages: list[str]) -> None:
    for stage in stages:
        _end(client, group, det, stage)


def test_status_counts_each_detector_once_in_its_state(settings: Settings, rdb: redis.Redis) -> None:
    visit = make_visit("SimCam", nimages=1)
    group = visit.groupId
    ledger.create_visit(rdb, visit, list(range(9)), TTL, deadline=time.time() + 600)
    for det in (0, 1, 2):  # prepared, waiting for their snaps
        _through(rdb, group, det, ["prepare"])
        ledger.stamp(rdb, "SimCam", group, det, "wait.start", TTL)
    _through(rdb, group, 3, ["prepare", "wait"])  # ingesting
    ledger.stamp(rdb, "SimCam", group, 3, "ingest.start", TTL)
    _through(rdb, group, 4, ["prepare", "wait", "ingest"])  # running its pipeline
    ledger.stamp(rdb, "SimCam", group, 4, "run.start", TTL)
    _through(rdb, group, 5, ["prepare", "wait", "ingest", "run"])  # ok
    _through(rdb, group, 6, ["prepare", "wait", "ingest"])
    _end(rdb, group, 6, "run", Outcome.SKIPPED)  # skipped
    _through(rdb, group, 7, ["prepare"])
    _end(rdb, group, 7, "wait", Outcome.TIMED_OUT)  # failed
    # detector 8: nothing started yet (waiting)
    record = ledger.read_visit(rdb, "SimCam", group)
    assert record is not None
    assert record.states() == {"waiting": 4, "running": 2, "ok": 1, "skipped": 1, "failed": 1}

    runner = CliRunner(env={**child_env(settings), "COLUMNS": "80"})
    result = runner.invoke(main, ["status", "--once"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert all(len(line) <= 80 for line in lines), result.output
    assert "…" not in result.output, result.output
    header = next(line for line in lines if "waiting" in line)
    for column in ("visit", "waiting", "running", "ok", "failed", "skipped"):
        assert column in header, result.output
    assert re.search(r"\b9\s+4\s+2\s+1\s+1\s+1\b", result.output), result.output  # det, states

    # The deadline: detector 4 (running) and the waiting ones fail; none stays "running".
    summary = ledger.build_summary(ledger.read_visit(rdb, "SimCam", group), "SimCam", group, None,
                                   "deadline", time.time())
    ledger.write_summary(rdb, "SimCam", group, summary, "deadline", TTL)
    record = ledger.read_visit(rdb, "SimCam", group)
    assert record is not None
    assert record.states() == {"failed": 7, "ok": 1, "skipped": 1}
    for det in record.detectors.values():  # the ledger's stage and progress agree
        assert det.progress.split()[0] == det.stage or det.progress == "pending", det
    assert record.detectors[4].stage == "run" and record.detectors[3].stage == "ingest"
    result = runner.invoke(main, ["status", "--once"])
    assert re.search(r"\b9\s+0\s+0\s+1\s+7\s+1\b", result.output), result.output
