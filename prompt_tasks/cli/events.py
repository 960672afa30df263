"""``prompt-tasks`` commands: events (the bucket-event dispatcher and its counters)."""

from __future__ import annotations

import json
import signal
import threading
from types import FrameType

import click

from prompt_tasks.cli import pass_settings
from prompt_tasks.settings import Settings

__all__ = ["COMMANDS"]


@click.command()
@click.option("--loglevel", default="INFO", show_default=True, help="Logging level.")
@click.option("--text-logs", is_flag=True, help="Plain-text logs instead of JSON lines.")
@pass_settings
def dispatcher(settings: Settings, loglevel: str, text_logs: bool) -> None:
    """Index bucket events and wake waiting tasks, until SIGTERM or SIGINT."""
    from prompt_tasks.celery import create_app
    from prompt_tasks.context import Context
    from prompt_tasks.flow.dispatcher import dispatcher_for
    from prompt_tasks.logs import configure_logging

    configure_logging(loglevel.upper(), json_format=not text_logs)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    ctx = Context(settings)
    celery_app = create_app(settings)
    try:
        dispatcher_for(ctx, celery_app=celery_app).run(stop)
    finally:
        ctx.close()
        celery_app.close()


@click.command("event-counters")
@pass_settings
def event_counters(settings: Settings) -> None:
    """Print the dispatcher's counters (records ok, duplicates, malformed...) as JSON."""
    import redis

    from prompt_tasks.flow.dispatcher import counters

    client = redis.Redis.from_url(settings.events_redis, socket_connect_timeout=2)
    try:
        click.echo(json.dumps(counters(client), indent=2, sort_keys=True))
    finally:
        client.close()


@click.command("end-visit")
@click.argument("instrument")
@click.argument("group")
@pass_settings
def end_visit(settings: Settings, instrument: str, group: str) -> None:
    """Signal that GROUP of INSTRUMENT took its last snap (ends waits with nimages 0)."""
    import redis

    from prompt_tasks.store.arrivals import signal_end

    client = redis.Redis.from_url(settings.events_redis, socket_connect_timeout=2)
    try:
        woken = signal_end(client, instrument, group, settings.arrival_ttl_s)
    finally:
        client.close()
    click.echo(f"end of {instrument} {group} signalled; {woken} waiting detectors woken")


COMMANDS: list[click.Command] = [dispatcher, event_counters, end_visit]
