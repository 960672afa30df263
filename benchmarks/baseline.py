"""The baseline: the seed's initial design, run on the same raws and the same machine.

One job per detector-visit, started when the visit is announced, in a pool of long-lived
processes (``--baseline-workers``; imports are paid once per process, which favours the
baseline). Each job, as the seed designed it:

1. creates a **fresh local repo** (``Butler.makeRepo``, instrument registered);
2. **copies the calibrations** (and templates, reference catalogs, skymap) from the central
   repo into it, every time (the project's own preload on an empty repo);
3. **waits by polling** the raw bucket: lists the detector-visit's prefix every 0.5 s until
   ``nimages`` raws are there;
4. ingests them (the project's own ingest record builders);
5. runs the pipeline with ``pipetask run`` as a **subprocess**;
6. exports the outputs and raws to the central repo itself (``transfer_from``), then deletes
   the local repo.

Each job returns the same fields the ledger holds (``dNNN.<stage>.start`` ...), so
:mod:`benchmarks.stats` reads both runs alike, and the CPU seconds of each of its stages and of
the whole job (``dNNN.<stage>.cpu_s``, ``dNNN.job.cpu_s``: the process's own time plus its
``pipetask`` subprocesses'), for the CPU accounting (:mod:`benchmarks.cpu`). The raws are PUT into a bucket of their own
(no bucket events, nobody else listening), with the same keys and bytes as the measured run.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_tasks.settings import Settings

__all__ = ["STAGES", "BaselineJob", "BaselineRun", "cpu_now", "run_baseline", "run_job"]

#: The baseline job's stages, each with its CPU seconds recorded.
STAGES = ("prepare", "wait", "ingest", "run", "export")

#: Seconds between two listings of the bucket.
POLL_S = 0.5
#: Longest wait for a detector-visit's raws.
WAIT_TIMEOUT_S = 600.0
#: Outputs never exported (as the project's default).
_BOOKKEEPING = ("_metadata", "_log", "_config")


@dataclass(frozen=True)
class BaselineJob:
    """One detector-visit for the baseline."""

    settings: Settings
    bucket: str
    visit: dict[str, Any]
    detector: int
    workdir: str


@dataclass
class BaselineRun:
    """What :func:`run_baseline` collected: per group, a ledger-like hash."""

    hashes: dict[str, dict[str, str]] = field(default_factory=dict)
    #: group → {detector: unix time its export was committed}.
    exported: dict[str, dict[int, float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def _field(detector: int, name: str) -> str:
    return f"d{int(detector):03d}.{name}"


def cpu_now() -> float:
    """CPU seconds of this process and of its reaped children (``pipetask`` subprocesses)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _pipetask() -> str:
    found = Path(sys.executable).with_name("pipetask")
    return str(found) if found.exists() else (shutil.which("pipetask") or "pipetask")


def _snaps_in_bucket(ctx: Any, bucket: str, instrument: str, group: str, detector: int) -> dict[int, str]:
    """Snap → key of the detector-visit's raws present in ``bucket`` (one listing)."""
    from prompt_tasks.errors import InvalidEvent
    from prompt_tasks.model.objectkeys import parse_key, scheme_for

    scheme = scheme_for(instrument)
    found: dict[int, str] = {}
    for obj in ctx.s3.list_objects(bucket, prefix=scheme.listing_prefix(instrument, group, detector), recursive=True):
        key = obj.object_name
        if obj.is_dir or key is None or scheme.sidecar_of(key) is not None:
            continue
        try:
            snap = parse_key(key)
        except InvalidEvent:
            continue
        if snap.group == group and snap.detector == detector:
            found[int(snap.snap)] = key
    return found


def _pipetask_argv(repo: Path, loaded: Any, inputs: list[str], run: str, instrument: str, detector: int,
                   exposures: list[int], apdb_config: str) -> list[str]:
    argv = [_pipetask(), "run", "-b", str(repo), "-i", ",".join(inputs), "--output-run", run,
            "-p", loaded.uri, "--register-dataset-types", "--no-versions",
            "-d", (f"instrument='{instrument}' AND detector={int(detector)} AND exposure IN "
                  f"({', '.join(str(e) for e in exposures)})")]
    for label, node in (loaded.graph.tasks.items() if loaded.graph is not None else ()):
        if "apdb_config_url" in node.config._fields:
            argv += ["-c", f"{label}:apdb_config_url={apdb_config}"]
    return argv


