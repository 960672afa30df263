"""The Butler stages of a detector-visit: prepare, ingest, run (the bodies of the stage tasks).

Each is a plain function of the process :class:`~prompt_tasks.context.Context`, the visit (the
``next_visit`` JSON dict) and the detector, returning a
:class:`~prompt_tasks.status.StageStatus`. What a long-lived worker keeps between visits lives
in the context: the open repos (:mod:`prompt_tasks.localrepo`), the loaded pipelines
(:class:`~prompt_tasks.execute.PipelineCache`), the selection configuration and each
instrument's geometry, so the middleware's imports and set-up are paid once per process.

- :func:`prepare`: select the candidate pipelines, plan the preload from their graphs,
  predict the detector's footprint, preload the local repo, warm the APDB region when a
  candidate associates with the APDB; the ledger gets what was transferred and reused and
  the time of each part.
- :func:`ingest`: the snaps ``wait_for_snap`` found, from the raw bucket into the local repo.
- :func:`run`: the first candidate with work runs in-process; an export request for its
  outputs (and the raws) is queued for the ``export`` task.
- :func:`export_pending`: the ``export`` task's body, batches of requests to the central repo.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_tasks import ledger
from prompt_tasks.errors import InvalidVisit, PipelineError
from prompt_tasks.execute import LoadedPipeline, PipelineCache, run_candidates
from prompt_tasks.export import ExportRequest, enqueue
from prompt_tasks.ingest import VisitExpectation, ingest_snaps
from prompt_tasks.localrepo import repos_of
from prompt_tasks.preload import PreloadTarget, inputs_of, plan_preload, preload
from prompt_tasks.selection import Selection, SelectionConfig, load_selection, select
from prompt_tasks.status import Outcome, StageStatus
from prompt_tasks.visit import NextVisit

if TYPE_CHECKING:
    from lsst.daf.butler import Butler
    from lsst.sphgeom import Region

    from prompt_tasks.context import Context
    from prompt_tasks.instruments import InstrumentPlugin

__all__ = [
    "candidates_for",
    "default_selection_path",
    "export_pending",
    "footprint_for",
    "ingest",
    "prepare",
    "run",
    "selection_for",
]


def _visit(raw: Mapping[str, Any] | NextVisit) -> NextVisit:
    return raw if isinstance(raw, NextVisit) else NextVisit.model_validate(dict(raw))


def _plugin(instrument: str) -> InstrumentPlugin:
    from prompt_tasks.instruments import UnknownInstrument, load_plugin

    try:
        return load_plugin(instrument)
    except UnknownInstrument as exc:
        raise InvalidVisit(str(exc)) from exc


def _instrument(plugin: InstrumentPlugin) -> Any:
    """An instance of the plugin's Butler ``Instrument`` (its collection-name methods)."""
    return plugin.instrument_class()


def default_selection_path(instrument: str) -> Path:
    """The selection YAML an instrument ships: ``pipelines.yaml`` beside its pipelines directory."""
    return _plugin(instrument).pipelines_dir.parent / "pipelines.yaml"


def selection_for(ctx: Context, instrument: str) -> SelectionConfig:
    """The selection configuration (``settings.pipelines_config`` or the instrument's own)."""
    cache: dict[str, SelectionConfig] = ctx.extras.setdefault("selection", {})
    path = ctx.settings.pipelines_config or default_selection_path(instrument)
    key = str(path)
    if key not in cache:
        cache[key] = load_selection(Path(path))
    return cache[key]


def _pipelines(ctx: Context) -> PipelineCache:
    cache = ctx.extras.get("pipelines")
    if cache is None:
        from prompt_tasks.central import apdb_config_path

        cache = PipelineCache({"apdb_config_url": str(apdb_config_path(ctx.settings))})
        ctx.extras["pipelines"] = cache
    return cache


def candidates_for(ctx: Context, visit: NextVisit) -> tuple[Selection, list[LoadedPipeline]]:
    """The visit's selection and its candidate pipelines, loaded and resolved."""
    selection = select(selection_for(ctx, visit.instrument), visit)
    universe = repos_of(ctx).central.dimensions
    cache = _pipelines(ctx)
    return selection, [cache.get(candidate, universe) for candidate in selection.candidates]


