"""A night at the summit: announce visits, then deliver their raws as the camera would.

:func:`plan_night` is pure: from a start time, a cadence and the world it lays out every
visit (time, pointing, filter, camera angle, seeing, group id) and when each event happens,
``lead`` seconds of warning before a visit's first shutter opening and each snap's raws one
readout after its shutter closes. The survey pattern is a sunflower of pointings over the
survey area with the filter changing every few visits.

:func:`run_night` plays a plan against a running stack: ``next_visit`` POSTed to the intake,
raws simulated ahead of time in threads and PUT into the raw bucket on schedule, progress shown
with rich, then a per-visit table from the ledger.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import urllib3
from minio.error import MinioException

from prompt_tasks.instruments.simcam.config import SimConfig
from prompt_tasks.instruments.simcam.geometry import physical_filter
from prompt_tasks.instruments.simcam.raws import CALIBRATION_EXPTIME
from prompt_tasks.instruments.simcam.visits import READOUT_S, VisitSpec
from prompt_tasks.intake.client import IntakeClient
from prompt_tasks.model.objectkeys import format_key
from prompt_tasks.objstore import make_client
from prompt_tasks.store.keys import stream_key

__all__ = [
    "TAI_MINUS_UTC",
    "Event",
    "NightReport",
    "PlannedVisit",
    "events_of",
    "fanout_messages",
    "next_visit_body",
    "plan_night",
    "raw_key",
    "recovered",
    "retrying",
    "run_night",
    "tai_now",
    "undelivered_lines",
]

#: TAI − UTC (s), constant since 2017-01-01 (no leap second announced since).
TAI_MINUS_UTC = 37.0
#: Visits between filter changes.
FILTER_BLOCK = 3
_GOLDEN_ANGLE = math.pi * (3.0 - math.sqrt(5.0))


def tai_now() -> float:
    """The current time as TAI unix seconds."""
    return time.time() + TAI_MINUS_UTC


@dataclass(frozen=True)
class PlannedVisit:
    """One visit of the plan and when it is announced."""

    index: int
    spec: VisitSpec
    #: TAI unix seconds at which ``next_visit`` is published.
    announce_at: float

    def snap_ready_at(self, snap: int) -> float:
        """TAI unix seconds at which ``snap``'s raws land in the bucket (after readout)."""
        return self.spec.snap_end(snap) + READOUT_S


@dataclass(frozen=True, order=True)
class Event:
    """Something the summit does at ``at`` (TAI unix s): announce a visit or deliver a snap."""

    at: float
    kind: str
    visit: int
    snap: int = -1


