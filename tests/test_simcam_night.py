"""The summit simulator: the night plan (pure) and playing it against a real intake and bucket."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.night import (
    events_of,
    next_visit_body,
    plan_night,
    raw_key,
    run_night,
    tai_now,
)
from prompt_tasks.instruments.simcam.visits import READOUT_S, day_obs_of
from prompt_tasks.model.objectkeys import parse_key
from prompt_tasks.model.visit import parse_next_visit
from prompt_tasks.objstore import make_client
from prompt_tasks.settings import Settings

START = 1795482000.0  # 2026-11-24T01:00:00 TAI


@pytest.fixture(scope="module")
def config() -> SimConfig:
    return SimConfig(n_detectors=2, size=64, bands=("g", "r", "i"), field_radius=0.05)


def test_plan_is_deterministic_and_timed(config: SimConfig) -> None:
    plan = plan_night(config, 7, START, cadence=32.0, lead=20.0, snaps=2, exptime=15.0)
    assert plan == plan_night(config, 7, START, cadence=32.0, lead=20.0, snaps=2, exptime=15.0)
    assert [p.spec.start for p in plan] == [START + 32.0 * k for k in range(7)]
    assert all(p.spec.start - p.announce_at == 20.0 for p in plan)
    groups = [p.spec.group for p in plan]
    assert groups[0] == "2026-11-24T01:00:00.000" and len(set(groups)) == 7
    assert len({p.spec.visit for p in plan}) == 7
    assert all(p.spec.day_obs == day_obs_of(START) for p in plan)
    # The filter changes every three visits, cycling through the bands.
    assert [p.spec.band for p in plan] == list("ggg" "rrr" "i")
    # Pointings stay within the survey area, camera angles and seeing vary.
    for p in plan:
        offset = ((p.spec.ra - config.field_ra) ** 2 + (p.spec.dec - config.field_dec) ** 2) ** 0.5
        assert offset <= config.field_radius * 1.05
        assert 0.6 <= p.spec.seeing <= 1.2
    assert len({round(p.spec.camera_angle, 3) for p in plan}) == 7
    # A snap is delivered one readout after its shutter closes.
    assert plan[0].snap_ready_at(1) == START + 15.0 + READOUT_S + 15.0 + READOUT_S


def test_events_are_in_time_order_and_announce_first(config: SimConfig) -> None:
    plan = plan_night(config, 3, START, cadence=40.0, lead=25.0, snaps=2)
    events = events_of(plan)
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert len(events) == 3 + 6
    for p in plan:
        announce = next(e for e in events if e.kind == "announce" and e.visit == p.index)
        snaps = [e for e in events if e.kind == "snap" and e.visit == p.index]
        assert all(announce.at + 25.0 < s.at for s in snaps)


def test_plan_refuses_overlapping_visits(config: SimConfig) -> None:
    with pytest.raises(ValueError):
        plan_night(config, 2, START, cadence=20.0, snaps=2, exptime=15.0)
    with pytest.raises(ValueError):
        plan_night(config, 2, START, lead=-1.0)


def test_next_visit_body_is_a_valid_summit_event(config: SimConfig) -> None:
    (visit,) = plan_night(config, 1, START, lead=20.0, snaps=2)
    body = next_visit_body(visit)
    parsed = parse_next_visit(json.dumps(body))
    assert parsed.groupId == visit.spec.group and parsed.instrument == "SimCam"
    assert parsed.nimages == 2 and parsed.filters == visit.spec.physical_filter
    assert body["coordinateSystem"] == 2 and body["rotationSystem"] == 2 and body["dome"] == 2
    assert body["startTime"] == START and body["position"] == [visit.spec.ra, visit.spec.dec]


def test_raw_keys_parse_back(config: SimConfig) -> None:
    (visit,) = plan_night(config, 1, START)
    key = raw_key(config, visit.spec, 1, 1)
    parsed = parse_key(key)
    assert (parsed.instrument, parsed.detector, parsed.group, parsed.snap) == ("SimCam", 1, visit.spec.group, 1)
    assert parsed.filename.endswith("_R22_S01.fits")


def _start_intake(settings: Settings, tmp_path: Path) -> subprocess.Popen[bytes]:
    from prompt_tasks.stack.components import prompt_tasks_executable
    from prompt_tasks.stack.env import child_env

    log = (tmp_path / "intake.log").open("wb")
    proc = subprocess.Popen([prompt_tasks_executable(), "intake", "--instrument", "SimCam", "--no-stream",
                             "--no-controller"], env=child_env(settings), stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"intake exited: {(tmp_path / 'intake.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"http://{settings.host}:{settings.intake_port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    pytest.fail("intake did not become healthy")


def test_run_night_announces_and_delivers_on_time(settings: Settings, rdb: redis.Redis, tmp_path: Path,
                                                   config: SimConfig) -> None:
    proc = _start_intake(settings, tmp_path)
    try:
        plan = plan_night(config, 2, tai_now() + 3.0, cadence=10.0, lead=2.0, snaps=2, exptime=2.0)
        report = run_night(settings, config, plan, [0, 1], wait_s=0.0, log=lambda _: None)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert report.rejected == {}
    assert set(report.announced) == {0, 1}
    assert report.put == 2 * 2 * 2
    groups = {p.spec.group for p in plan}  # the session's bucket also holds other tests' raws
    keys = sorted(o.object_name for o in make_client(settings).list_objects(settings.raw_bucket, "SimCam/",
                                                                             recursive=True)
                  if o.object_name.split("/")[2] in groups)
    assert keys == sorted(raw_key(config, p.spec, d, s) for p in plan for d in (0, 1) for s in range(2))
    # Every PUT raised a bucket event, and the ledger knows both visits.
    deadline = time.monotonic() + 30.0  # events land ~10 ms after each PUT; more on a loaded machine
    while rdb.llen(settings.event_list) < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rdb.llen(settings.event_list) == 8
    for index, p in enumerate(plan):
        record = report.ledger[index]
        assert record is not None and record["group"] == p.spec.group
        assert {"0", "1"} <= set(record["detectors"])


def test_fanout_messages_are_the_string_form(config: SimConfig) -> None:
    from prompt_tasks.instruments.simcam.night import fanout_messages

    (visit,) = plan_night(config, 1, START)
    messages = fanout_messages(visit, [0, 1])
    assert [m["detector"] for m in messages] == ["0", "1"]
    assert all(isinstance(v, str) for m in messages for v in m.values())
    parsed = parse_next_visit(messages[1])
    assert parsed.groupId == visit.spec.group and list(parsed.position or []) == [visit.spec.ra, visit.spec.dec]


def test_calibration_sequences_come_first(config: SimConfig) -> None:
    import io

    from astropy.io import fits

    from prompt_tasks.instruments.simcam.raws import simulate_snap
    from prompt_tasks.instruments.simcam.translator import records_from_header

    plan = plan_night(config, 2, START, cadence=32.0, calibs=["bias", "DARK", "flat"])
    assert [p.spec.imgtype for p in plan] == ["BIAS", "DARK", "FLAT", "OBJECT", "OBJECT"]
    assert [p.spec.survey for p in plan[:3]] == ["CALIB-BIAS", "CALIB-DARK", "CALIB-FLAT"]
    assert [p.spec.start for p in plan] == [START + 32.0 * k for k in range(5)]
    body = next_visit_body(plan[1])
    assert body["coordinateSystem"] == 1 and body["dome"] == 1 and body["nimages"] == 1
    header = fits.getheader(io.BytesIO(simulate_snap(config, plan[1].spec, 0, 0)))
    assert header["IMGTYPE"] == "DARK" and header["EXPTIME"] == 30.0 and header["GROUPID"] == plan[1].spec.group
    records = records_from_header(header)
    assert records["exposure"][0]["id"] == plan[1].spec.exposure(0) and "visit" not in records
    with pytest.raises(ValueError):
        plan_night(config, 1, START, calibs=["skyflat"])


def test_simulate_cli_explains_what_is_missing(tmp_path: Path, simcam_central: object) -> None:
    from click.testing import CliRunner

    from prompt_tasks.cli import main
    from prompt_tasks.stack.env import settings_env
    from prompt_tasks.stack.servers import free_port

    runner = CliRunner()
    nothing = runner.invoke(main, ["simulate", "--visits", "1"], env={"PROMPT_TASKS_STATE_DIR": str(tmp_path)})
    assert nothing.exit_code == 1 and "central init" in nothing.output
    state = str(simcam_central.settings.state_dir)  # type: ignore[attr-defined]
    down = runner.invoke(main, ["simulate", "--visits", "1"],
                         env={"PROMPT_TASKS_STATE_DIR": state, "PROMPT_TASKS_S3_PORT": str(free_port())})
    assert down.exit_code == 1 and "does not answer" in down.output
    too_many = runner.invoke(main, ["simulate", "--visits", "1", "--detectors", "5"],
                             env=settings_env(simcam_central.settings))  # type: ignore[attr-defined]
    assert too_many.exit_code == 1 and "has 2 detectors" in too_many.output


def test_run_night_rides_out_an_s3_outage_and_names_what_it_lost(tmp_path: Path, config: SimConfig) -> None:
    """A short outage is retried with backoff; a long one loses raws, which the report names."""
    import threading

    from prompt_tasks.objstore import wait_live
    from prompt_tasks.stack.servers import start_s3
    from tests.servers import private_servers
    from tests.servers import test_settings as private_settings

    own = private_settings(tmp_path / "stack")
    with private_servers(own) as settings:
        s3_dir, run_dir = settings.state_path / "s3", settings.state_path / "run"
        proc = _start_intake(settings, tmp_path)
        try:
            plan = plan_night(config, 3, tai_now() + 3.0, cadence=10.0, lead=2.0, snaps=1, exptime=1.0)
            events = [e for e in events_of(plan) if e.kind != "announce"]
            first_raws, last_raws = events[0].at, events[-1].at

            def outages() -> None:
                from prompt_tasks.stack.process import ManagedProcess
                from prompt_tasks.stack.servers import s3_signature

                def s3() -> ManagedProcess:
                    return ManagedProcess("s3", run_dir, signature=s3_signature(s3_dir))

                time.sleep(max(0.0, first_raws - tai_now() - 0.5))
                assert s3().stop()  # visit 0's raws are due now: retried until the server is back
                time.sleep(3.0)
                start_s3(settings, s3_dir, run_dir)
                assert wait_live(settings, timeout=30)
                time.sleep(max(0.0, last_raws - tai_now() - 0.5))
                assert s3().stop()  # down for good: visit 2's raws are lost

            breaker = threading.Thread(target=outages, daemon=True)
            breaker.start()
            logged: list[str] = []
            report = run_night(settings, config, plan, [0, 1], wait_s=0.0, log=logged.append,
                               **({"retry_s": 6.0} if "retry_s" in run_night.__kwdefaults__ else {}))
            breaker.join(60)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert set(report.announced) == {0, 1, 2} and report.rejected == {}
    assert report.put == 4  # visits 0 (after the outage) and 1
    lost_group = plan[2].spec.group
    assert sorted(report.undelivered) == sorted(raw_key(config, plan[2].spec, d, 0) for d in (0, 1))
    from prompt_tasks.instruments.simcam.night import undelivered_lines

    lines = undelivered_lines(report, plan)
    assert any(lost_group in line and "lost" in line for line in lines), lines
    assert not any("Traceback" in line for line in logged + lines)
