"""The visit timeline: bars from a ledger record, and the PNG through the CLI."""

from __future__ import annotations

import time
from pathlib import Path

import redis
from click.testing import CliRunner

from prompt_tasks.cli import main
from prompt_tasks.daytime.report import draw, markers, timeline
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.store import ledger
from tests.fleetkit import make_visit

INSTRUMENT = "SimCam"


def _visit_in_ledger(rdb: redis.Redis) -> tuple[str, float]:
    """A visit of three detectors: 0 done, 1 failed in run, 2 still waiting."""
    visit = make_visit(INSTRUMENT, nimages=1)
    t0 = time.time() - 30
    ledger.create_visit(rdb, visit, [0, 1, 2], 600, deadline=t0 + 60, received=t0)
    for det in (0, 1, 2):
        for stage, start, end in (("prepare", 1, 3), ("wait", 3, 10), ("ingest", 10, 11), ("run", 11, 15)):
            if det == 2 and stage != "prepare":
                if stage == "wait":
                    ledger.stamp(rdb, INSTRUMENT, visit.groupId, det, "wait.start", 600, when=t0 + start)
                break
            ledger.stamp(rdb, INSTRUMENT, visit.groupId, det, f"{stage}.start", 600, when=t0 + start)
            failed = det == 1 and stage == "run"
            status = StageStatus(stage, Outcome.FAILED if failed else Outcome.OK, INSTRUMENT, visit.groupId, det,
                                 reason="PipelineError: boom" if failed else "",
                                 code="pipeline_error" if failed else "", finished=t0 + end)
            ledger.record_stage_end(rdb, status, 600, worker="detector-1@h")
        ledger.stamp_snap(rdb, INSTRUMENT, visit.groupId, det, 0, 600, when=t0 + 9)
    return visit.groupId, t0


def test_timeline_bars(rdb: redis.Redis) -> None:
    group, t0 = _visit_in_ledger(rdb)
    record = ledger.read_visit(rdb, INSTRUMENT, group)
    assert record is not None
    bars = timeline(record, now=t0 + 20)
    by = {(b.detector, b.stage): b for b in bars}
    assert abs(by[(0, "run")].start - 11.0) < 1e-6 and abs(by[(0, "run")].end - 15.0) < 1e-6
    assert by[(1, "run")].failed and by[(1, "run")].label == "pipeline_error"
    assert not by[(0, "run")].failed
    assert by[(2, "wait")].running and abs(by[(2, "wait")].end - 20.0) < 1e-6
    assert (2, "ingest") not in by
    marks = markers(record)
    assert sorted(marks) == ["deadline", "expected end"] and abs(marks["deadline"] - 60.0) < 1e-6


def test_draw_and_cli(settings: Settings, rdb: redis.Redis, tmp_path: Path) -> None:
    group, _ = _visit_in_ledger(rdb)
    record = ledger.read_visit(rdb, INSTRUMENT, group)
    assert record is not None
    png = draw(record, tmp_path / "direct.png", time.time())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(main, ["report", INSTRUMENT, group, "-o", str(out)], env=child_env(settings))
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "3 detectors" in result.output
    missing = CliRunner().invoke(main, ["report", INSTRUMENT, "no-such-group"], env=child_env(settings))
    assert missing.exit_code != 0 and "no visit" in missing.output