def plan_night(config: SimConfig, n_visits: int, start: float, *, cadence: float = 32.0, lead: float = 20.0,
               snaps: int = 2, exptime: float = 15.0, bands: Sequence[str] | None = None,
               survey: str = "SIMSURVEY", calibs: Sequence[str] = ()) -> list[PlannedVisit]:
    """The visits of a night starting at ``start`` (TAI unix s of the first shutter opening).

    ``calibs`` (``BIAS``, ``DARK``, ``FLAT``) come first, one single-exposure group each, with
    survey ``CALIB-<TYPE>`` (what the pipeline selection sends to calibration verification).

    Raises
    ------
    ValueError
        The cadence is shorter than a visit (or than 10 s, the id scheme's resolution), or
        the lead is negative.
    """
    duration = snaps * (exptime + READOUT_S)
    if cadence < max(duration, 10.0):
        raise ValueError(f"cadence {cadence} s is shorter than a visit ({duration} s) or 10 s")
    if lead < 0:
        raise ValueError("lead must be >= 0")
    bands = tuple(bands or config.bands)
    rng = np.random.default_rng([config.seed, 5_000_000, int(start)])
    plan = []
    for k, imgtype in enumerate(t.upper() for t in calibs):
        calib_exptime = CALIBRATION_EXPTIME.get(imgtype)
        if calib_exptime is None:
            raise ValueError(f"unknown calibration type {imgtype!r}")
        if cadence < calib_exptime + READOUT_S:
            raise ValueError(f"cadence {cadence} s is shorter than a {imgtype} exposure")
        begin = round(start + k * cadence, 3)
        spec = VisitSpec(start=begin, ra=config.field_ra, dec=config.field_dec, camera_angle=0.0,
                         physical_filter=physical_filter(bands[0]), snaps=1, exptime=calib_exptime,
                         survey=f"CALIB-{imgtype}", target=imgtype.lower(), imgtype=imgtype)
        plan.append(PlannedVisit(len(plan), spec, begin - lead))
    start += len(plan) * cadence
    for k in range(n_visits):
        radius = config.field_radius * math.sqrt((k + 0.5) / max(n_visits, 1))
        theta = k * _GOLDEN_ANGLE
        dec = config.field_dec + radius * math.sin(theta)
        ra = config.field_ra + radius * math.cos(theta) / math.cos(math.radians(dec))
        begin = round(start + k * cadence, 3)
        spec = VisitSpec(
            start=begin, ra=ra, dec=dec, camera_angle=float(rng.uniform(0.0, 360.0)),
            physical_filter=physical_filter(bands[(k // FILTER_BLOCK) % len(bands)]), snaps=snaps,
            exptime=exptime, seeing=float(rng.uniform(0.6, 1.2)), survey=survey,
        )
        plan.append(PlannedVisit(len(plan), spec, begin - lead))
    return plan


def events_of(plan: Sequence[PlannedVisit]) -> list[Event]:
    """Every announce and snap delivery of ``plan``, in time order."""
    events = [Event(p.announce_at, "announce", p.index) for p in plan]
    events += [Event(p.snap_ready_at(s), "snap", p.index, s) for p in plan for s in range(p.spec.snaps)]
    return sorted(events)


def next_visit_body(visit: PlannedVisit, instrument: str = "SimCam", sal_index: int = 2) -> dict[str, Any]:
    """The ``next_visit`` event of ``visit``, in the summit's JSON form."""
    spec = visit.spec
    on_sky = spec.imgtype == "OBJECT"
    return {
        "salIndex": sal_index,
        "scriptSalIndex": 100000 + visit.index,
        "groupId": spec.group,
        "coordinateSystem": 2 if on_sky else 1,
        "position": [spec.ra, spec.dec] if on_sky else [0.0, 0.0],
        "startTime": spec.start,
        "rotationSystem": 2 if on_sky else 1,
        "cameraAngle": spec.camera_angle,
        "filters": spec.physical_filter,
        "dome": 2 if on_sky else 1,
        "duration": spec.duration,
        "nimages": spec.snaps,
        "instrument": instrument,
        "survey": spec.survey,
        "totalCheckpoints": 0,
        "private_sndStamp": visit.announce_at,
    }


def fanout_messages(visit: PlannedVisit, detectors: Sequence[int], instrument: str = "SimCam"
                    ) -> list[dict[str, str]]:
    """The per-detector messages Rubin's fan-out service would write for ``visit``.

    Every value is a string, ``position`` is ``"[ra, dec]"``, and each message names its
    ``detector``: the stack then processes exactly these detectors.
    """
    body = next_visit_body(visit, instrument)
    flat = {k: (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in body.items()}
    return [{**flat, "detector": str(det)} for det in detectors]


def raw_key(config: SimConfig, spec: VisitSpec, detector: int, snap: int, instrument: str = "SimCam") -> str:
    """The object key of a raw (the instrument's key scheme, ``<obs_id>_<Rxx_Syy>.fits``)."""

    seq_num = spec.exposure(snap) % 100000
    obs_id = f"SC_O_{spec.day_obs}_{seq_num:06d}"
    filename = f"{obs_id}_{config.focal_plane[detector].name}.fits"
    return format_key(instrument, detector, spec.group, snap, filename, day_obs=spec.day_obs, obs_id=obs_id)


# --- playing a plan ------------------------------------------------------------------------

@dataclass
class NightReport:
    """What :func:`run_night` did."""

    announced: dict[int, str]
    rejected: dict[int, str]
    put: int
    late_puts: int
    ledger: dict[int, dict[str, Any] | None]
    truth: dict[int, int]
    #: Transients recovered per visit (None: the APDB could not be read).
    recovery: dict[int, Any] = field(default_factory=dict)
    #: Raws that could not be PUT even after retrying: key → why.
    undelivered: dict[str, str] = field(default_factory=dict)
    #: Detectors each visit was read out on.
    n_detectors: int = 0


#: What an unreachable object store, intake or Redis raises (retried, then reported).
_TRANSIENT: tuple[type[BaseException], ...] = (MinioException, urllib3.exceptions.HTTPError, OSError,
                                               httpx.TransportError)


def retrying(call: Callable[[], Any], retry_s: float, what: str, log: Callable[[str], None]) -> Any:
    """``call()``, retried with exponential backoff (0.25 s doubling to 4 s) for up to ``retry_s``
    on connection errors; the last error is raised after that."""
    delay, end, logged = 0.25, time.monotonic() + retry_s, False
    while True:
        try:
            return call()
        except _TRANSIENT as exc:
            if time.monotonic() + delay > end:
                raise
            if not logged:
                log(f"{what}: {type(exc).__name__}; retrying for up to {retry_s:.0f} s")
                logged = True
            time.sleep(delay)
            delay = min(delay * 2, 4.0)


def undelivered_lines(report: NightReport, plan: Sequence[PlannedVisit]) -> list[str]:
    """What the night could not deliver, one line per visit; a visit never announced, or none
    of whose raws arrived, is named lost."""
    lines = []
    for p in plan:
        keys = sorted(key for key in report.undelivered if f"/{p.spec.group}/" in key)
        if p.index in report.rejected:
            lines.append(f"visit #{p.index} {p.spec.group} lost: not announced ({report.rejected[p.index]})")
        elif keys:
            lost = " lost:" if len(keys) >= p.spec.snaps * max(report.n_detectors, 1) else ":"
            lines.append(f"visit #{p.index} {p.spec.group}{lost} {len(keys)} raws not delivered "
                         f"({report.undelivered[keys[0]]})")
    return lines


class _Summit:
    """The clients a night uses: the intake (or the fan-out stream) and the raw bucket."""

    def __init__(self, settings: Any, config: SimConfig, detectors: Sequence[int], via: str,
                 log: Callable[[str], None], retry_s: float = 30.0) -> None:
        self.settings, self.config, self.detectors, self.via, self.log = settings, config, detectors, via, log
        self.retry_s = retry_s
        self.intake = IntakeClient.from_settings(settings)
        self.s3 = make_client(settings)

    def close(self) -> None:
        self.intake.close()

    def announce(self, visit: PlannedVisit) -> str | None:
        """Publish ``visit``'s next_visit (retried while the intake or Redis is unreachable);
        None when accepted, else why not."""
        if self.via == "stream":
            import redis as redis_lib


            client = redis_lib.Redis.from_url(self.settings.events_redis, decode_responses=True)

            def publish() -> None:
                try:
                    pipe = client.pipeline(transaction=False)
                    for message in fanout_messages(visit, self.detectors):
                        pipe.xadd(stream_key("SimCam"), message)  # type: ignore[arg-type]
                    pipe.execute()  # all of a visit's messages, or none
                except (redis_lib.ConnectionError, redis_lib.TimeoutError) as exc:
                    raise ConnectionError(str(exc)) from exc

            try:
                retrying(publish, self.retry_s, f"next_visit {visit.spec.group}", self.log)
            except (redis_lib.RedisError, OSError) as exc:
                return f"fan-out stream: {exc}"
            finally:
                client.close()
            return None

        def post() -> Any:
            outcome = self.intake.next_visit(json.dumps(next_visit_body(visit)))
            if outcome.status == 503:  # the intake is up, its broker or Redis is not
                raise ConnectionError(outcome.describe())
            return outcome

        try:
            outcome = retrying(post, self.retry_s, f"next_visit {visit.spec.group}", self.log)
        except (httpx.HTTPError, OSError) as exc:
            return f"intake: {exc}"
        return None if outcome.accepted else outcome.describe()

    def put(self, key: str, data: bytes) -> None:
        """PUT one raw, retried while the object store is unreachable."""
        retrying(lambda: self.s3.put_object(self.settings.raw_bucket, key, io.BytesIO(data), len(data),
                                            content_type="application/fits"),
                 self.retry_s, f"PUT {key}", self.log)

    def ledger(self, group: str) -> dict[str, Any] | None:
        """The ledger record of a visit (None if unknown or unreachable)."""
        try:
            outcome = self.intake.visit("SimCam", group)
        except httpx.HTTPError as exc:
            self.log(f"ledger of {group}: {exc}")
            return None
        return outcome.body if outcome.accepted else None


def run_night(settings: Any, config: SimConfig, plan: Sequence[PlannedVisit], detectors: Sequence[int], *,
              progress: Any = None, wait_s: float = 120.0, log: Callable[[str], None] = print,
              threads: int = 4, via: str = "http", retry_s: float = 30.0) -> NightReport:
    """Play ``plan`` against the stack of ``settings``; return what happened.

    ``via`` is ``http`` (POST the summit event to the intake; the stack picks the detectors)
    or ``stream`` (one message per detector on the fan-out stream ``instrument:SimCam``, so
    exactly ``detectors`` are processed). ``progress`` is a rich ``Progress`` (or None).
    Raws are simulated in threads from the moment a visit is announced. After the last PUT,
    waits up to ``wait_s`` for every visit's summary in the ledger, then scores transient
    recovery from the APDB.

    The object store, the intake and Redis are retried with backoff for up to ``retry_s``
    per call; what still fails is recorded (``report.rejected``, ``report.undelivered``: see
    :func:`undelivered_lines`) and the night goes on.
    """
    from prompt_tasks.instruments.simcam.raws import simulate_visit
    from prompt_tasks.instruments.simcam.sky import Sky

    sky = Sky(config)
    by_index = {p.index: p for p in plan}
    raws: dict[int, Future[dict[tuple[int, int], bytes]]] = {}
    report = NightReport({}, {}, 0, 0, {}, {}, n_detectors=len(detectors))
    n_raws = sum(p.spec.snaps for p in plan) * len(detectors)
    bar_visits = progress.add_task("visits announced", total=len(plan)) if progress else None
    bar_raws = progress.add_task("raws delivered", total=n_raws) if progress else None
    summit = _Summit(settings, config, detectors, via, log, retry_s=retry_s)
    try:
        with ThreadPoolExecutor(threads) as pool:
            for event in events_of(plan):
                visit = by_index[event.visit]
                if event.kind == "announce":
                    raws[event.visit] = pool.submit(simulate_visit, config, visit.spec, detectors, None, sky)
                time.sleep(max(0.0, event.at - tai_now()))
                if event.kind == "announce":
                    problem = summit.announce(visit)
                    if problem is None:
                        report.announced[event.visit] = visit.spec.group
                    else:
                        report.rejected[event.visit] = problem
                        log(f"next_visit {visit.spec.group}: {problem}")
                    if progress:
                        progress.advance(bar_visits)
                    continue
                images = raws[event.visit].result()
                report.late_puts += int(tai_now() - event.at > 1.0)
                keys = [raw_key(config, visit.spec, det, event.snap) for det in detectors]
                puts = {key: pool.submit(summit.put, key, images[(det, event.snap)])
                        for key, det in zip(keys, detectors, strict=False)}
                for key, future in puts.items():
                    try:
                        future.result()
                        report.put += 1
                    except _TRANSIENT as exc:
                        report.undelivered[key] = f"{type(exc).__name__}: {str(exc)[:160]}"
                failed = [key for key in keys if key in report.undelivered]
                if failed:
                    log(f"visit {visit.spec.group} snap {event.snap}: {len(failed)} raws not delivered")
                if progress:
                    progress.advance(bar_raws, len(keys))
                if event.snap == visit.spec.snaps - 1:
                    raws.pop(event.visit, None)
        truths = {p.index: {det: sky.truth(p.spec, det) for det in detectors}
                  for p in plan if p.spec.imgtype == "OBJECT"}
        report.truth = {index: sum(len(t) for t in by_det.values()) for index, by_det in truths.items()}
        _await_summaries(summit, by_index, report, wait_s)
    finally:
        summit.close()
    for index, truth in truths.items():
        report.recovery[index] = recovered(settings, config, by_index[index].spec, truth, log)
    return report


def _await_summaries(summit: _Summit, by_index: dict[int, PlannedVisit], report: NightReport,
                     wait_s: float) -> None:
    """Poll the ledger until every announced visit has its summary, or ``wait_s`` passed."""
    end = time.monotonic() + wait_s
    pending = set(report.announced)
    while True:
        for index in sorted(pending):
            record = summit.ledger(by_index[index].spec.group)
            report.ledger[index] = record
            if record and record.get("summary"):
                pending.discard(index)
        if not pending or time.monotonic() > end:
            return
        time.sleep(1.0)


def recovered(settings: Any, config: SimConfig, spec: VisitSpec, truths: dict[int, Any],
              log: Callable[[str], None] = print, mag_limit: float = 23.0) -> Any:
    """Transients of ``spec`` found in the APDB, summed over detectors (None if unreadable).

    A transient counts as injected when its difference-image flux is brighter than
    ``mag_limit`` (a variable near its mean shows nothing to find).
    """
    from prompt_tasks.instruments.simcam.central import apdb_config_path
    from prompt_tasks.instruments.simcam.recovery import Recovery, apdb_sources, score

    path = apdb_config_path(settings)
    if not path.exists():
        return None
    total = Recovery(0, 0, 0)
    for det, truth in truths.items():
        region = config.focal_plane.footprint(det, spec.ra, spec.dec, spec.camera_angle)
        try:
            found = apdb_sources(str(path), region, spec.visit, det, spec.time())
        except Exception as exc:  # noqa: BLE001 - a report must not fail the night
            log(f"APDB read for {spec.group} detector {det}: {exc}")
            return None
        det_ra = [] if found is None else found["ra"].to_numpy()
        det_dec = [] if found is None else found["dec"].to_numpy()
        total = total + score(truth["ra"], truth["dec"], truth["diff_mag"], det_ra, det_dec, mag_limit=mag_limit)
    return total