def _export(central: Any, local: Any, run: str, raw_run: str) -> int:
    """Copy the run's outputs and the raws into the central repo (retrying a locked SQLite)."""
    refs = [ref for ref in local.registry.queryDatasets(..., collections=[run], findFirst=False)
            if not ref.datasetType.name.endswith(_BOOKKEEPING)]
    refs += list(local.registry.queryDatasets("raw", collections=[raw_run], findFirst=False))
    for attempt in range(20):
        try:
            return len(central.transfer_from(local, refs, transfer="copy", skip_missing=True,
                                             register_dataset_types=True, transfer_dimensions=True))
        except Exception:
            if attempt == 19:
                raise
            time.sleep(0.5)
    return 0


def run_job(job: BaselineJob) -> dict[str, str]:
    """Process one detector-visit the seed's way; the ledger-like fields it produced."""
    from lsst.daf.butler import Butler
    from lsst.pipe.base import Instrument

    from prompt_tasks.butler.ingest import VisitExpectation, ingest_snaps
    from prompt_tasks.butler.localrepo import seed_config_for
    from prompt_tasks.butler.preload import PreloadTarget, inputs_of, plan_preload, preload
    from prompt_tasks.butler.stages import candidates_for, footprint_for
    from prompt_tasks.context import Context
    from prompt_tasks.instruments import load_plugin
    from prompt_tasks.instruments.simcam.central import apdb_config_path
    from prompt_tasks.model.visit import NextVisit

    visit = NextVisit.model_validate(job.visit)
    det = int(job.detector)
    out: dict[str, str] = {}

    cpu_marks = {"job": cpu_now()}

    def stamp(name: str, when: float | None = None) -> None:
        out[_field(det, name)] = repr(time.time() if when is None else when)
        stage, _, edge = name.partition(".")
        if edge == "start":
            cpu_marks[stage] = cpu_now()
        elif edge == "end" and stage in cpu_marks:
            out[_field(det, f"{stage}.cpu_s")] = repr(round(cpu_now() - cpu_marks[stage], 4))

    settings = job.settings.model_copy(update={"raw_bucket": job.bucket})
    ctx = Context(settings)
    repo = Path(tempfile.mkdtemp(prefix=f"{det:03d}-", dir=job.workdir))
    central = None
    local = None
    try:
        # 1-2. a fresh local repo, and everything copied into it
        stamp("prepare.start")
        central = Butler.from_config(settings.central_repo_uri, writeable=True)
        Butler.makeRepo(str(repo), config=seed_config_for(visit.instrument),
                        dimensionConfig=central.dimensions.dimensionConfig)
        local = Butler.from_config(str(repo), writeable=True)
        Instrument.from_string(visit.instrument, central.registry).register(local.registry)
        plugin = load_plugin(visit.instrument)
        instrument = plugin.instrument_class()
        _, candidates = candidates_for(ctx, visit)
        band = None
        if visit.filters:
            records = list(central.query_dimension_records(
                "physical_filter", instrument=visit.instrument, where="physical_filter = pf",
                bind={"pf": visit.filters}, explain=False))
            band = str(records[0].band) if records else None
        plan = plan_preload(inputs_of([c.graph for c in candidates if c.graph is not None]),
                            PreloadTarget(visit.instrument, det, visit.filters or None, band))
        from astropy.time import Time

        preload(central, local, plan, [instrument.makeUmbrellaCollectionName()],
                Time(visit.startTime, format="unix_tai", scale="tai"), footprint_for(ctx, visit, det),
                settings.local_cache_bytes, repo)
        stamp("prepare.end")

        # 3. poll the bucket
        stamp("wait.start")
        seen: dict[int, str] = {}
        end = time.time() + WAIT_TIMEOUT_S
        while len(seen) < max(visit.nimages, 1) and time.time() < end:
            for snap, key in _snaps_in_bucket(ctx, job.bucket, visit.instrument, visit.groupId, det).items():
                if snap not in seen:
                    seen[snap] = key
                    stamp(f"snap.{snap}")
            if len(seen) < max(visit.nimages, 1):
                time.sleep(POLL_S)
        stamp("wait.end")
        if len(seen) < max(visit.nimages, 1):
            out[_field(det, "outcome")] = "timed_out"
            return out

        # 4. ingest
        stamp("ingest.start")
        raw_run = instrument.makeDefaultRawIngestRunName()
        ingested = ingest_snaps(settings, local, seen,
                                VisitExpectation(visit.instrument, det, visit.groupId, visit.filters),
                                plugin.translator, raw_run)
        stamp("ingest.end")

        # 5. pipetask run
        stamp("run.start")
        exposures = [s.exposure for s in ingested]
        run = f"{visit.instrument}/baseline/{visit.groupId}/{det:03d}"
        inputs = [raw_run, instrument.makeUmbrellaCollectionName()]
        local.close()
        local = None
        result = None
        for loaded in candidates:
            run_name = f"{run}/{loaded.name}"
            result = subprocess.run(
                _pipetask_argv(repo, loaded, inputs, run_name, visit.instrument, det, exposures,
                               str(apdb_config_path(settings))),
                capture_output=True, text=True, check=False)
            if result.returncode == 0 and "empty" not in (result.stdout + result.stderr).lower():
                run = run_name
                break
        stamp("run.end")
        if result is None or result.returncode != 0:
            tail = (result.stderr if result is not None else "no candidate")[-400:]
            out[_field(det, "outcome")] = "failed"
            out[_field(det, "reason")] = tail
            return out

        # 6. export, then drop the repo
        cpu_marks["export"] = cpu_now()
        local = Butler.from_config(str(repo), writeable=False)
        _export(central, local, run, raw_run)
        stamp("exported")
        out[_field(det, "export.cpu_s")] = repr(round(cpu_now() - cpu_marks["export"], 4))
        out[_field(det, "outcome")] = "ok"
        out[_field(det, "stage")] = "run"
        return out
    except Exception as exc:  # noqa: BLE001 - one detector-visit's failure is reported, not raised
        out[_field(det, "outcome")] = "failed"
        out[_field(det, "reason")] = f"{type(exc).__name__}: {exc}"[-400:]
        return out
    finally:
        for butler in (local, central):
            if butler is not None:
                butler.close()
        ctx.close()
        shutil.rmtree(repo, ignore_errors=True)
        out[_field(det, "job.cpu_s")] = repr(round(cpu_now() - cpu_marks["job"], 4))