def _visit_time(visit: NextVisit) -> Any:
    from astropy.time import Time

    return Time(visit.startTime, format="unix_tai", scale="tai")


def footprint_for(ctx: Context, visit: NextVisit, detector: int) -> Region | None:
    """The detector's predicted sky footprint, padded by ``settings.preload_pad_deg``."""
    if visit.position is None or visit.coordinateSystem.name != "ICRS":
        return None
    geometries: dict[str, Any] = ctx.extras.setdefault("geometry", {})
    geometry = geometries.get(visit.instrument)
    if geometry is None:
        plugin = _plugin(visit.instrument)
        geometry = plugin.geometry(_camera(repos_of(ctx).central, plugin, visit))
        geometries[visit.instrument] = geometry
    ra, dec = visit.position
    return geometry.footprint(int(detector), float(ra), float(dec), float(visit.cameraAngle),
                              pad_deg=ctx.settings.preload_pad_deg)


def _camera(central: Butler, plugin: InstrumentPlugin, visit: NextVisit) -> Mapping[str, Any] | None:
    """The instrument's ``camera`` dataset valid at the visit, if the central repo has one."""
    from lsst.daf.butler import DatasetNotFoundError, MissingDatasetTypeError, Timespan

    calib = _instrument(plugin).makeCalibrationCollectionName()
    try:
        camera = central.get("camera", instrument=plugin.name, collections=calib,
                             timespan=Timespan.fromInstant(_visit_time(visit)))
    except (DatasetNotFoundError, MissingDatasetTypeError, LookupError):
        return None
    return dict(camera)


def _record(ctx: Context, visit: NextVisit, detector: int, fields: Mapping[str, Any]) -> None:
    ledger.set_fields(
        ctx.redis, visit.instrument, visit.groupId,
        {ledger.detector_field(detector, name): value for name, value in fields.items()},
        ctx.settings.ledger_ttl_s,
    )


def _status(stage: str, next_visit: NextVisit, detector: int, outcome: Outcome = Outcome.OK,
            reason: str = "", code: str = "", **data: Any) -> StageStatus:
    return StageStatus(stage, outcome, next_visit.instrument, next_visit.groupId, int(detector),
                       reason=reason, code=code, data=data)


# --------------------------------------------------------------------------- prepare


def prepare(ctx: Context, raw_visit: Mapping[str, Any], detector: int) -> StageStatus:
    """Select the pipelines and preload the detector's local repo for the visit."""
    visit = _visit(raw_visit)
    selection, candidates = candidates_for(ctx, visit)
    if selection.ignored:
        _record(ctx, visit, detector, {"pipelines": "[]", "skip": selection.reason})
        return _status("prepare", visit, detector, Outcome.SKIPPED, selection.reason, "no_pipeline")
    plugin = _plugin(visit.instrument)
    repos = repos_of(ctx)
    warm = repos.is_open(visit.instrument, detector)
    local = repos.local(visit.instrument, detector)
    central = repos.central
    band = _band(central, visit)
    target = PreloadTarget(visit.instrument, int(detector), visit.filters or None, band)
    plan = plan_preload(inputs_of([c.graph for c in candidates if c.graph is not None]), target)
    collections = [_instrument(plugin).makeUmbrellaCollectionName()]
    region = footprint_for(ctx, visit, detector)
    report = preload(
        central, local, plan, collections, _visit_time(visit), region,
        ctx.settings.local_cache_bytes, repos.path_of(visit.instrument, detector),
    )
    apdb_s = _warm_apdb(ctx, candidates, region)
    if apdb_s is not None:
        report.times["apdb"] = apdb_s
    summary = report.to_dict()
    _record(ctx, visit, detector, {
        "pipelines": json.dumps([c.name for c in candidates]),
        "prepare.preload": json.dumps(summary, sort_keys=True),
        "prepare.transferred": sum(report.transferred.values()),
        "prepare.reused": sum(report.reused.values()),
        **{f"prepare.{part}_s": round(seconds, 4) for part, seconds in report.times.items()},
    })
    return _status("prepare", visit, detector, candidates=[c.name for c in candidates],
                   warm=warm, preload=summary, plan=plan.to_dict())


