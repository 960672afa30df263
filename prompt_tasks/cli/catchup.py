"""``prompt-tasks catchup list|run``: detector-visits that did not succeed, and their redo."""

from __future__ import annotations

import json
import time

import click

from prompt_tasks.cli import pass_settings
from prompt_tasks.context import Context
from prompt_tasks.settings import Settings, mask_url

__all__ = ["COMMANDS"]


def _unreachable(settings: Settings, exc: Exception) -> click.ClickException:
    return click.ClickException(f"Redis at {mask_url(settings.events_redis)} unreachable: {exc}")


@click.group("catchup")
def catchup() -> None:
    """Detector-visits that did not succeed, and their daytime redo."""


@catchup.command("list")
@click.option("--state", "states", multiple=True,
              type=click.Choice(["pending", "queued", "done", "abandoned"]),
              help="Only records in this state (repeatable); default: all.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def catchup_list(settings: Settings, states: tuple[str, ...], as_json: bool) -> None:
    """List the catch-up records."""
    from prompt_tasks.daytime.catchup import list_records

    ctx = Context(settings)
    try:
        records = list_records(ctx.redis, states or None)
    except Exception as exc:
        raise _unreachable(settings, exc) from exc
    finally:
        ctx.close()
    if as_json:
        click.echo(json.dumps([r.to_dict() for r in records], indent=2, sort_keys=True))
        return
    if not records:
        click.echo("no catch-up records")
        return
    for rec in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.failed_at))
        click.echo(f"{rec.key:<48} {rec.state:<9} tries {rec.attempts}  {when}Z  {rec.stage:<7} "
                   f"{rec.code:<12} {rec.reason[:80]}")


@catchup.command("run")
@click.option("--limit", type=int, default=None, help="Most detector-visits to send (default: catchup_batch).")
@click.option("--force", is_flag=True, help="Send even while visits are in flight.")
@click.option("--dry-run", is_flag=True, help="Only say what would be sent.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def catchup_run(settings: Settings, limit: int | None, force: bool, dry_run: bool, as_json: bool) -> None:
    """Redo the pending records whose raws are now in the bucket, on the catchup queue."""
    from prompt_tasks.celery import create_app
    from prompt_tasks.daytime.catchup import run_catchup

    app = create_app(settings)
    ctx = Context(settings)
    try:
        result = run_catchup(app, ctx, limit=limit, force=force, dry_run=dry_run)
    finally:
        ctx.close()
        app.close()
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    if result["skipped"]:
        click.echo(f"nothing sent: {result['skipped']}")
    verb = "would send" if dry_run else "sent"
    click.echo(f"{verb} {len(result['sent'])}; {len(result['waiting'])} pending without their raws")
    for key in result["sent"]:
        click.echo(f"  {key}")


COMMANDS: list[click.Command] = [catchup]
