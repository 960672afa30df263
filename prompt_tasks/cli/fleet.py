"""``prompt-tasks`` commands: the fleet (``workers``: who consumes which detector queue;
``status``: visits in flight and their per-stage progress, from the ledger)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import click
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from prompt_tasks.cli import pass_settings
from prompt_tasks.context import Context
from prompt_tasks.fleet.controller import read_assignment, read_events, read_state
from prompt_tasks.fleet.heartbeat import queues_by_node, read_beats
from prompt_tasks.flow.router import parse_detector_queue
from prompt_tasks.settings import Settings, mask_url
from prompt_tasks.store import ledger

__all__ = ["COMMANDS", "detector_ranges", "status_table", "workers_table"]


def detector_ranges(queues: Iterable[str]) -> str:
    """``"LSSTCam 0-3,7"``: the detectors of detector queues, compressed per instrument."""
    by_instrument: dict[str, list[int]] = {}
    others = []
    for queue in queues:
        parsed = parse_detector_queue(queue)
        if parsed is None:
            others.append(queue)
        else:
            by_instrument.setdefault(parsed[0], []).append(parsed[1])
    parts = []
    for instrument, numbers in sorted(by_instrument.items()):
        numbers.sort()
        spans: list[str] = []
        start = prev = numbers[0]
        for n in [*numbers[1:], None]:
            if n is not None and n == prev + 1:
                prev = n
                continue
            spans.append(str(start) if start == prev else f"{start}-{prev}")
            if n is not None:
                start = prev = n
        parts.append(f"{instrument} {','.join(spans)}")
    return "; ".join(parts + sorted(others))


def _ago(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    delta = now - when
    return f"{delta:.1f} s ago" if delta < 120 else time.strftime("%H:%M:%S", time.localtime(when))


def workers_table(assignment: dict[str, list[str]], events: list[dict[str, Any]],
                  state: dict[str, Any], now: float, live: dict[str, set[str]] | None = None) -> Table:
    """The worker → detectors table, captioned with the last rebalance.

    ``live``: node → queues from the workers' heartbeats; the ``beat`` column says whether the
    worker is beating and consumes every queue it was assigned.
    """
    table = Table(title="Detector queues by worker")
    table.add_column("worker")
    table.add_column("queues", justify="right")
    table.add_column("detectors")
    if live is not None:
        table.add_column("beat")
    for worker, queues in assignment.items():
        row = [worker, str(len(queues)), detector_ranges(queues)]
        if live is not None:
            consumed = live.get(worker)
            missing = [] if consumed is None else sorted(set(queues) - consumed)
            row.append("missing" if consumed is None else f"{len(missing)} not consumed" if missing else "ok")
        table.add_row(*row)
    if events:
        last = events[0]
        table.caption = (
            f"last rebalance {_ago(last['t'], now)}: took {last['took_s']:.3f} s, "
            f"{len(last.get('moved', []))} queues moved"
            + (f", joined {', '.join(last['joined'])}" if last.get("joined") else "")
            + (f", left {', '.join(last['left'])}" if last.get("left") else "")
            + f"; checked {_ago(state.get('checked'), now)}"
        )
    else:
        table.caption = "no rebalance recorded (is the intake's queue controller running?)"
    return table


def _age(when: float | None, now: float) -> str:
    if when is None:
        return "-"
    delta = max(0.0, now - when)
    return f"{delta:.0f}s" if delta < 120 else f"{delta / 60:.0f}m" if delta < 7200 else f"{delta / 3600:.0f}h"


def status_table(records: list[ledger.VisitRecord], now: float) -> Table:
    """One row per visit: its age, and its detector-visits counted once each, by current state.

    Fits 80 columns: the visit key and the summary wrap, no header is ever shortened.
    """
    table = Table(title="Visits", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("visit", overflow="fold", ratio=3, min_width=12)
    table.add_column("age", justify="right", no_wrap=True)
    table.add_column("det", justify="right", no_wrap=True)
    for state in ledger.STATES:
        table.add_column(state, justify="right", no_wrap=True, min_width=len(state))
    table.add_column("summary", overflow="fold", ratio=2, min_width=8)
    for record in records:
        states = record.states()
        if record.summary is not None:
            summary = f"{record.summary_by} {_age(record.summarized, now)} ago"
        elif record.deadline is not None:
            summary = f"deadline in {max(0.0, record.deadline - now):.0f}s"
        else:
            summary = "-"
        table.add_row(record.key, _age(record.received, now), str(len(record.detectors)),
                      *(str(states.get(state, 0)) for state in ledger.STATES), summary)
    table.caption = "detector-visits by state (waiting: not started or waiting for snaps)"
    return table


def _unreachable(settings: Settings, exc: Exception) -> click.ClickException:
    return click.ClickException(f"cannot reach Redis at {mask_url(settings.events_redis)}: {exc}")


def _visits(ctx: Context, limit: int, finished: int) -> list[ledger.VisitRecord]:
    keys = ledger.in_flight(ctx.redis, limit)
    if finished:
        flying = set(keys)
        done = [k for k in ledger.recent(ctx.redis, limit + finished) if k not in flying]
        keys += done[:finished]
    records = [ledger.read_visit(ctx.redis, instrument, group) for instrument, group in keys]
    return sorted((r for r in records if r is not None), key=lambda r: r.received or 0.0, reverse=True)


@click.command("workers")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--events", "n_events", default=1, show_default=True, help="Rebalance events to include (JSON).")
@pass_settings
def workers(settings: Settings, as_json: bool, n_events: int) -> None:
    """Print which compute worker consumes which detector queues, whether each is beating, and
    the last rebalance (``--json``: also every worker's last heartbeat, its queues)."""
    import redis

    ctx = Context(settings)
    try:
        assignment = read_assignment(ctx.redis)
        events = read_events(ctx.redis, max(n_events, 1))
        state = read_state(ctx.redis)
        live = queues_by_node(read_beats(ctx.redis))
    except redis.ConnectionError as exc:
        raise _unreachable(settings, exc) from None
    finally:
        ctx.close()
    if as_json:
        beats = {node: sorted(queues) for node, queues in live.items()}
        click.echo(json.dumps({"assignment": assignment, "events": events[:n_events], "state": state,
                               "beats": beats}, indent=2, sort_keys=True))
        return
    Console().print(workers_table(assignment, events, state, time.time(), live))


@click.command("status")
@click.option("--once", is_flag=True, help="Print the table once and exit.")
@click.option("--interval", default=1.0, show_default=True, help="Refresh period (s).")
@click.option("--limit", default=20, show_default=True, help="Most visits in flight shown.")
@click.option("--finished", default=5, show_default=True, help="Also show this many newest finished visits.")
@click.option("--json", "as_json", is_flag=True, help="Print the ledger records as JSON (implies --once).")
@pass_settings
def status(settings: Settings, once: bool, interval: float, limit: int, finished: int, as_json: bool) -> None:
    """Show visits in flight and their per-stage progress (live until Ctrl-C)."""
    import redis

    ctx = Context(settings)
    try:
        if as_json:
            click.echo(json.dumps([r.to_dict() for r in _visits(ctx, limit, finished)], indent=2))
            return
        console = Console()
        if once:
            console.print(status_table(_visits(ctx, limit, finished), time.time()))
            return
        with Live(status_table(_visits(ctx, limit, finished), time.time()), console=console,
                  refresh_per_second=4) as live:
            try:
                while True:
                    time.sleep(interval)
                    live.update(status_table(_visits(ctx, limit, finished), time.time()))
            except KeyboardInterrupt:
                pass
    except redis.ConnectionError as exc:
        raise _unreachable(settings, exc) from None
    finally:
        ctx.close()


COMMANDS: list[click.Command] = [workers, status]