def _warm_apdb(ctx: Context, candidates: list[LoadedPipeline], region: Region | None) -> float | None:
    """Read the APDB's DIA objects in the footprint once, when a candidate uses the APDB.

    The association task reads the same region right after the difference image is made:
    the connection is opened (once per process) and the rows are in the database's cache by
    then. Returns the seconds it took, or None when no candidate needs the APDB. A failure is
    logged, not fatal: the pipeline reports its own APDB errors.
    """
    import logging
    import time

    uses_apdb = any(
        "apdb_config_url" in node.config._fields
        for c in candidates if c.graph is not None for node in c.graph.tasks.values()
    )
    if not uses_apdb or region is None:
        return None
    start = time.perf_counter()
    try:
        apdb = ctx.extras.get("apdb")
        if apdb is None:
            from lsst.dax.apdb import Apdb

            from prompt_tasks.central import apdb_config_path

            apdb = Apdb.from_uri(str(apdb_config_path(ctx.settings)))
            ctx.extras["apdb"] = apdb
        apdb.getDiaObjects(region)
    except Exception:
        logging.getLogger(__name__).warning("APDB warm-up failed", exc_info=True)
    return time.perf_counter() - start


def _band(central: Butler, visit: NextVisit) -> str | None:
    if not visit.filters:
        return None
    records = list(central.query_dimension_records(
        "physical_filter", instrument=visit.instrument, where="physical_filter = pf",
        bind={"pf": visit.filters}, explain=False,
    ))
    return str(records[0].band) if records else None


# --------------------------------------------------------------------------- ingest


def _snaps_of(wait_status: Mapping[str, Any] | None) -> dict[int, str]:
    """Snap number → object key, from the ``wait_for_snap`` status."""
    data = (wait_status or {}).get("data") or {}
    snaps = data.get("snaps") or {}
    out: dict[int, str] = {}
    for number, arrival in snaps.items():
        key = arrival.get("key") if isinstance(arrival, Mapping) else arrival
        if key:
            out[int(number)] = str(key)
    return out


def ingest(ctx: Context, raw_visit: Mapping[str, Any], detector: int,
           wait_status: Mapping[str, Any] | None) -> StageStatus:
    """Ingest the snaps ``wait_for_snap`` found into the detector's local repo."""
    visit = _visit(raw_visit)
    snaps = _snaps_of(wait_status)
    if not snaps:
        return _status("ingest", visit, detector, Outcome.FAILED, "no snaps to ingest", "no_snaps")
    plugin = _plugin(visit.instrument)
    local = repos_of(ctx).local(visit.instrument, detector)
    expected = VisitExpectation(visit.instrument, int(detector), visit.groupId, visit.filters)
    run = _instrument(plugin).makeDefaultRawIngestRunName()
    ingested = ingest_snaps(ctx.settings, local, snaps, expected, plugin.translator, run)
    visit_ids = {r["id"] for s in ingested for r in s.records.get("visit", [])}
    day_obs = ingested[0].records["day_obs"][0]["id"]
    return _status(
        "ingest", visit, detector,
        snaps=[{"snap": s.snap, "key": s.key, "exposure": s.exposure, "dataset_id": s.dataset_id,
                "bytes": s.nbytes} for s in ingested],
        exposures=[s.exposure for s in ingested],
        raws=[s.dataset_id for s in ingested],
        visit=min(visit_ids) if visit_ids else None,
        day_obs=int(day_obs),
        raw_run=run,
    )


# --------------------------------------------------------------------------- run


