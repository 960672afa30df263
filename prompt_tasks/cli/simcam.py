"""``prompt-tasks`` commands of the simulated camera: ``central init`` and ``simulate``."""

from __future__ import annotations

import sys
import time
from typing import Any

import click
import httpx
from rich.console import Console
from rich.table import Table

from prompt_tasks.cli import pass_settings
from prompt_tasks.objstore import configure_s3
from prompt_tasks.settings import Settings, mask_url

__all__ = ["COMMANDS"]


def _console() -> Console:
    return Console(highlight=False)


@click.group()
def central() -> None:
    """The central Butler repository and APDB."""


@central.command("init")
@click.option("--instrument", default="SimCam", show_default=True)
@click.option("--detectors", type=click.IntRange(1, 189), default=None,
              help="Detectors of the focal plane [default: 9, or what the repo was built with].")
@click.option("--size", type=click.IntRange(16, 8192), default=None,
              help="Detector width and height in pixels [default: 512, or the repo's].")
@click.option("--bands", default=None, help="Bands with templates and flats, e.g. 'gri' [default: ugrizy].")
@click.option("--seed", type=int, default=None, help="Seed of the simulated sky.")
@click.option("--field-radius", type=float, default=None, help="Radius of the survey area (deg).")
@click.option("--registry-db", default=None, metavar="URL",
              help="PostgreSQL URL of the registry [default: SQLite in the repo].")
