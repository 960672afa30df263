"""The main job's simulated night: the steps ``prompt-tasks demo`` runs once the stack is up.

1. the central repo (and APDB) of SimCam, initialized if needed;
2. a short night played against the running stack: a few visits over the camera's 9
   detectors, two snaps each, in several filters (plus one engineering visit the selection
   ignores), with progress lines as visits are announced, raws delivered and summaries written;
3. the per-visit table: detectors ok / failed / skipped, the pipeline chosen, the median time
   of each stage, the detection quality against the simulator's truth (injected transients
   found, false DIA sources per detector-visit, scored by ``run_night`` from the APDB), a
   closing line for the night, and where the outputs went (central collections, APDB).

Each step is a function of :class:`prompt_tasks.demo.steps.DemoRun` returning the text to show;
``prompt-tasks demo --skip night`` leaves them out.
"""

from __future__ import annotations

import dataclasses
import io
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prompt_tasks.butler.export import pending
from prompt_tasks.demo.run import DemoRun, Step
from prompt_tasks.settings import Settings
from prompt_tasks.store import ledger
from prompt_tasks.store.keys import visit_key

__all__ = ["NIGHT_CADENCE_S", "NIGHT_FILTERS", "NIGHT_VISITS", "SKIP_NAME", "butler_hint", "night_quality", "night_steps",
           "visit_rows"]

#: Science visits of the demo night, and their filters in order.
NIGHT_VISITS = 3
NIGHT_FILTERS = ("SimCam-g", "SimCam-r", "SimCam-i")
#: Seconds between visit starts (two 15 s snaps take 32 s).
NIGHT_CADENCE_S = 45.0


#: Name to give ``prompt-tasks demo --skip`` to leave the night out (quick health checks, tests).
SKIP_NAME = "night"


def _skipped(run: DemoRun) -> bool:
    return SKIP_NAME in run.skip


def _central(run: DemoRun) -> str:
    from prompt_tasks.instruments.simcam.central import init_central

    if _skipped(run):
        return f"skipped (--skip {SKIP_NAME})"

    lines: list[str] = []
    steps = init_central(run.settings, echo=lambda line: run.report("central", line) or lines.append(line))
    created = sum(step.created for step in steps)
    run.results["central_created"] = created
    what = "created" if created else "already there"
    return f"central repo {run.settings.central_repo_uri} ({what}), APDB {run.settings.apdb_uri}"


def _plan(settings: Settings, start: float) -> tuple[Any, list[Any]]:
    from lsst.daf.butler import Butler

    from prompt_tasks.instruments.simcam.central import read_camera
    from prompt_tasks.instruments.simcam.config import SimConfig
    from prompt_tasks.instruments.simcam.night import plan_night

    butler = Butler.from_config(settings.central_repo_uri)
    try:
        config = SimConfig.model_validate(read_camera(butler) or {})
    finally:
        butler.close()
    plan = plan_night(config, NIGHT_VISITS + 1, start, cadence=NIGHT_CADENCE_S, lead=20.0, snaps=2)
    night = []
    for planned, physical_filter in zip(plan, [*NIGHT_FILTERS, NIGHT_FILTERS[0]], strict=True):
        survey = "engineering" if planned.index == NIGHT_VISITS else planned.spec.survey
        spec = dataclasses.replace(planned.spec, physical_filter=physical_filter, survey=survey)
        night.append(dataclasses.replace(planned, spec=spec))
    return config, night


def _night(run: DemoRun) -> str:
    from prompt_tasks.instruments.simcam.night import run_night, tai_now

    if _skipped(run):
        return f"skipped (--skip {SKIP_NAME})"
    settings = run.settings
    config, plan = _plan(settings, tai_now() + 25.0)
    detectors = list(range(config.n_detectors))
    run.report("night", f"{len(plan)} visits x {len(detectors)} detectors x 2 snaps, filters "
                        f"{', '.join(p.spec.physical_filter for p in plan)}; first group {plan[0].spec.group}")

    def log(line: str) -> None:
        run.report("night", line)

    started = time.monotonic()
    watcher = _Watcher(settings, [p.spec.group for p in plan], log)
    watcher.start()
    try:
        report = run_night(settings, config, plan, detectors, progress=None, wait_s=300.0, log=log, via="http")
    finally:
        watcher.stop()
    run.results["night"] = {"plan": plan, "report": report, "detectors": detectors}
    done = sum(1 for p in plan if (report.ledger.get(p.index) or {}).get("summary"))
    return (f"{len(report.announced)} visits announced, {report.put} raws delivered, {done} visits summarized "
            f"in {time.monotonic() - started:.0f} s")


