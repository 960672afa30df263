"""``prompt-tasks`` commands of the simulated camera: ``central init`` and ``simulate``."""

from __future__ import annotations

import sys
import time

import click
from rich.console import Console
from rich.table import Table

from prompt_tasks.cli import pass_settings
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

    from prompt_tasks.central import CentralMismatch, init_central, read_camera
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


COMMANDS: list[click.Command] = [central]
