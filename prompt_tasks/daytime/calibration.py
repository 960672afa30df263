"""The raw-calibration route: a calibration exposure with no announced visit, ingested and verified.

DMTN-092 asks that calibration exposures (bias, dark, flat...) taken without a ``next_visit``
still be processed. The dispatcher (:mod:`prompt_tasks.flow.dispatcher`) sends one
``prompt_tasks.calibration.process_calib`` task per raw (detector, snap) to the ``catchup``
queue and notes it in the Redis hash ``calib-route:{instrument}:{group}`` (field
``{detector}:{snap}``). For that raw, :func:`process_calib`

1. ingests it from its ``s3://`` key into the detector's local repo
   (:mod:`prompt_tasks.butler.localrepo`, :func:`prompt_tasks.butler.ingest.ingest_snap`), with the records
   of the instrument's header translator; a raw that is not a calibration exposure, or that is
   corrupt, fails with :class:`~prompt_tasks.errors.BadRaw`;
2. selects the pipeline by configuration (:mod:`prompt_tasks.butler.selection`) for a visit made up
   from the raw (:func:`calib_visit`: survey ``CALIB-<TYPE>``, the raw's filter and time), so
   the instrument's ``calib*`` rule picks calibration verification;
3. preloads the certified master calibrations valid at the exposure's time
   (:mod:`prompt_tasks.butler.preload`) and runs the pipeline in-process (:mod:`prompt_tasks.butler.execute`)
   into ``<instrument>/prompt/<day_obs>/<pipeline>/<hash>``;
4. records the outcome (the :class:`~prompt_tasks.model.status.StageStatus` dict with the time of each
   part and the verification verdict) in the same hash, field ``{detector}:{snap}:result``, and
   writes the outputs into the central datastore and queues their registration, and the raw's
   where it is in the raw bucket (:mod:`prompt_tasks.butler.export`).

A snap whose result is recorded is not processed again (a redelivered message returns the
recorded status). No ``visit:`` ledger is written: it would make the group look announced.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from celery import Task, shared_task

from prompt_tasks.butler.execute import run_candidates
from prompt_tasks.butler.export import stage_outputs
from prompt_tasks.butler.ingest import VisitExpectation, ingest_snap
from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.preload import PreloadTarget, inputs_of, plan_preload, preload
from prompt_tasks.butler.stages import band_of, candidates_for, central_datastore
from prompt_tasks.butler.writer import hand_over
from prompt_tasks.context import Context, context_of
from prompt_tasks.errors import BadRaw, PermanentError
from prompt_tasks.flow.policy import policy_options
from prompt_tasks.flow.stage import StageTask
from prompt_tasks.flow.tasks import export
from prompt_tasks.instruments import UnknownInstrument, load_plugin
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.objstore import configure_s3
from prompt_tasks.store.keys import calib_route_key

if TYPE_CHECKING:
    import redis
    from lsst.daf.butler import Butler

__all__ = [
    "STAGE",
    "VERDICT_DATASET",
    "CalibTask",
    "calib_visit",
    "process_calib",
    "read_result",
    "record_result",
    "result_field",
    "verdict_summary",
]

log = logging.getLogger(__name__)

#: Stage name of the route (its policy in :data:`prompt_tasks.flow.policy.POLICIES`).
STAGE = "calib"
#: Dataset the verification pipeline writes its verdict to.
VERDICT_DATASET = "calib_verify_metrics"


# --------------------------------------------------------------------------- pure parts


def result_field(detector: int, snap: int) -> str:
    """The hash field holding one raw's recorded outcome."""
    return f"{int(detector)}:{int(snap)}:result"


def calib_visit(instrument: str, group: str, detector: int, calib_type: str,
                exposure: Mapping[str, Any]) -> NextVisit:
    """The visit the pipeline selection sees for a calibration raw (no ``next_visit`` came).

    ``exposure`` is the raw's ``exposure`` record (as the header translator gives it). The
    survey is ``CALIB-<TYPE>`` whatever the header's program, so the selection's calibration
    rule applies to every calibration exposure.
    """
    timespan = exposure.get("timespan")
    start = float(timespan.begin.unix_tai) if timespan is not None and timespan.begin is not None else 0.0
    return NextVisit(
        instrument=instrument, groupId=group, startTime=start, nimages=1, detector=int(detector),
        filters=str(exposure.get("physical_filter") or ""), survey=f"CALIB-{calib_type.upper()}",
    )


