"""The main job of the README (``prompt-tasks demo``), as a list of steps.

Today it brings the stack up, puts a test object into the raw bucket, shows its event
arriving (in the arrivals index when the dispatcher runs, else in the raw event list) and
checks that every component is healthy. Later work appends steps (a simulated night) to
:func:`demo_steps`; each step is a function of a :class:`DemoRun` returning one line to show.
"""

from __future__ import annotations

import io
import json
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus

import redis

from prompt_tasks.demo.night import night_steps
from prompt_tasks.demo.run import DemoError, DemoRun, Step
from prompt_tasks.objstore import make_client
from prompt_tasks.settings import Settings
from prompt_tasks.stack import launcher

__all__ = [
    "demo_key",
    "demo_steps",
    "find_arrival",
    "find_event",
]


def demo_key(now: datetime | None = None) -> str:
    """Key of the demo's test object, in the DMTN-219 layout
    ``instrument/detector/group/snap/filename`` (the group is an ISO timestamp)."""
    now = now or datetime.now(UTC)
    group = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}"
    return f"SimCam/0/{group}/0/demo.fits"


def find_event(client: redis.Redis, settings: Settings, key: str) -> dict[str, Any] | None:
    """The S3 record of ``key`` if its event is still in the event list (peeked, not popped)."""
    for item in client.lrange(settings.event_list, 0, -1):
        try:
            entries = json.loads(item)
        except ValueError:
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            for record in entry.get("Event") or []:
                if unquote_plus(record.get("s3", {}).get("object", {}).get("key", "")) == key:
                    return dict(record)
    return None


def find_arrival(client: redis.Redis, key: str) -> dict[str, Any] | None:
    """The arrivals-index entry of ``key`` once the dispatcher has indexed it, else None."""
    try:
        from prompt_tasks.model.objectkeys import parse_key
        from prompt_tasks.store.arrivals import arrivals_for
    except ImportError:  # the dispatcher's modules are not installed
        return None
    snap = parse_key(key)
    for arrival in arrivals_for(client, snap.instrument, snap.group, snap.detector).values():
        if arrival.key == key:
            return {
                "instrument": snap.instrument, "group": snap.group, "detector": snap.detector,
                **arrival.to_dict(),
            }
    return None


def _stack_up(run: DemoRun) -> str:
    current = launcher.status(run.settings, run.skip)
    if current and all(c.health == "healthy" for c in current):
        return f"already up: {len(current)} components healthy"
    comps = launcher.up(run.settings, run.skip, report=run.report)
    return f"{len(comps)} components up in {run.settings.state_path}"


def _put_object(run: DemoRun) -> str:
    key = demo_key()
    body = b"SIMPLE  =                    T / prompt-tasks demo object" + b" " * 24
    make_client(run.settings).put_object(run.settings.raw_bucket, key, io.BytesIO(body), len(body))
    run.results["key"] = key
    run.results["put_at"] = time.monotonic()
    return f"s3://{run.settings.raw_bucket}/{key} ({len(body)} bytes)"


def _event_arrives(run: DemoRun, timeout: float = 30.0) -> str:
    key = run.results["key"]
    client = redis.Redis.from_url(run.settings.events_redis, decode_responses=True)
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            arrival = find_arrival(client, key)
            seen = f"seen {1000 * (time.monotonic() - run.results['put_at']):.0f} ms after the PUT"
            if arrival is not None:
                run.results["arrival"] = arrival
                return f"indexed by the dispatcher in the arrivals index, {seen}: {json.dumps(arrival)}"
            record = find_event(client, run.settings, key)
            if record is not None:
                run.results["event"] = record
                size = record.get("s3", {}).get("object", {}).get("size")
                return (
                    f"{record.get('eventName')} in Redis list {run.settings.event_list!r}, {seen} "
                    f"(key {key}, {size} bytes, event time {record.get('eventTime')})"
                )
            time.sleep(0.05)
    finally:
        client.close()
    raise DemoError(f"no event for {key} within {timeout:.0f} s")


def _healthy(run: DemoRun) -> str:
    current = launcher.status(run.settings, run.skip)
    run.results["status"] = current
    bad = [c.name for c in current if c.health != "healthy"]
    if bad:
        raise DemoError(f"not healthy: {', '.join(bad)}")
    return f"all {len(current)} components healthy"


def demo_steps() -> list[Step]:
    """The steps of the demo, in order (the simulated night: :mod:`prompt_tasks.demo.night`)."""
    return [
        Step("Bring the stack up", _stack_up),
        Step("Put a test object into the raw bucket", _put_object),
        Step("Watch its bucket event arrive", _event_arrives),
        Step("Check the stack's health", _healthy),
        *night_steps(),
    ]
