"""``prompt-tasks report INSTRUMENT GROUP``: a visit's timeline (detectors × stages) as a PNG."""

from __future__ import annotations

import time
from pathlib import Path

import click

from prompt_tasks.cli import pass_settings
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings, mask_url

__all__ = ["COMMANDS"]


def _unreachable(settings: Settings, exc: Exception) -> click.ClickException:
    return click.ClickException(f"Redis at {mask_url(settings.events_redis)} unreachable: {exc}")


@click.command("report")
@click.argument("instrument")
@click.argument("group")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="PNG to write (default: <instrument>_<group>.png).")
@pass_settings
def report(settings: Settings, instrument: str, group: str, output: Path | None) -> None:
    """Draw the timeline of one visit (detectors × stages) from the ledger as a PNG."""
    from prompt_tasks.daytime.report import draw
    from prompt_tasks.store import ledger

    ctx = Context(settings)
    try:
        record = ledger.read_visit(ctx.redis, instrument, group)
    except Exception as exc:
        raise _unreachable(settings, exc) from exc
    finally:
        ctx.close()
    if record is None:
        raise click.ClickException(f"no visit {instrument}/{group} in the ledger")
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{instrument}_{group}")
    path = draw(record, output or Path(f"{safe}.png"), time.time())
    counts = ", ".join(f"{k} {v}" for k, v in sorted(record.counts().items()))
    click.echo(f"{path}  ({len(record.detectors)} detectors: {counts})")


COMMANDS: list[click.Command] = [report]