def verdict_summary(metrics: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The verdict of a verification (``passed``, ``failures``, its numbers rounded)."""
    if metrics is None:
        return None
    out: dict[str, Any] = {"passed": bool(metrics.get("passed")), "failures": list(metrics.get("failures") or [])}
    for name, value in metrics.items():
        if name in out:
            continue
        if isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, int | float):
            out[name] = round(float(value), 6)
    return out


# --------------------------------------------------------------------------- Redis


def record_result(client: redis.Redis, status: StageStatus, snap: int, ttl_s: int) -> None:
    """Write ``status`` as the recorded outcome of one raw of the group."""
    key = calib_route_key(status.instrument, status.group)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, result_field(status.detector, snap), json.dumps(status.to_dict(), sort_keys=True))
    pipe.expire(key, ttl_s)
    pipe.execute()


def read_result(client: redis.Redis, instrument: str, group: str, detector: int, snap: int) -> StageStatus | None:
    """The recorded outcome of one raw, or None when it has not been processed."""
    raw = client.hget(calib_route_key(instrument, group), result_field(detector, snap))
    if raw is None:
        return None
    return StageStatus.from_dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))


# --------------------------------------------------------------------------- the route


def process_calib(ctx: Context, instrument: str, group: str, detector: int, snap: int, bucket: str,
                  key: str, calib_type: str, poke_export: Callable[[], None] | None = None) -> StageStatus:
    """Ingest one calibration raw and run its verification pipeline; see the module doc.

    Returns the recorded status (already recorded: that one, unchanged). Permanent problems
    (a corrupt raw, a failed pipeline) give a failed status; transient ones raise, for the
    task to retry.
    """
    detector, snap = int(detector), int(snap)
    previous = read_result(ctx.redis, instrument, group, detector, snap)
    if previous is not None:
        log.info("calibration raw %s already processed (%s)", key, previous.outcome.value)
        return previous
    try:
        status = _process(ctx, instrument, group, detector, snap, bucket, key, calib_type, poke_export)
    except PermanentError as exc:
        status = StageStatus(STAGE, Outcome.FAILED, instrument, group, detector,
                             reason=f"{type(exc).__name__}: {exc}", code=exc.code,
                             data={"snap": snap, "key": key, "calib_type": calib_type})
    record_result(ctx.redis, status, snap, ctx.settings.ledger_ttl_s)
    log.info("calibration raw %s: %s %s", key, status.outcome.value, status.reason)
    return status


def _process(ctx: Context, instrument: str, group: str, detector: int, snap: int, bucket: str, key: str,
             calib_type: str, poke_export: Callable[[], None] | None) -> StageStatus:
    from astropy.time import Time

    times: dict[str, float] = {}
    data: dict[str, Any] = {"snap": snap, "key": key, "calib_type": calib_type}
    try:
        plugin = load_plugin(instrument)
    except UnknownInstrument as exc:
        raise BadRaw(str(exc)) from exc
    butler_instrument = plugin.instrument_class()
    repos = repos_of(ctx)

    t0 = time.perf_counter()
    local = repos.local(instrument, detector)
    times["open"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    configure_s3(ctx.settings)
    raw_run = butler_instrument.makeDefaultRawIngestRunName()
    uri = f"s3://{bucket}/{key}"
    ingested = ingest_snap(local, uri, VisitExpectation(instrument, detector, group),
                           plugin.translator, raw_run, snap=snap, key=key)
    times["ingest"] = time.perf_counter() - t0
    exposure = ingested.records["exposure"][0]
    observation_type = str(exposure.get("observation_type") or "")
    if observation_type in ("", "science"):
        raise BadRaw(f"{uri}: not a calibration exposure (observation type {observation_type!r})")
    day_obs = int(ingested.records["day_obs"][0]["id"])
    data.update(exposure=ingested.exposure, raw=ingested.dataset_id, observation_type=observation_type,
                day_obs=day_obs, raw_run=raw_run)

    visit = calib_visit(instrument, group, detector, observation_type, exposure)
    t0 = time.perf_counter()
    selection, candidates = candidates_for(ctx, visit)
    times["select"] = time.perf_counter() - t0
    data["selection"] = {"survey": visit.survey, "candidates": [c.name for c in candidates],
                         "reason": selection.reason}
    if selection.ignored or not candidates:
        return _status(instrument, group, detector, Outcome.SKIPPED, selection.reason or "no pipeline",
                       "no_pipeline", data, times)

    t0 = time.perf_counter()
    umbrella = butler_instrument.makeUmbrellaCollectionName()
    when = Time(visit.startTime, format="unix_tai", scale="tai")
    target = PreloadTarget(instrument, detector, visit.filters or None, band_of(ctx, instrument, visit.filters))
    plan = plan_preload(inputs_of([c.graph for c in candidates if c.graph is not None]), target)
    report = preload(repos.central, local, plan, [umbrella], when, None, ctx.settings.local_cache_bytes,
                     repos.path_of(instrument, detector))
    times["preload"] = time.perf_counter() - t0
    data["preload"] = report.to_dict()

    outcome = run_candidates(local, candidates, instrument, detector, [ingested.exposure], day_obs,
                             [raw_run, umbrella])
    times.update({f"run.{part}": seconds for part, seconds in outcome.times.items()})
    data["run"] = outcome.to_dict()
    if outcome.pipeline is None:
        why = "; ".join(f"{a.pipeline}: {a.reason}" for a in outcome.attempts)
        return _status(instrument, group, detector, Outcome.SKIPPED, f"no candidate pipeline has work: {why}",
                       "no_pipeline", data, times)

    verdict = verdict_summary(_read_verdict(local, outcome.run, instrument, ingested.exposure, detector))
    data["verdict"] = verdict
    hand_over(ctx, stage_outputs(
        local, central_datastore(repos.central), instrument=instrument, group=group, detector=detector,
        visit=ingested.exposure, run=str(outcome.run), outputs=outcome.outputs,
        raws={ingested.dataset_id: uri} if ctx.settings.export_raws else {},
        dataset_types=ctx.settings.export_dataset_types, client=ctx.s3, graph_refs=outcome.refs,
    ), poke_export)
    data["export_queued"] = True
    passed = "no verdict" if verdict is None else ("passed" if verdict["passed"] else "did not pass")
    return _status(instrument, group, detector, Outcome.OK, f"ran {outcome.pipeline}: {passed}", "",
                   data, times)


def _status(instrument: str, group: str, detector: int, outcome: Outcome, reason: str, code: str,
            data: dict[str, Any], times: Mapping[str, float]) -> StageStatus:
    data["times"] = {part: round(seconds, 4) for part, seconds in times.items()}
    return StageStatus(STAGE, outcome, instrument, group, detector, reason=reason, code=code, data=data)


def _read_verdict(local: Butler, run: str | None, instrument: str, exposure: int,
                  detector: int) -> Mapping[str, Any] | None:
    """The verification verdict the pipeline wrote, if it writes one."""
    from lsst.daf.butler import DatasetNotFoundError, MissingDatasetTypeError

    if run is None:
        return None
    try:
        return dict(local.get(VERDICT_DATASET, instrument=instrument, exposure=exposure, detector=detector,
                              collections=[run]))
    except (DatasetNotFoundError, MissingDatasetTypeError, LookupError):
        return None


# --------------------------------------------------------------------------- the task


class CalibTask(StageTask):
    """:class:`StageTask` for the route: its raw's outcome goes to the route's hash.

    The detector stages write the ``visit:`` ledger; a calibration group has none (writing one
    would make the group look announced), so this task keeps the base task's status
    conversion, retries, redelivery cap, fault injection, metrics and progress events, and
    records the final status with :func:`record_result` instead.
    """

    def identify(self, kwargs: dict[str, Any]) -> tuple[str, str, int, dict[str, Any]]:
        return (str(kwargs.get("instrument", "")), str(kwargs.get("group", "")),
                int(kwargs.get("detector", -1)), {"snap": int(kwargs.get("snap", 0))})

    def record_start(self, ctx: Context, instrument: str, group: str, detector: int) -> None:
        """A calibration group has no visit ledger to stamp."""

    def record_end(self, ctx: Context, status: StageStatus, kwargs: dict[str, Any]) -> None:
        # the body recorded its own result; this covers limits, retries given up, faults
        record_result(ctx.redis, status, int(kwargs.get("snap", 0)), ctx.settings.ledger_ttl_s)


@shared_task(bind=True, base=CalibTask, name="prompt_tasks.calibration.process_calib", stage=STAGE,
             chained=False, **policy_options(STAGE))
def process_calib_task(self: Task, instrument: str, group: str, detector: int, snap: int, bucket: str,
                       key: str, calib_type: str) -> StageStatus:
    """The raw-calibration route for one raw (queue ``catchup``): :func:`process_calib`.

    With ``settings.payload == "noop"`` only the bookkeeping is done (benchmarks, drills).
    """

    ctx = context_of(self.app)
    if ctx.settings.payload == "noop":
        return StageStatus(STAGE, Outcome.OK, instrument, group, int(detector),
                           data={"placeholder": True, "snap": int(snap), "key": key, "calib_type": calib_type})
    return process_calib(ctx, instrument, group, int(detector), int(snap), bucket, key,
                         calib_type, poke_export=lambda: export.apply_async(queue="export"))
