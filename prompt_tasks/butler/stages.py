"""The Butler stages of a detector-visit: prepare, ingest, run (the bodies of the stage tasks).

Each is a plain function of the process :class:`~prompt_tasks.context.Context`, the visit (the
``next_visit`` JSON dict) and the detector, returning a
:class:`~prompt_tasks.model.status.StageStatus`. What a long-lived worker keeps between visits lives
in the context: the open repos (:mod:`prompt_tasks.butler.localrepo`), the loaded pipelines
(:class:`~prompt_tasks.butler.execute.PipelineCache`), the selection configuration and each
instrument's geometry, so the middleware's imports and set-up are paid once per process.

- :func:`prepare`: select the candidate pipelines, plan the preload from their graphs,
  predict the detector's footprint, preload the local repo, warm the APDB region when a
  candidate associates with the APDB; the ledger gets what was transferred and reused and
  the time of each part.
- :func:`ingest`: the snaps ``wait_for_snap`` found, from the raw bucket into the local repo.
- :func:`run`: the first candidate with work runs in-process; its outputs (and the raws)
  are written into the central datastore and a message for the registry writer is queued
  (:mod:`prompt_tasks.butler.export`);
- :func:`export_pending`: the ``export`` task's body, the registry writer
  (:mod:`prompt_tasks.butler.writer`).
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_tasks.butler.apdb import apdb_config_path, open_apdb
from prompt_tasks.butler.execute import LoadedPipeline, PipelineCache, remember_installed_packages, run_candidates
from prompt_tasks.butler.export import stage_outputs, visit_records
from prompt_tasks.butler.ingest import VisitExpectation, ingest_snaps, raw_uri
from prompt_tasks.butler.localrepo import repos_of
from prompt_tasks.butler.preload import PreloadTarget, inputs_of, plan_preload, preload
from prompt_tasks.butler.selection import (
    Candidate,
    Selection,
    SelectionConfig,
    every_candidate,
    load_selection,
    select,
)
from prompt_tasks.butler.writer import drain, hand_over
from prompt_tasks.errors import InvalidVisit, PipelineError, RetryLater
from prompt_tasks.flow.retry import is_transient
from prompt_tasks.instruments import UnknownInstrument, known_instruments, load_plugin
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.model.visit import NextVisit
from prompt_tasks.store import ledger

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from lsst.daf.butler import Butler
    from lsst.resources import ResourcePath
    from lsst.sphgeom import Region

    from prompt_tasks.context import Context
    from prompt_tasks.instruments import InstrumentPlugin
    from prompt_tasks.settings import Settings

__all__ = [
    "band_of",
    "candidates_for",
    "central_datastore",
    "default_selection_path",
    "export_pending",
    "footprint_for",
    "import_pipeline_tasks",
    "ingest",
    "prepare",
    "run",
    "selection_for",
    "warm_process",
    "warm_writer",
]


def _visit(raw: Mapping[str, Any] | NextVisit) -> NextVisit:
    return raw if isinstance(raw, NextVisit) else NextVisit.model_validate(dict(raw))


def _plugin(instrument: str) -> InstrumentPlugin:
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
    band = band_of(ctx, visit.instrument, visit.filters)
    target = PreloadTarget(visit.instrument, int(detector), visit.filters or None, band)
    plan = plan_preload(inputs_of([c.graph for c in candidates if c.graph is not None]), target)
    collections = [_instrument(plugin).makeUmbrellaCollectionName()]
    region = footprint_for(ctx, visit, detector)
    with repos.preparing(visit.instrument, detector):
        report = preload(
            central, local, plan, collections, _visit_time(visit), region,
            ctx.settings.local_cache_bytes, repos.path_of(visit.instrument, detector),
            known=repos.known(visit.instrument, detector),
        )
        repos.mark_prepared(visit.instrument, detector, visit.groupId)
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


def import_pipeline_tasks(settings: Settings) -> list[str]:
    """Import the task code of every pipeline the selection may choose; their names.

    Meant for a compute worker's main process before it forks its pool: the children inherit
    the imported modules instead of each importing them on its first visit (ApPipe's tasks
    cost ~2 CPU-s per process, and a prefork worker has one child per slot). Nothing is
    opened: no Butler, no database. The graph builder's and executor's modules and the map of
    installed distributions each quantum graph records are made ready the same way. A
    pipeline that fails to load is logged and left to the visit that chooses it, which reports
    the error.
    """
    # the graph builder and the executor, which a first quantum graph and a first run import
    import lsst.pipe.base.all_dimensions_quantum_graph_builder
    import lsst.pipe.base.separable_pipeline_executor  # noqa: F401
    from lsst.pipe.base import Pipeline

    names = []
    for candidate in _every_candidate(settings):
        try:
            Pipeline.from_uri(candidate.uri).to_graph()
        except Exception:
            log.warning("pipeline %s not imported ahead", candidate.uri, exc_info=True)
        else:
            names.append(candidate.name)
    # the installed distributions every quantum graph records the versions of (~1 CPU-s)
    remember_installed_packages(prime=True)
    return names


def warm_process(ctx: Context) -> list[str]:
    """Open what every visit of this process needs: the central repo, and every pipeline the
    selection may choose, loaded with the deployment's overrides and resolved; their names.

    Meant for a compute worker's pool process as it starts: its first visit then finds it as
    warm as the visits after (opening the central repo and the APDB and loading ApPipe take
    ~2 CPU-s). A failure is logged and left to the visit, which reports it.
    """
    from lsst.sphgeom import Angle, Circle, UnitVector3d

    universe = repos_of(ctx).central.dimensions
    cache = _pipelines(ctx)
    loaded = []
    for candidate in _every_candidate(ctx.settings):
        try:
            loaded.append(cache.get(candidate, universe))
        except Exception:
            log.warning("pipeline %s not loaded ahead", candidate.uri, exc_info=True)
    # the APDB's connection and schema, with a read of a speck of sky (when a pipeline uses it)
    _warm_apdb(ctx, loaded, Circle(UnitVector3d(1.0, 0.0, 0.0), Angle.fromDegrees(1e-4)))
    return [pipeline.name for pipeline in loaded]


def warm_writer(ctx: Context) -> None:
    """Open the central repo the registry writer registers into.

    Meant for a pool process of the writer's worker as it starts (its modules were imported
    before the fork, :func:`prompt_tasks.butler.writer.import_ahead`): the night's first export
    then finds it open.
    """
    repos_of(ctx).central  # noqa: B018 - opened and kept by the process's Repos


def _every_candidate(settings: Settings) -> list[Candidate]:
    """Every pipeline of the selection (``settings.pipelines_config`` or each instrument's own)."""
    if settings.pipelines_config:
        paths = [Path(settings.pipelines_config)]
    else:
        paths = []
        for instrument in sorted(known_instruments()):
            try:
                paths.append(default_selection_path(instrument))
            except Exception:  # noqa: BLE001 - a plugin without pipelines has none
                continue
    seen: dict[str, Candidate] = {}
    for path in paths:
        if path.is_file():
            for candidate in every_candidate(load_selection(path)):
                seen.setdefault(candidate.uri, candidate)
    return list(seen.values())


def _warm_apdb(ctx: Context, candidates: list[LoadedPipeline], region: Region | None) -> float | None:
    """Read the APDB's DIA objects in the footprint once, when a candidate uses the APDB.

    The association task reads the same region right after the difference image is made:
    the connection is opened (once per process) and the rows are in the database's cache by
    then. Returns the seconds it took, or None when no candidate needs the APDB. A failure is
    logged, not fatal: the pipeline reports its own APDB errors.
    """
    uses_apdb = any(
        "apdb_config_url" in node.config._fields
        for c in candidates if c.graph is not None for node in c.graph.tasks.values()
    )
    if not uses_apdb or region is None:
        return None
    start = time.perf_counter()
    try:
        open_apdb(ctx).getDiaObjects(region)
    except Exception:
        log.warning("APDB warm-up failed", exc_info=True)
    return time.perf_counter() - start


def band_of(ctx: Context, instrument: str, physical_filter: str | None) -> str | None:
    """The band of ``physical_filter`` in the central repo (None: no filter, or one it does not
    know). Asked once per process and filter: a filter's band never changes."""
    if not physical_filter:
        return None
    bands: dict[tuple[str, str], str] = ctx.extras.setdefault("bands", {})
    key = (instrument, physical_filter)
    if key not in bands:
        records = list(repos_of(ctx).central.query_dimension_records(
            "physical_filter", instrument=instrument, where="physical_filter = pf",
            bind={"pf": physical_filter}, explain=False,
        ))
        if not records:
            return None  # not remembered: a filter defined later is found then
        bands[key] = str(records[0].band)
    return bands[key]


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
    repos = repos_of(ctx)
    local = repos.local(visit.instrument, detector)
    prepared = _prepared_here(ctx, raw_visit, detector)
    if not prepared.ok:
        return prepared
    expected = VisitExpectation(visit.instrument, int(detector), visit.groupId, visit.filters)
    run = _instrument(plugin).makeDefaultRawIngestRunName()
    ingested = ingest_snaps(ctx.settings, local, snaps, expected, plugin.translator, run,
                            known=repos.known(visit.instrument, detector), client=ctx.s3)
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
        # for export, which would otherwise ask the registry for them (None: it asks)
        visit_records=visit_records(local.dimensions, [s.records for s in ingested], detector) or None,
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
    redone = _prepared_here(ctx, raw_visit, detector)
    if redone.ok and not _has_datasets(local, data.get("raws") or []):
        # ingested on another host (its first worker died, its queue moved here): ingest here
        # first, from the same snaps
        snaps = {int(s["snap"]): str(s["key"]) for s in data.get("snaps") or []}
        redone = ingest(ctx, raw_visit, detector, {"data": {"snaps": snaps}})
        data = redone.data if redone.ok else data
    if not redone.ok:
        return _status("run", visit, detector, redone.outcome, f"redo on this host: {redone.reason}", redone.code)
    inputs = [str(data.get("raw_run") or _instrument(plugin).makeDefaultRawIngestRunName()),
              _instrument(plugin).makeUmbrellaCollectionName()]
    day_obs = data.get("day_obs") or "unknown"
    # the visit's first attempt in this repo: no earlier attempt's outputs to look for
    first = repos.begin_run(visit.instrument, detector, day_obs, visit.groupId)
    try:
        outcome = run_candidates(local, candidates, visit.instrument, int(detector), exposures,
                                 day_obs, inputs, opener=_pipelines(ctx).open_run,
                                 nice=ctx.settings.pipeline_nice,
                                 starting=lambda: repos.starting_run(visit.instrument, detector),
                                 initialized=_pipelines(ctx).initialized, fresh=first)
    except PipelineError as exc:
        failed = getattr(exc, "outcome", None)
        _record(ctx, visit, detector, {"run.pipeline": failed.pipeline if failed else ""})
        return _status("run", visit, detector, Outcome.FAILED, str(exc), exc.code,
                       **(failed.to_dict() if failed else {}), first_attempt=first)
    why = "; ".join(f"{a.pipeline}: {a.reason}" for a in outcome.attempts if not a.ran)
    _record(ctx, visit, detector, {
        "run.pipeline": outcome.pipeline or "",
        "run.attempts": json.dumps([vars(a) for a in outcome.attempts]),
        **{f"run.{part}_s": round(seconds, 4) for part, seconds in outcome.times.items()},
    })
    if outcome.pipeline is None:
        return _status("run", visit, detector, Outcome.SKIPPED, f"no candidate pipeline has work: {why}",
                       "no_pipeline", **outcome.to_dict(), first_attempt=first)
    message = stage_outputs(
        local, central_datastore(repos.central), instrument=visit.instrument, group=visit.groupId,
        detector=int(detector), visit=int(data.get("visit") or exposures[0]), run=str(outcome.run),
        outputs=outcome.outputs, raws=_raw_sources(ctx, data) if ctx.settings.export_raws else {},
        dataset_types=ctx.settings.export_dataset_types, client=ctx.s3, graph_refs=outcome.refs,
        visit_records=data.get("visit_records"),
    )
    hand_over(ctx, message, poke_export)
    # The visit summary keeps each detector's reason: say which pipeline ran and why others did not.
    ran = f"ran {outcome.pipeline}" + (f" ({why})" if why else "")
    return _status("run", visit, detector, reason=ran, **outcome.to_dict(), skipped_reason=why,
                   export_queued=True, first_attempt=first)


def _raw_sources(ctx: Context, ingest_data: Mapping[str, Any]) -> dict[str, str]:
    """Local raw dataset id → URI of the raw bucket's object it was ingested from."""
    return {str(s["dataset_id"]): raw_uri(ctx.settings, str(s["key"])) for s in ingest_data.get("snaps") or []}


def _has_datasets(local: Butler, ids: list[str]) -> bool:
    """True when every dataset id of ``ids`` is in ``local`` (an empty list: nothing to check)."""
    wanted = [uuid.UUID(str(i)) for i in ids]
    return len(local.get_many_datasets(wanted)) == len(wanted)


def _prepared_here(ctx: Context, raw_visit: Mapping[str, Any], detector: int) -> StageStatus:
    """The detector-visit prepared on this host: an ok status at once when it was, else the
    status of preparing it now.

    A stage delivered to a host that did not prepare its visit (the first host died, the
    detector's queue moved here) would otherwise ingest into, or run on, a repo without the
    visit's calibrations, templates and collections.
    """
    visit = _visit(raw_visit)
    if repos_of(ctx).was_prepared(visit.instrument, detector, visit.groupId):
        return _status("prepare", visit, detector)
    log.info("%s detector %s: not prepared on this host, preparing first", visit.groupId, detector)
    return prepare(ctx, raw_visit, detector)


# --------------------------------------------------------------------------- export


def central_datastore(central: Butler) -> ResourcePath:
    """Root of the central repo's datastore, where compute workers write outputs."""
    return central._datastore.root


def export_pending(ctx: Context, schedule: Callable[[float], None], force: bool = False) -> dict[str, Any]:
    """Register pending export messages in the central repo (the body of the ``export`` task).

    A transient failure of the central registry or datastore leaves the messages in the list and
    raises :class:`~prompt_tasks.errors.RetryLater`: the task retries the export later,
    never the pipeline.
    """
    try:
        result = drain(ctx, repos_of(ctx).central, schedule, force=force)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # registry or object store unreachable: the messages stay in the list
        raise RetryLater(f"export failed, will retry: {type(exc).__name__}: {exc}", delay=2.0) from exc
    return result.to_dict()
