"""``prompt-tasks`` commands: ``stack up | status | down`` and ``demo`` (the main job)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

import click
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from prompt_tasks.cli import pass_settings
from prompt_tasks.demo.run import DemoError, DemoRun
from prompt_tasks.demo.steps import demo_steps
from prompt_tasks.objstore import ensure_bucket, make_client, wait_live
from prompt_tasks.settings import Settings
from prompt_tasks.stack import launcher
from prompt_tasks.stack.secrets import ensure_secrets

__all__ = ["COMMANDS"]

_HEALTH_STYLE = {"healthy": "green", "unhealthy": "red", "stopped": "dim"}

skip_option = click.option(
    "--skip",
    multiple=True,
    metavar="COMPONENT",
    help="Leave out a component or role (repeatable), e.g. --skip flower.",
)


def _console() -> Console:
    return Console(highlight=False)


def _reporter(console: Console) -> launcher.Reporter:
    def report(component: str, message: str) -> None:
        console.print(f"  [bold]{component:<12}[/bold] {message}")

    return report


def _status_table(rows: Sequence[launcher.ComponentStatus], settings: Settings) -> Table:
    table = Table(title=f"prompt-tasks stack ({settings.state_path})")
    for column in ("component", "pid", "port", "health", "check"):
        table.add_column(column)
    for row in rows:
        style = _HEALTH_STYLE.get(row.health, "")
        table.add_row(
            row.name,
            str(row.pid or "-"),
            str(row.port or "-"),
            f"[{style}]{row.health}[/{style}]",
            row.check,
        )
    return table


def _print_failure(console: Console, error: launcher.StackError) -> None:
    console.print(f"[red]stack up failed: component [bold]{error.component}[/bold]: {error.reason}[/red]")
    console.print(
        Panel(error.log_tail or "(empty log)", title=f"tail of {error.log_file}", border_style="red")
    )
    console.print("Every component started has been stopped again.")


@click.group()
def stack() -> None:
    """The embedded local stack: servers and the fleet on loopback."""


@stack.command()
@skip_option
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for health.")
@pass_settings
def up(settings: Settings, skip: tuple[str, ...], timeout: float) -> None:
    """Start every component (those running already are left alone) and wait for health.

    The first ``up`` of a state directory generates its Redis password and S3 keys there
    (mode 600) unless they are set explicitly.
    """
    settings = ensure_secrets(settings)
    console = _console()
    console.print(f"Bringing the stack up in {settings.state_path}")
    try:
        comps = launcher.up(settings, skip, timeout=timeout, report=_reporter(console))
    except launcher.StackError as error:
        _print_failure(console, error)
        sys.exit(1)
    except FileNotFoundError as error:  # redis-server or juicefs not installed
        raise click.ClickException(str(error)) from error
    console.print(f"[green]stack up: {len(comps)} components healthy[/green]")


@stack.command()
@skip_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_settings
def status(settings: Settings, skip: tuple[str, ...], as_json: bool) -> None:
    """Show pid, port and health of every component; exit 1 unless all are healthy."""
    rows = launcher.status(settings, skip)
    if as_json:
        click.echo(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        _console().print(_status_table(rows, settings))
    if not all(row.health == "healthy" for row in rows):
        sys.exit(1)


@stack.command()
@pass_settings
def down(settings: Settings) -> None:
    """Stop exactly the processes the stack started, fleet first, servers last."""
    console = _console()
    stopped = launcher.down(settings, report=_reporter(console))
    console.print(f"stack down: {len(stopped)} processes stopped")


@stack.command()
@click.option("--wait", "wait_s", default=60.0, show_default=True, help="Seconds to wait for the S3 server.")
@pass_settings
def bucket(settings: Settings, wait_s: float) -> None:
    """Create the raw bucket and its event notification (idempotent).

    ``stack up`` does this itself; this is for object stores it does not start (the MinIO of
    docker-compose, a real deployment).
    """
    if not wait_live(settings, timeout=wait_s):
        raise click.ClickException(f"S3 server {settings.s3_url} not live after {wait_s:.0f} s")
    ensure_bucket(make_client(settings), settings)
    click.echo(f"bucket {settings.raw_bucket!r} on {settings.s3_url}: events to {settings.event_arn}")


@click.command()
@skip_option
@pass_settings
def demo(settings: Settings, skip: tuple[str, ...]) -> None:
    """The main job: bring the stack up, PUT a test object, watch its event, check health,
    then play a short simulated night (a few visits of the simulated camera over its 9
    detectors, two snaps each, several filters, one engineering visit the rules ignore) and
    print a table per visit.

    The night takes several minutes on 2 cores; ``--skip night`` stops after the health check.
    """
    settings = ensure_secrets(settings)
    console = _console()
    run = DemoRun(settings, skip, report=_reporter(console))
    steps = demo_steps()
    for number, step in enumerate(steps, 1):
        console.rule(f"[bold]{number}/{len(steps)} {step.title}")
        try:
            with console.status(step.title + "..."):
                line = step.run(run)
        except launcher.StackError as error:
            _print_failure(console, error)
            sys.exit(1)
        except DemoError as error:
            console.print(f"[red]✗ {error}[/red]")
            sys.exit(1)
        except FileNotFoundError as error:  # redis-server or juicefs not installed
            raise click.ClickException(str(error)) from error
        console.print(f"[green]✓[/green] {line}")
    console.print(_status_table(launcher.status(settings, skip), settings))
    console.print(
        "[green bold]The stack is healthy.[/green bold] "
        "Stop it with [bold]prompt-tasks stack down[/bold]."
    )


COMMANDS: list[click.Command] = [stack, demo]
