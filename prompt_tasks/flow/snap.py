"""Waiting for a detector's snaps: the index first, then the wake key, then one listing.

:func:`wait_for_snaps` returns as soon as the detector-visit has all it needs:

- ``nimages`` known: that many snaps indexed;
- ``nimages`` 0 (unknown): the visit's end was signalled, or no new snap came for
  ``quiet_period`` seconds after the expected end;
- aborted: at once, with outcome ``aborted``;
- timeout (by default the expected end plus ``settings.wait_margin_s``): the bucket prefix of
  the detector-visit is listed once, whatever is found there is indexed (a lost notification
  must not lose an image), and the wait ends ``ok`` if that completes it, ``timed_out``
  otherwise.

It blocks with ``BLPOP`` on the detector's wake key, in slices of at most ``poll_s``
(``settings.wait_poll_s``) so a waiter that lost a wake token to a twin (a redelivered task)
still notices within a slice.
Pure I/O: run it on the gevent ``wait`` worker, never in a compute pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from prompt_tasks.context import BLOCK_MARGIN_S, REDIS_READ_TIMEOUT_S
from prompt_tasks.errors import InvalidEvent, RetryLater
from prompt_tasks.model.objectkeys import instrument_of, resolve, scheme_for
from prompt_tasks.model.status import Outcome, StageStatus
from prompt_tasks.objstore import sidecar_reader
from prompt_tasks.store.arrivals import (
    Arrival,
    arrivals_for,
    record_arrival,
    register_waiter,
    unregister_waiter,
    wait_state,
)
from prompt_tasks.store.keys import wake_key

if TYPE_CHECKING:
    from prompt_tasks.context import Context

__all__ = ["WaitPlan", "decide", "list_snaps", "wait_for_snaps"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WaitPlan:
    """The numbers a wait is decided by (all times Unix seconds, same clock)."""

    nimages: int
    expected_end: float
    deadline: float
    quiet_period: float


def decide(plan: WaitPlan, arrivals: dict[int, Arrival], ended: bool, now: float) -> tuple[bool, float]:
    """Whether the wait is complete, and if not, when it should look again at the latest.

    Pure: ``arrivals`` are the indexed snaps, ``ended`` whether the visit's end was signalled.
    """
    if plan.nimages > 0:
        if len(arrivals) >= plan.nimages:
            return True, now
        return False, plan.deadline
    if ended and arrivals:
        return True, now
    if arrivals:
        quiet_from = max(plan.expected_end, max(a.t for a in arrivals.values()))
        if now >= quiet_from + plan.quiet_period:
            return True, now
        return False, min(quiet_from + plan.quiet_period, plan.deadline)
    return False, plan.deadline


def list_snaps(ctx: Context, instrument: str, group: str, detector: int) -> list[str]:
    """List the detector-visit's prefix in the raw bucket and index what is there.

    Returns the keys found there (new or already indexed).
    """
    bucket = ctx.settings.raw_bucket
    scheme = scheme_for(instrument)
    prefix = scheme.listing_prefix(instrument, group, detector)

    reader = sidecar_reader(ctx.s3)

    def read_sidecar(key: str) -> Mapping[str, Any] | None:
        return reader(bucket, key)

    found: list[str] = []
    for obj in ctx.s3.list_objects(bucket, prefix=prefix, recursive=True):
        key = obj.object_name
        if obj.is_dir or key is None or scheme.sidecar_of(key) is not None:
            continue
        try:
            if instrument_of(key) != instrument:
                continue
            snap, _ = resolve(key, read_sidecar)
        except InvalidEvent:
            continue
        if snap.group != group or snap.detector != detector:
            continue
        record_arrival(ctx.redis, snap, key, int(obj.size or 0), (obj.etag or "").strip('"'),
                       time.time(), ctx.settings.arrival_ttl_s)
        found.append(key)
    return found


def _snaps_data(arrivals: dict[int, Arrival]) -> dict[str, Any]:
    return {str(snap): arrival.to_dict() for snap, arrival in sorted(arrivals.items())}


def wait_for_snaps(
    ctx: Context,
    instrument: str,
    group: str,
    detector: int,
    nimages: int,
    expected_end: float,
    timeout: float | None = None,
    *,
    quiet_period: float | None = None,
    poll_s: float | None = None,
    clock: Callable[[], float] = time.time,
) -> StageStatus:
    """Wait until the detector-visit's snaps are in the bucket (see the module docstring).

    Parameters
    ----------
    ctx
        Process context (events Redis, S3 client, settings).
    instrument, group, detector
        The detector-visit.
    nimages
        Snaps expected; 0 when unknown.
    expected_end
        When the visit should be over (``startTime + duration``), UTC unix seconds
        (:func:`prompt_tasks.model.visit.expected_end_utc`).
    timeout
        Longest wait in seconds from now; default: until ``expected_end + wait_margin_s``.
    quiet_period
        ``nimages`` 0: end after this long with no new snap past ``expected_end``;
        default ``settings.quiet_period_s``.
    poll_s
        Longest single block on the wake key; default ``settings.wait_poll_s``.
    clock
        The time source (Unix seconds).

    Returns
    -------
    StageStatus
        Stage ``wait``; ``data`` has ``snaps`` (snap → key, size, etag, arrival time ``t``),
        ``began``, ``ended``, ``nimages``, ``listed`` (keys found by the timeout listing) and
        ``wakeups``.

    Raises
    ------
    RetryLater
        The events Redis went away (the stage task retries the wait).
    """
    settings = ctx.settings
    redis = ctx.redis
    began = clock()
    if timeout is None:
        timeout = max(expected_end + settings.wait_margin_s - began, 0.0)
    plan = WaitPlan(
        nimages=max(int(nimages), 0),
        expected_end=float(expected_end),
        deadline=began + timeout,
        quiet_period=settings.quiet_period_s if quiet_period is None else quiet_period,
    )
    data: dict[str, Any] = {"began": began, "nimages": plan.nimages, "listed": [], "wakeups": 0}

    def status(outcome: Outcome, arrivals: dict[int, Arrival], reason: str = "", code: str = "") -> StageStatus:
        data["ended"] = clock()
        data["snaps"] = _snaps_data(arrivals)
        return StageStatus("wait", outcome, instrument, group, detector, reason=reason, code=code, data=data)

    try:
        register_waiter(redis, instrument, group, detector, settings.arrival_ttl_s)
        return _wait(ctx, plan, instrument, group, detector, data, status,
                     settings.wait_poll_s if poll_s is None else poll_s, clock)
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise RetryLater(f"events Redis unavailable while waiting: {exc}", delay=2.0) from exc
    finally:
        try:
            unregister_waiter(redis, instrument, group, detector)
        except (RedisConnectionError, RedisTimeoutError):
            log.warning("could not unregister the waiter of %s %s %s", instrument, group, detector)


def _wait(ctx: Context, plan: WaitPlan, instrument: str, group: str, detector: int, data: dict[str, Any],
          status: Callable[..., StageStatus], poll_s: float, clock: Callable[[], float]) -> StageStatus:
    """The loop of :func:`wait_for_snaps`: read the state, decide, block on the wake key."""
    redis = ctx.redis
    wake = wake_key(instrument, group, detector)
    while True:
        state = wait_state(redis, instrument, group, detector)
        if state.aborted is not None:
            return status(Outcome.ABORTED, state.arrivals, f"visit aborted: {state.aborted}", "aborted")
        now = clock()
        done, look_again = decide(plan, state.arrivals, state.ended, now)
        if done:
            return status(Outcome.OK, state.arrivals)
        if now >= plan.deadline:
            return _at_timeout(ctx, plan, instrument, group, detector, data, status)
        # a block outliving the client's read timeout would end in a timeout error
        block = min(max(look_again - now, 0.01), poll_s, REDIS_READ_TIMEOUT_S - BLOCK_MARGIN_S)
        if redis.blpop([wake], timeout=block) is not None:
            data["wakeups"] += 1


def _at_timeout(ctx: Context, plan: WaitPlan, instrument: str, group: str, detector: int,
                data: dict[str, Any], status: Callable[..., StageStatus]) -> StageStatus:
    """List the bucket once, index what is there, and end ok if that completes the wait."""
    try:
        data["listed"] = list_snaps(ctx, instrument, group, detector)
    except Exception as exc:  # noqa: BLE001 - an unreachable S3 must still end the wait with a status
        log.warning("listing the bucket at timeout failed: %s", exc)
        data["listing_error"] = str(exc)
    arrivals = arrivals_for(ctx.redis, instrument, group, detector)
    if plan.nimages > 0 and len(arrivals) >= plan.nimages:
        return status(Outcome.OK, arrivals)
    if plan.nimages == 0 and arrivals:
        return status(Outcome.OK, arrivals)
    expected = plan.nimages or "any"
    return status(
        Outcome.TIMED_OUT, arrivals,
        f"{len(arrivals)} of {expected} snaps after waiting {plan.deadline - data['began']:.1f} s",
        "timed_out",
    )
