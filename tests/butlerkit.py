"""Shared pieces of the Butler-worker tests: a tiny SimCam world, its central repo, raws in S3.

The central repo (3 detectors of 256² pixels) is built once per session under pytest's base
temporary directory and reused by every test module that asks for it; local repos are per
test. Nothing here is mocked: real Butler repos, the private Redis and S3 gateway.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from prompt_tasks.settings import Settings

#: A tiny world: 3 detectors, 256² pixels.
WORLD: dict[str, Any] = {"n_detectors": 3, "size": 256}
#: Start of the first test visit (TAI unix s): 2026-11-24T02:00:00 TAI, calibration epoch 2.
NIGHT_START = 1795485600.0
#: A time in calibration epoch 1 (2026-03-02).
EPOCH1_START = 1772416800.0


def world() -> Any:
    from prompt_tasks.instruments.simcam.config import SimConfig

    return SimConfig(**WORLD)


def build_central(base: Path, servers: Settings) -> Settings:
    """Settings whose central repo and APDB live under ``base`` (built once, then reused)."""
    from prompt_tasks.instruments.simcam.central import init_central

    settings = servers.model_copy(update={"state_dir": base})
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (base / "central-ready").exists():
            init_central(settings, config=world())
            (base / "central-ready").write_text("ok\n")
    return settings


def worker_settings(central: Settings, local_root: Path, **overrides: Any) -> Settings:
    """``central`` with the per-test local repo root (and any other override)."""
    return central.model_copy(update={"local_repo_root": local_root, **overrides})


def central_fixture(tmp_path_factory: pytest.TempPathFactory, servers: Settings) -> Settings:
    """Body of the session fixture every module declares (see ``central`` in the tests)."""
    return build_central(tmp_path_factory.getbasetemp() / "butler-central", servers)


def visit_spec(start: float = NIGHT_START, *, ra: float = 105.0, dec: float = -15.0, camera_angle: float = 0.0,
               physical_filter: str = "SimCam-r", snaps: int = 2, survey: str = "SIMSURVEY") -> Any:
    from prompt_tasks.instruments.simcam.visits import VisitSpec

    return VisitSpec(start=start, ra=ra, dec=dec, camera_angle=camera_angle,
                     physical_filter=physical_filter, snaps=snaps, survey=survey, exptime=15.0)


def next_visit(spec: Any, **overrides: Any) -> dict[str, Any]:
    """The ``next_visit`` JSON dict announcing ``spec``."""
    values: dict[str, Any] = {
        "instrument": "SimCam",
        "groupId": spec.group,
        "coordinateSystem": 2,
        "position": [spec.ra, spec.dec],
        "startTime": spec.start,
        "rotationSystem": 2,
        "cameraAngle": spec.camera_angle,
        "filters": spec.physical_filter,
        "dome": 2,
        "duration": spec.duration,
        "nimages": spec.snaps,
        "survey": spec.survey,
    }
    values.update(overrides)
    return values


def put_raws(settings: Settings, spec: Any, detectors: Iterable[int],
             replace: dict[tuple[int, int], bytes] | None = None, config: Any = None) -> dict[tuple[int, int], str]:
    """Simulate the raws of ``spec`` (in ``config``, default the tiny world) and PUT them in the
    raw bucket; their keys."""
    import io

    from prompt_tasks.instruments.simcam.raws import simulate_visit
    from prompt_tasks.model.objectkeys import format_key
    from prompt_tasks.objstore import make_client

    client = make_client(settings)
    raws = simulate_visit(config or world(), spec, list(detectors))
    raws.update(replace or {})
    keys = {}
    for (det, snap), data in sorted(raws.items()):
        key = format_key("SimCam", det, spec.group, snap)
        client.put_object(settings.raw_bucket, key, io.BytesIO(data), len(data))
        keys[(det, snap)] = key
    return keys


def wait_status(spec: Any, detector: int, keys: dict[tuple[int, int], str]) -> dict[str, Any]:
    """A ``wait_for_snap`` status listing the snaps of ``detector`` (as the real one does)."""
    from prompt_tasks.model.status import Outcome, StageStatus

    snaps = {str(snap): {"snap": snap, "key": key, "size": 0, "etag": "", "t": 0.0}
             for (det, snap), key in keys.items() if det == detector}
    return StageStatus("wait", Outcome.OK, "SimCam", spec.group, detector, data={"snaps": snaps}).to_dict()