class _Watcher:
    """Reports each visit's progress from the ledger while the night runs (a thread)."""

    def __init__(self, settings: Settings, groups: list[str], log: Any) -> None:
        import threading

        self.settings, self.groups, self.log = settings, groups, log
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._seen: dict[str, str] = {}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import redis

        client = redis.Redis.from_url(self.settings.events_redis, decode_responses=True)
        try:
            while not self._stop.wait(2.0):
                for group in self.groups:
                    record = ledger.read_visit(client, "SimCam", group)
                    if record is None:
                        continue
                    progress = record.progress()
                    line = ", ".join(f"{n} {state}" for state, n in sorted(progress.items()))
                    if record.summary is not None:
                        line = "summarized: " + ", ".join(f"{n} {k}" for k, n in record.counts().items())
                    if self._seen.get(group) != line:
                        self._seen[group] = line
                        self.log(f"{group}: {line}")
        except Exception as exc:  # noqa: BLE001 - progress display only
            self.log(f"(progress display stopped: {exc})")
        finally:
            client.close()


def visit_rows(settings: Settings, plan: list[Any], detectors: list[int],
               recovery: dict[int, Any] | None = None) -> list[dict[str, Any]]:
    """One row per visit of ``plan`` from the ledger: outcomes, pipelines, stage times.

    ``recovery`` (visit index → :class:`~prompt_tasks.instruments.simcam.recovery.Recovery`
    summed over detectors, or None when the APDB was unreadable) adds ``recovery`` to the rows.
    """
    import redis

    client = redis.Redis.from_url(settings.events_redis, decode_responses=True)
    rows = []
    try:
        for planned in plan:
            spec = planned.spec
            raw = client.hgetall(visit_key("SimCam", spec.group))
            record = ledger.parse_record(raw)
            summary = (record.summary if record else None) or {}
            counts = summary.get("counts") or (record.counts() if record else {})
            pipelines = Counter(raw.get(ledger.detector_field(d, "run.pipeline")) or "-" for d in detectors)
            reasons = Counter((entry.get("reason") or "")[:60] for entry in (summary.get("detectors") or {}).values()
                              if entry.get("outcome") != "ok")
            rows.append({
                "group": spec.group, "filter": spec.physical_filter, "survey": spec.survey,
                "ok": counts.get("ok", 0), "failed": counts.get("failed", 0) + counts.get("timed_out", 0),
                "skipped": counts.get("skipped", 0),
                "pipelines": ", ".join(f"{name} x{n}" for name, n in pipelines.most_common() if name != "-") or "-",
                "stage_times": summary.get("stage_times") or {},
                "after_end_s": summary.get("after_expected_end_s"),
                "reasons": dict(reasons),
                "day_obs": spec.day_obs,
                "recovery": (recovery or {}).get(getattr(planned, "index", None)),
            })
    finally:
        client.close()
    return rows


def _quality_cells(row: dict[str, Any]) -> tuple[str, str]:
    """The row's transients found / injected and false DIA sources per ok detector-visit, as text."""
    scored = row.get("recovery")
    if scored is None:
        return "-", "-"
    return f"{scored.found}/{scored.injected}", f"{scored.false / max(row['ok'], 1):.1f}"


def night_quality(rows: list[dict[str, Any]]) -> str:
    """The night's detection quality: completeness and false detections per detector-visit."""
    from prompt_tasks.instruments.simcam.recovery import Recovery

    scored = [row for row in rows if row.get("recovery") is not None]
    if not scored:
        return "detection quality: not scored (no science visit, or the APDB could not be read)"
    total = sum((row["recovery"] for row in scored), Recovery(0, 0, 0))
    detector_visits = sum(max(row["ok"], 1) for row in scored)
    return (f"detection quality over {len(scored)} visits: {total.found} of {total.injected} injected transients "
            f"found (completeness {total.completeness:.0%}), {total.false / detector_visits:.1f} false DIA sources "
            f"per detector-visit ({total.false} in {detector_visits})")


