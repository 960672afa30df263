"""``prompt-tasks`` commands: intake, next-visit, abort."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from prompt_tasks.cli import pass_settings
from prompt_tasks.settings import Settings

__all__ = ["COMMANDS"]


def _celery_app(settings: Settings):  # type: ignore[no-untyped-def]
    from prompt_tasks.celery import create_app

    return create_app(settings)


@click.command("intake")
@click.option("--instrument", "instruments", multiple=True,
              help="Read this instrument's fan-out stream (repeatable); default: the known ones.")
@click.option("--no-stream", is_flag=True, help="Do not consume the fan-out streams.")
@click.option("--no-controller", is_flag=True, help="Do not run the queue controller.")
@click.option("--no-metrics", is_flag=True, help="Do not serve Prometheus metrics on the metrics port.")
@click.option("--window", type=float, default=0.5, show_default=True,
              help="Seconds without a new detector before a fanned-out visit is announced.")
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--text-logs", is_flag=True, help="Plain-text logs instead of JSON lines.")
@click.option("--plain-logs", is_flag=True, hidden=True, help="Old name of --text-logs.")
@pass_settings
def intake(settings: Settings, instruments: tuple[str, ...], no_stream: bool, no_controller: bool,
           no_metrics: bool, window: float, loglevel: str, text_logs: bool, plain_logs: bool) -> None:
    """Run the intake: HTTP API, fan-out stream consumer, queue controller and metrics."""
    from prompt_tasks.intake.service import IntakeService
    from prompt_tasks.logs import configure_logging

    configure_logging(loglevel.upper(), json_format=not (text_logs or plain_logs))
    service = IntakeService(
        settings,
        _celery_app(settings),
        instruments=list(instruments) or None,
        stream=not no_stream,
        controller=not no_controller,
        metrics=not no_metrics,
        window_s=window,
    )
    sys.exit(service.run())


@click.command("next-visit")
@click.argument("source", type=click.Path(allow_dash=True, dir_okay=False, path_type=Path))
@click.option("--direct", is_flag=True, help="Announce from this process instead of through the intake.")
@click.option("--url", default=None, help="Intake base URL; default: http://<host>:<intake_port>.")
@pass_settings
def next_visit(settings: Settings, source: Path, direct: bool, url: str | None) -> None:
    """Send the next_visit events of SOURCE (a JSON object, array or JSON lines; - for stdin).

    Prints, per event, the visit key and whether it is new or a duplicate; exits 1 if any
    event was rejected.
    """
    from prompt_tasks.intake.client import split_events

    text = sys.stdin.read() if str(source) == "-" else source.read_text()
    bodies = split_events(text)
    if not bodies:
        raise click.UsageError("no events in the input")
    outcomes = _send_direct(settings, bodies) if direct else _send_http(settings, bodies, url)
    rejected = 0
    for number, outcome in enumerate(outcomes, start=1):
        if not outcome.accepted:
            rejected += 1
        click.echo(f"#{number} {outcome.describe()}")
    if rejected:
        click.echo(f"{rejected} of {len(bodies)} events rejected", err=True)
        sys.exit(1)


def _send_http(settings: Settings, bodies: list[str], url: str | None) -> list:  # type: ignore[type-arg]
    import httpx

    from prompt_tasks.intake.client import IntakeClient

    with IntakeClient.from_settings(settings, url) as client:
        try:
            return [client.next_visit(body) for body in bodies]
        except httpx.TransportError as exc:
            raise click.ClickException(f"intake unreachable: {type(exc).__name__}: {exc}") from exc


def _send_direct(settings: Settings, bodies: list[str]) -> list:  # type: ignore[type-arg]
    from prompt_tasks.context import Context
    from prompt_tasks.errors import PromptTasksError
    from prompt_tasks.intake.client import Outcome
    from prompt_tasks.intake.errors import error_body, http_error
    from prompt_tasks.intake.http import submit
    from prompt_tasks.model.visit import parse_next_visit

    celery_app = _celery_app(settings)
    ctx = Context(settings)
    outcomes = []
    try:
        for body in bodies:
            try:
                accepted = submit(celery_app, ctx, parse_next_visit(body))
            except PromptTasksError as exc:
                outcomes.append(Outcome(http_error(exc)[0], error_body(exc)))
                continue
            outcomes.append(Outcome(200 if accepted.duplicate else 202, accepted.model_dump()))
    finally:
        ctx.close()
        celery_app.close()
    return outcomes


@click.command("abort")
@click.argument("instrument")
@click.argument("group")
@click.option("--reason", default="aborted", show_default=True)
@click.option("--url", default=None, help="Intake base URL; default: http://<host>:<intake_port>.")
@pass_settings
def abort(settings: Settings, instrument: str, group: str, reason: str, url: str | None) -> None:
    """Abort the visit INSTRUMENT GROUP: its waits end now and its ledger says why."""
    import httpx

    from prompt_tasks.intake.client import IntakeClient

    with IntakeClient.from_settings(settings, url) as client:
        try:
            outcome = client.abort(instrument, group, reason)
        except httpx.TransportError as exc:
            raise click.ClickException(f"intake unreachable: {type(exc).__name__}: {exc}") from exc
    if not outcome.accepted:
        raise click.ClickException(outcome.describe())
    state = "known" if outcome.body.get("known") else "not in the ledger"
    click.echo(f"{outcome.body.get('key')} aborted ({state}), {outcome.body.get('woken', 0)} waiters woken")


COMMANDS: list[click.Command] = [intake, next_visit, abort]