def _warm_up() -> float:
    """Import the middleware in a pool process (the seed's processes were long-lived)."""
    t0 = time.perf_counter()
    import lsst.daf.butler
    import lsst.pipe.base  # noqa: F401

    import prompt_tasks.butler.stages  # noqa: F401

    time.sleep(0.5)  # keep this process busy so the other warm-ups land on the others
    return time.perf_counter() - t0


def run_baseline(settings: Settings, bucket: str, plan: Sequence[Any], detectors: Sequence[int],
                 play: Callable[[Callable[[Any], None]], Any], workers: int, workdir: Path,
                 on_done: Callable[[int], None] | None = None, timeout: float = 1800.0) -> tuple[BaselineRun, Any]:
    """Run the baseline over ``plan``.

    ``play(announce)`` replays the plan (PUTting raws into ``bucket``) and calls
    ``announce(visit)`` for each visit: that submits the visit's detector jobs to the pool.
    Returns the collected hashes and what ``play`` returned.
    """
    from prompt_tasks.instruments.simcam.night import next_visit_body

    workdir.mkdir(parents=True, exist_ok=True)
    result = BaselineRun()
    futures: dict[str, list[Future[dict[str, str]]]] = {}
    done_at: dict[str, float] = {}
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        for warm in [pool.submit(_warm_up) for _ in range(workers)]:
            warm.result()

        def announce(visit: Any) -> None:
            body = next_visit_body(visit)
            group = visit.spec.group
            result.hashes[group] = {
                "instrument": body["instrument"], "group": group, "detectors": str(list(detectors)),
                "received": repr(time.time()),
            }
            jobs = [pool.submit(run_job, BaselineJob(settings, bucket, body, det, str(workdir)))
                    for det in detectors]
            futures[group] = jobs
            remaining = [len(jobs)]

            def finished(_: Future[dict[str, str]]) -> None:
                remaining[0] -= 1
                if on_done:
                    on_done(1)
                if remaining[0] == 0:
                    done_at[group] = time.time()

            for job in jobs:
                job.add_done_callback(finished)

        played = play(announce)
        end = time.time() + timeout
        for group, jobs in futures.items():
            exported: dict[int, float] = {}
            for det, job in zip(detectors, jobs, strict=False):
                try:
                    fields = job.result(timeout=max(end - time.time(), 1.0))
                except Exception as exc:  # noqa: BLE001 - report and go on
                    result.errors.append(f"{group} {det}: {type(exc).__name__}: {exc}")
                    continue
                when = fields.pop(_field(det, "exported"), None)
                if when is not None:
                    exported[det] = float(when)
                reason = fields.get(_field(det, "reason"))
                if reason:
                    result.errors.append(f"{group} {det}: {reason}")
                result.hashes[group].update(fields)
            result.exported[group] = exported
            if group in done_at:
                result.hashes[group]["summarized"] = repr(done_at[group])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return result, played