def _wait_exported(settings: Settings, timeout: float = 120.0) -> int:
    """Wait until the export queue is empty; the requests still pending."""
    import redis

    client = redis.Redis.from_url(settings.events_redis, decode_responses=True)
    try:
        end = time.monotonic() + timeout
        while (left := pending(client)) and time.monotonic() < end:
            time.sleep(0.5)
        return left
    finally:
        client.close()


def _output_runs(settings: Settings, day_obs: list[int]) -> list[tuple[str, int]]:
    """The night's output RUN collections in the central repo and their dataset counts."""
    from lsst.daf.butler import Butler

    butler = Butler.from_config(settings.central_repo_uri)
    try:
        runs = sorted(name for d in day_obs for name in butler.collections.query(f"SimCam/prompt/{d}/*"))
        return [(name, len(butler.query_all_datasets(name, find_first=False, limit=None))) for name in runs]
    finally:
        butler.close()


def _dia_sources(settings: Settings) -> str:
    """How many DIA sources the APDB holds (a count, or why it could not be read)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.apdb_uri)
    try:
        with engine.connect() as conn:
            return str(conn.execute(sqlalchemy.text('SELECT COUNT(*) FROM "DiaSource"')).scalar())
    except sqlalchemy.exc.SQLAlchemyError as exc:
        return f"(unknown: {type(exc).__name__})"
    finally:
        engine.dispose()


def _table(run: DemoRun) -> str:
    from rich.console import Console
    from rich.table import Table

    night = run.results.get("night")
    if not night:
        return "no night was run"
    settings = run.settings
    left = _wait_exported(settings)
    rows = visit_rows(settings, night["plan"], night["detectors"], night["report"].recovery)
    table = Table(title=f"the night of {rows[0]['group'][:10] if rows else ''}, per visit "
                        "(stage times: median over detectors, s)", title_justify="left")
    for column in ("group (TAI)", "filter", "ok", "failed", "skipped", "pipeline", "prepare", "wait", "ingest", "run",
                   "done after end (s)", "found/injected", "false/det"):
        table.add_column(column)
    for row in rows:
        times = row["stage_times"]
        table.add_row(
            row["group"][11:], row["filter"] + (" (engineering)" if row["survey"] == "engineering" else ""),
            str(row["ok"]), str(row["failed"]), str(row["skipped"]), row["pipelines"],
            *[f"{times[s]['median_s']:.1f}" if s in times else "-" for s in ("prepare", "wait", "ingest", "run")],
            "-" if row["after_end_s"] is None else f"{row['after_end_s']:.1f}", *_quality_cells(row),
        )
    buffer = io.StringIO()
    console = Console(file=buffer, width=160, force_terminal=False)
    console.print(table)
    console.print(night_quality(rows))
    for row in rows:
        for reason, n in row["reasons"].items():
            if reason:
                console.print(f"  {row['group']}: {n} x {reason}")
    day_obs = sorted({row["day_obs"] for row in rows})
    console.print(f"outputs in the central repo {settings.central_repo_uri} (raws in SimCam/raw/all):")
    for name, count in _output_runs(settings, day_obs):
        console.print(f"  {name}: {count} datasets")
    console.print(f"DIA sources: {_dia_sources(settings)} in the APDB {settings.apdb_uri}")
    console.print(f"local repos: {settings.local_repo_path} (prompt-tasks local list); export queue: "
                  f"{left} pending (prompt-tasks export status)")
    console.print(butler_hint(settings))
    return buffer.getvalue().rstrip()


def butler_hint(settings: Settings) -> str:
    """A command to look at the outputs, with the ``butler`` of this virtualenv (not on PATH)."""
    butler = Path(sys.executable).parent / "butler"
    return f"look: {butler} query-collections {settings.central_repo_uri} 'SimCam/prompt/*'"


def night_steps() -> list[Step]:
    """The steps the demo runs after the stack is up and healthy."""
    return [
        Step("Initialize the central repo (if needed)", _central),
        Step("Simulate a short night on the stack", _night),
        Step("Per-visit results and where the outputs are", _table),
    ]