@click.option("--registry-namespace", default=None, help="PostgreSQL schema of the registry.")
@pass_settings
def central_init(settings: Settings, instrument: str, detectors: int | None, size: int | None,
                 bands: str | None, seed: int | None, field_radius: float | None, registry_db: str | None,
                 registry_namespace: str | None) -> None:
    """Build the central repository and the APDB (idempotent: a second run writes nothing)."""
    from lsst.daf.butler import Butler
    from lsst.resources import ResourcePath

    from prompt_tasks.instruments.simcam.central import CentralMismatch, init_central, read_camera
    from prompt_tasks.instruments.simcam.config import SimConfig

    console = _console()
    overrides = {k: v for k, v in {"n_detectors": detectors, "size": size, "seed": seed,
                                    "field_radius": field_radius,
                                    "bands": tuple(bands) if bands else None}.items() if v is not None}
    config = None
    uri = settings.central_repo_uri
    stored = None
    if ResourcePath(uri, forceDirectory=True).join("butler.yaml").exists():
        stored = read_camera(Butler.from_config(uri))
    if overrides or stored is None:
        config = SimConfig.model_validate({**(stored or {}), **overrides})
    console.print(f"central repository [bold]{uri}[/bold], APDB {mask_url(settings.apdb_uri)}")
    started = time.monotonic()
    try:
        steps = init_central(settings, instrument, config=config, registry_db=registry_db,
                             registry_namespace=registry_namespace,
                             echo=lambda line: console.print(f"  {line}"))
    except (CentralMismatch, ValueError) as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    table = Table(title=f"central init ({time.monotonic() - started:.1f} s)")
    for column in ("step", "created", "already there"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in steps:
        table.add_row(step.name, str(step.created), str(step.existing))
    console.print(table)
    if not any(step.created for step in steps):
        console.print("[green]nothing to do: the central repository was already complete[/green]")
    else:
        console.print(f"[green]built: {sum(s.created for s in steps)} items[/green]")


def _stack_problem(settings: Settings, via: str) -> str | None:
    """Why the stack cannot take a night (S3 or intake down), or None."""
    from prompt_tasks.intake.client import IntakeClient
    from prompt_tasks.objstore import health_live

    if not health_live(settings, timeout=2.0):
        return f"the S3 server at {settings.s3_url} does not answer"
    if via == "stream":
        return None
    try:
        with IntakeClient.from_settings(settings) as intake:
            if intake.health().status != 200:
                return "the intake is not healthy"
    except httpx.HTTPError as exc:
        return f"the intake does not answer ({exc})"
    return None


def _recovery_cells(recovery: Any) -> tuple[str, str]:
    """``found/injected`` and false detections, or dashes when unknown."""
    if recovery is None:
        return "-", "-"
    return f"{recovery.found}/{recovery.injected}", str(recovery.false)


def _outcomes(record: dict[str, Any]) -> tuple[dict[str, int], int]:
    """Final outcomes per kind, and detectors still running, of a ledger record."""
    summary = record.get("summary") or {}
    if summary.get("counts"):
        return dict(summary["counts"]), 0
    counts: dict[str, int] = {}
    running = 0
    for detector in (record.get("detectors") or {}).values():
        if detector.get("final"):
            counts[detector.get("outcome") or "?"] = counts.get(detector.get("outcome") or "?", 0) + 1
        else:
            running += 1
    return counts, running


@click.command()
@click.option("--visits", type=click.IntRange(1), default=5, show_default=True, help="Visits to take.")
@click.option("--detectors", type=click.IntRange(1, 189), default=None,
              help="Detectors read out [default: all of the central repo's camera].")
@click.option("--snaps", type=click.IntRange(1, 10), default=2, show_default=True, help="Snaps per visit.")
@click.option("--cadence", type=float, default=32.0, show_default=True, help="Seconds between visit starts.")
@click.option("--lead", type=float, default=20.0, show_default=True,
              help="Seconds between next_visit and the first shutter opening.")
@click.option("--exptime", type=float, default=15.0, show_default=True, help="Exposure time of a snap (s).")
@click.option("--bands", default=None, help="Bands to cycle through, e.g. 'gri' [default: the repo's].")
@click.option("--start-in", type=float, default=1.0, show_default=True,
              help="Seconds from now to the first next_visit.")
@click.option("--calibs", default="", metavar="TYPES",
              help="Calibration exposures to take first, e.g. 'bias,dark,flat' (survey CALIB-<TYPE>).")
@click.option("--via", type=click.Choice(["http", "stream"]), default="http", show_default=True,
              help="Announce by POST to the intake, or per detector on the fan-out stream.")
@click.option("--wait", "wait_s", type=float, default=120.0, show_default=True,
              help="Seconds to wait after the last raw for the visits' summaries.")
@pass_settings
def simulate(settings: Settings, visits: int, detectors: int | None, snaps: int, cadence: float, lead: float,
             exptime: float, bands: str | None, start_in: float, calibs: str, via: str, wait_s: float) -> None:
    """Drive a running stack as the summit would: next_visit, then raws on schedule."""
    from lsst.daf.butler import Butler
    from lsst.resources import ResourcePath
    from rich.progress import Progress

    from prompt_tasks.instruments.simcam.central import read_camera
    from prompt_tasks.instruments.simcam.config import SimConfig
    from prompt_tasks.instruments.simcam.night import (
        TAI_MINUS_UTC,
        plan_night,
        run_night,
        tai_now,
        undelivered_lines,
    )

    console = _console()
    repo = ResourcePath(settings.central_repo_uri, forceDirectory=True)
    if repo.isLocal and not repo.join("butler.yaml").exists():
        console.print("[red]no SimCam camera in the central repository: run `prompt-tasks central init`[/red]")
        sys.exit(1)
    problem = _stack_problem(settings, "stream")  # the S3 server: the repo's files are there too
    if problem:
        console.print(f"[red]{problem}: is the stack up? (`prompt-tasks stack up`)[/red]")
        sys.exit(1)
    try:
        configure_s3(settings)
        camera = read_camera(Butler.from_config(settings.central_repo_uri))
    except (OSError, ValueError) as exc:  # no repository at all
        camera = None
        console.print(f"[red]cannot read the central repository: {exc}[/red]")
    if camera is None:
        console.print("[red]no SimCam camera in the central repository: run `prompt-tasks central init`[/red]")
        sys.exit(1)
    config = SimConfig.model_validate(camera)
    n = detectors or config.n_detectors
    if n > config.n_detectors:
        console.print(f"[red]the central repository's camera has {config.n_detectors} detectors, not {n}[/red]")
        sys.exit(1)
    try:
        plan = plan_night(config, visits, tai_now() + start_in + lead, cadence=cadence, lead=lead, snaps=snaps,
                          exptime=exptime, bands=tuple(bands) if bands else None,
                          calibs=[c.strip() for c in calibs.split(",") if c.strip()])
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]")
        sys.exit(1)
    problem = _stack_problem(settings, via)
    if problem:
        console.print(f"[red]{problem}: is the stack up? (`prompt-tasks stack up`)[/red]")
        sys.exit(1)
    if via == "http" and n != 9:
        console.print("[yellow]next_visit over HTTP: the stack processes the instrument's default detectors; "
                      "use --via stream to process exactly these[/yellow]")
    console.print(f"{len(plan) - visits} calibration exposures, then {visits} visits x {n} detectors x {snaps} snaps, cadence {cadence} s, lead {lead} s, "
                  f"first group {plan[0].spec.group}")
    with Progress(console=console) as progress:
        report = run_night(settings, config, plan, list(range(n)), progress=progress, wait_s=wait_s,
                           log=console.print, via=via)
    table = Table(title="visits")
    for column in ("#", "group", "band/type", "ok", "failed", "other", "running", "done after readout (s)",
                   "transients", "found (r<23)", "false"):
        table.add_column(column, justify="left" if column in ("group", "band/type") else "right")
    for p in plan:
        record = report.ledger.get(p.index) or {}
        summary = record.get("summary") or {}
        counts, running = _outcomes(record)
        ok, failed = counts.get("ok", 0), counts.get("failed", 0)
        other = sum(v for k, v in counts.items() if k not in ("ok", "failed"))
        last = summary.get("last_run_end")
        # The ledger's clock is UTC; the visit's times are TAI.
        after = None if last is None else float(last) + TAI_MINUS_UTC - (p.spec.start + p.spec.duration)
        state = "" if p.index in report.announced else " (rejected)"
        kind = p.spec.band if p.spec.imgtype == "OBJECT" else p.spec.imgtype.lower()
        table.add_row(str(p.index), p.spec.group + state, kind, str(ok), str(failed), str(other),
                      str(running), "-" if after is None or not summary else f"{after:.1f}",
                      str(report.truth.get(p.index, 0)), *_recovery_cells(report.recovery.get(p.index)))
    console.print(table)
    known = [r for r in report.recovery.values() if r is not None]
    if known:
        total = sum(known[1:], known[0])
        console.print(f"transients (r<23): {total.found}/{total.injected} recovered "
                      f"({100 * total.completeness:.0f} %), {total.false} false detections")
    console.print(f"{report.put} raws PUT ({report.late_puts} snaps late), {len(report.announced)} visits "
                  f"announced, {len(report.rejected)} rejected")
    lines = undelivered_lines(report, plan)
    for line in lines:
        console.print(f"[red]{line}[/red]")
    if lines:
        sys.exit(1)


COMMANDS: list[click.Command] = [central, simulate]
