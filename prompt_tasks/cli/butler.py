"""``prompt-tasks`` commands: the Butler worker's local repos and the export queue.

- ``local list``: the local repos on this host, their size and preload cache;
- ``local purge``: delete local repos (a worker recreates them at its next visit);
- ``export status``: pending, set-aside and exported counts;
- ``export flush``: write every pending export request to the central repo now.
"""

from __future__ import annotations

import json

import click
from rich.console import Console
from rich.table import Table

from prompt_tasks.cli import pass_settings
from prompt_tasks.settings import Settings

__all__ = ["COMMANDS"]


def _du(path: object) -> int:
    from pathlib import Path

    return sum(p.stat().st_size for p in Path(str(path)).rglob("*") if p.is_file())


@click.group()
def local() -> None:
    """The per-detector local Butler repos of this host."""


@local.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def local_list(settings: Settings, as_json: bool) -> None:
    """List local repos: instrument, detector, disk use, preloaded datasets and bytes."""
    from prompt_tasks.butler.cache import CacheIndex
    from prompt_tasks.butler.localrepo import Repos

    rows = []
    for instrument, detector, path in Repos(settings).existing():
        cache = CacheIndex(path)
        last = max((e.last_used for e in cache.entries.values()), default=None)
        rows.append({"instrument": instrument, "detector": detector, "path": str(path), "bytes": _du(path),
                     "preloaded": len(cache.entries), "preloaded_bytes": cache.nbytes, "last_used": last})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"local repos under {settings.local_repo_path}")
    for column in ("instrument", "detector", "disk MB", "preloaded", "cache MB", "budget MB"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["instrument"], str(row["detector"]), f"{row['bytes'] / 1e6:.1f}", str(row["preloaded"]),
                      f"{row['preloaded_bytes'] / 1e6:.1f}", f"{settings.local_cache_bytes / 1e6:.0f}")
    Console().print(table)


@local.command("purge")
@click.option("--instrument", default=None, help="Only this instrument's repos.")
@click.option("--detector", type=int, multiple=True, help="Only these detectors (repeatable).")
@click.option("--yes", is_flag=True, help="Do not ask.")
@pass_settings
def local_purge(settings: Settings, instrument: str | None, detector: tuple[int, ...], yes: bool) -> None:
    """Delete local repos (workers recreate them, cold, at their next visit)."""
    from prompt_tasks.butler.localrepo import Repos

    repos = Repos(settings)
    chosen = [(inst, det) for inst, det, _ in repos.existing()
              if (instrument is None or inst == instrument) and (not detector or det in detector)]
    if not chosen:
        click.echo("no local repos to purge")
        return
    if not yes:
        click.confirm(f"delete {len(chosen)} local repos under {settings.local_repo_path}?", abort=True)
    for inst, det in chosen:
        repos.purge(inst, det)
        click.echo(f"purged {inst} detector {det}")


@click.group()
def export() -> None:
    """The export queue: pipeline outputs on their way to the central repo."""


@export.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def export_status(settings: Settings, as_json: bool) -> None:
    """Pending and parked export messages, and what was registered so far."""
    from prompt_tasks.butler.export import pending
    from prompt_tasks.context import Context
    from prompt_tasks.store.keys import EXPORT_FAILED, EXPORT_STATS

    ctx = Context(settings)
    try:
        out = {"pending": pending(ctx.redis), "set_aside": int(ctx.redis.llen(EXPORT_FAILED)),
               **{k: int(v) for k, v in ctx.redis.hgetall(EXPORT_STATS).items()}}
    finally:
        ctx.close()
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        for key, value in out.items():
            click.echo(f"{key:<10} {value}")


@export.command("flush")
@pass_settings
def export_flush(settings: Settings) -> None:
    """Register every pending export message in the central repo now (in this process)."""
    from prompt_tasks.butler.stages import export_pending
    from prompt_tasks.context import Context

    ctx = Context(settings)
    try:
        result = export_pending(ctx, lambda delay: None, force=True)
    finally:
        ctx.close()
    if result["busy"]:
        click.echo("another export is running; it will write the pending requests")
        return
    click.echo(f"exported {result['requests']} detector-visits ({result['datasets']} datasets) in "
               f"{result['batches']} batches; {result['dropped']} parked (prompt-tasks export status)")


COMMANDS: list[click.Command] = [local, export]