def run(ctx: Context, raw_visit: Mapping[str, Any], detector: int, ingest_status: Mapping[str, Any] | None,
        poke_export: Callable[[], None] | None = None) -> StageStatus:
    """Run the first candidate pipeline with work, then queue its outputs for export."""
    visit = _visit(raw_visit)
    data = (ingest_status or {}).get("data") or {}
    exposures = [int(e) for e in data.get("exposures") or []]
    if not exposures:
        return _status("run", visit, detector, Outcome.FAILED, "no ingested exposures", "no_snaps")
    selection, candidates = candidates_for(ctx, visit)
    if selection.ignored:
        return _status("run", visit, detector, Outcome.SKIPPED, selection.reason, "no_pipeline")
    plugin = _plugin(visit.instrument)
    repos = repos_of(ctx)
    local = repos.local(visit.instrument, detector)
    inputs = [str(data.get("raw_run") or _instrument(plugin).makeDefaultRawIngestRunName()),
              _instrument(plugin).makeUmbrellaCollectionName()]
    try:
        outcome = run_candidates(local, candidates, visit.instrument, int(detector), exposures,
                                 data.get("day_obs") or "unknown", inputs)
    except PipelineError as exc:
        failed = getattr(exc, "outcome", None)
        _record(ctx, visit, detector, {"run.pipeline": failed.pipeline if failed else ""})
        return _status("run", visit, detector, Outcome.FAILED, str(exc), exc.code,
                       **(failed.to_dict() if failed else {}))
    why = "; ".join(f"{a.pipeline}: {a.reason}" for a in outcome.attempts if not a.ran)
    _record(ctx, visit, detector, {
        "run.pipeline": outcome.pipeline or "",
        "run.attempts": json.dumps([vars(a) for a in outcome.attempts]),
        **{f"run.{part}_s": round(seconds, 4) for part, seconds in outcome.times.items()},
    })
    if outcome.pipeline is None:
        return _status("run", visit, detector, Outcome.SKIPPED, f"no candidate pipeline has work: {why}",
                       "no_pipeline", **outcome.to_dict())
    request = ExportRequest(
        instrument=visit.instrument, group=visit.groupId, detector=int(detector),
        visit=int(data.get("visit") or exposures[0]),
        local_repo=str(repos.path_of(visit.instrument, detector)), run=str(outcome.run),
        outputs=outcome.outputs, raws=[str(r) for r in data.get("raws") or []],
    )
    enqueue(ctx.redis, request)
    if poke_export is not None:
        poke_export()
    # The visit summary keeps each detector's reason: say which pipeline ran and why others did not.
    ran = f"ran {outcome.pipeline}" + (f" ({why})" if why else "")
    return _status("run", visit, detector, reason=ran, **outcome.to_dict(), skipped_reason=why,
                   export_queued=True)


# --------------------------------------------------------------------------- export


def _open_local_readonly(ctx: Context) -> Callable[[str], Butler]:
    """Opener of local repos for export, read-only, kept open per process."""
    opened: dict[str, Butler] = ctx.extras.setdefault("export_sources", {})

    def open_local(path: str) -> Butler:
        from lsst.daf.butler import Butler

        butler = opened.get(path)
        if butler is None:
            if not (Path(path) / "butler.yaml").exists():
                raise FileNotFoundError(f"no local repo at {path}")
            butler = Butler.from_config(path, writeable=False)
            opened[path] = butler
        else:
            butler.registry.refresh()
        return butler

    return open_local


def export_pending(ctx: Context, schedule: Callable[[float], None], force: bool = False) -> dict[str, Any]:
    """Drain the export list into the central repo (the body of the ``export`` task).

    A failure of the central repo or of a transfer leaves the requests in the list and
    raises :class:`~prompt_tasks.errors.RetryLater`: the task retries the export later,
    never the pipeline.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from prompt_tasks.errors import RetryLater
    from prompt_tasks.export import drain

    try:
        result = drain(ctx, repos_of(ctx).central, _open_local_readonly(ctx), schedule, force=force)
    except (SQLAlchemyError, OSError, RuntimeError, ExceptionGroup) as exc:
        # registry or datastore trouble (parallel artifact copies fail as an ExceptionGroup)
        raise RetryLater(f"export failed, will retry: {type(exc).__name__}: {exc}", delay=2.0) from exc
    return result.to_dict()
