"""The bucket-event dispatcher: bucket events in, arrivals indexed, waiters woken.

One long-running loop moves each body from ``settings.event_list`` to a processing list
(``BLMOVE``, so a body is never lost if the dispatcher dies while handling it: the next start
puts it back), parses it, and for every object-created record of a known instrument indexes
the arrival (idempotently, so replays are harmless) and wakes whoever waits for it.

Every record it cannot use is logged and counted in the Redis hash :data:`COUNTERS_KEY`
(``malformed``, ``unknown_instrument``, ``bad_key``, ``non_create``...), never raised: the
loop survives garbage and Redis restarts.

Raws whose key scheme keeps the group in a sidecar (LSSTCam) are resolved by reading the
sidecar; an image whose sidecar is not there yet is parked until the sidecar's own event.
A calibration exposure (bias, dark, flat...) arriving with no announced visit starts the
raw-calibration route by sending the task :data:`CALIB_TASK` by name. The image type comes
from the key's file name, the sidecar, or else the raw's FITS header (one ranged GET, made
only for raws of no announced visit, after the arrival is indexed and its waiter woken);
see :mod:`prompt_tasks.headers`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis as redis_lib

from prompt_tasks.arrivals import DEFAULT_TTL_S, record_arrival, visit_announced
from prompt_tasks.errors import InvalidEvent
from prompt_tasks.events import ObjectEvent, parse_body
from prompt_tasks.headers import (
    calib_type_of,
    s3_header_reader,
    s3_sidecar_reader,
    should_start_calib,
)
from prompt_tasks.keys import (
    NeedsSidecar,
    SnapKey,
    instrument_of,
    register_scheme,
    resolve,
    scheme_for,
)

if TYPE_CHECKING:
    from prompt_tasks.context import Context

__all__ = [
    "CALIB_QUEUE",
    "CALIB_TASK",
    "COUNTERS",
    "COUNTERS_KEY",
    "DEFAULT_INSTRUMENTS",
    "Dispatcher",
    "counters",
    "dispatcher_for",
    "known_instruments",
    "use_plugin_schemes",
]

log = logging.getLogger(__name__)

#: Redis hash of the dispatcher's counters (read by ``stack status`` and the benchmarks).
COUNTERS_KEY = "dispatcher:counters"
#: Every counter the dispatcher keeps.
COUNTERS: tuple[str, ...] = (
    "bodies", "ok", "duplicate", "malformed", "unknown_instrument", "bad_key", "non_create",
    "pending_sidecar", "sidecar", "calib_started", "error",
)
#: Instruments known until the instrument registry provides its list.
DEFAULT_INSTRUMENTS = frozenset({"SimCam", "LSSTCam", "LSSTComCam"})
#: The raw-calibration route's task, sent by name (its body lives with the calibration code).
CALIB_TASK = "prompt_tasks.calibration.process_calib"
#: Queue of the raw-calibration route: the compute workers' catch-up queue.
CALIB_QUEUE = "catchup"
def known_instruments() -> frozenset[str]:
    """Names of the instruments the fleet knows (the instrument registry, when present)."""
    try:
        from prompt_tasks.instruments import known_instruments as registry_known
    except ImportError:
        return DEFAULT_INSTRUMENTS
    return frozenset(registry_known())


def use_plugin_schemes(instruments: Iterable[str]) -> dict[str, str]:
    """Register the key scheme each instrument's plugin names; returns instrument → scheme.

    An instrument whose plugin cannot be loaded keeps the scheme it has (logged).
    """
    used: dict[str, str] = {}
    try:
        from prompt_tasks.instruments import load_plugin
    except ImportError:
        return used
    for name in instruments:
        try:
            register_scheme(name, load_plugin(name).key_scheme)
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the dispatcher
            log.warning("instrument %s: key scheme from its plugin not used (%s)", name, exc)
            continue
        used[name] = scheme_for(name).name
    return used


def counters(redis: redis_lib.Redis) -> dict[str, int]:
    """The dispatcher's counters (every name of :data:`COUNTERS`, 0 when never counted)."""
    raw = redis.hgetall(COUNTERS_KEY)
    values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return {name: values.get(name, 0) for name in COUNTERS} | values


def _pending_key(bucket: str, sidecar_key: str) -> str:
    return f"pending-sidecar:{bucket}:{sidecar_key}"


def _calib_key(instrument: str, group: str) -> str:
    return f"calib-route:{instrument}:{group}"


@dataclass
class Dispatcher:
    """Handles bucket-event bodies and runs the BLMOVE loop.

    Parameters
    ----------
    redis
        Client of the events Redis (where the list, index and counters live); it should
        not decode responses, so that non-UTF-8 garbage is counted, not fatal.
    event_list
        The list the object store pushes to.
    known
        Instrument names whose raws are indexed.
    read_sidecar
        ``(bucket, key) -> dict | None``; needed only for sidecar key schemes.
    read_header
        ``(bucket, key) -> FITS primary header | None``; read only for raws of no announced
        visit whose key and sidecar do not say their image type.
    send_task
        ``Celery.send_task`` of the app that starts the calibration route (None: not started).
    ttl_s
        Lifetime of index entries (``settings.arrival_ttl_s``).
    """

    redis: redis_lib.Redis
    event_list: str
    known: frozenset[str] = DEFAULT_INSTRUMENTS
    read_sidecar: Callable[[str, str], Mapping[str, Any] | None] = lambda bucket, key: None
    read_header: Callable[[str, str], Mapping[str, Any] | None] = lambda bucket, key: None
    send_task: Callable[..., Any] | None = None
    ttl_s: int = DEFAULT_TTL_S
    _recover: bool = field(default=True, repr=False)

    @property
    def processing_list(self) -> str:
        """Where a body sits while it is handled."""
        return f"{self.event_list}:processing"

    # --- one body -------------------------------------------------------------------------
    def handle_body(self, raw: bytes | str, count: bool = True) -> list[str]:
        """Handle one list item; returns the outcome of each record (counted if ``count``)."""
        try:
            events = parse_body(raw)
        except InvalidEvent as exc:
            log.warning("malformed bucket event (%s): %.200r", exc, raw)
            outcomes = ["malformed"]
        else:
            outcomes = [self._handle_guarded(event) for event in events]
        if count:
            self._count(outcomes, body=True)
        return outcomes

    def _handle_guarded(self, event: ObjectEvent) -> str:
        try:
            return self.handle_event(event)
        except redis_lib.RedisError:
            raise
        except Exception:
            log.exception("bucket event %s/%s could not be handled", event.bucket, event.key)
            return "error"

    def handle_event(self, event: ObjectEvent) -> str:
        """Index one record; returns its outcome (``ok``, ``duplicate``, ``bad_key``...)."""
        if not event.is_create:
            log.info("ignored %s event for %s/%s", event.event_name, event.bucket, event.key)
            return "non_create"
        try:
            instrument = instrument_of(event.key)
        except InvalidEvent as exc:
            log.warning("bucket event with a bad key: %s", exc)
            return "bad_key"
        if instrument not in self.known:
            log.warning("bucket event for unknown instrument %r: %s", instrument, event.key)
            return "unknown_instrument"
        scheme = scheme_for(instrument)
        if scheme.sidecar_of(event.key) is not None:
            return self._sidecar_arrived(event)
        try:
            snap, header = resolve(event.key, lambda key: self.read_sidecar(event.bucket, key))
        except NeedsSidecar as exc:
            self._park(event, exc.sidecar)
            return "pending_sidecar"
        except InvalidEvent as exc:
            log.warning("bucket event with a key outside the %s scheme: %s", scheme.name, exc)
            return "bad_key"
        return self._record(event, snap, header)

    def _record(self, event: ObjectEvent, snap: SnapKey, header: Mapping[str, Any] | None) -> str:
        new = record_arrival(self.redis, snap, event.key, event.size, event.etag, time.time(), self.ttl_s)
        if not new:
            log.info("duplicate event for %s", event.key)
            return "duplicate"
        log.debug("indexed %s as %s", event.key, snap)
        # The waiter is already woken; what follows only concerns raws of no announced visit.
        if visit_announced(self.redis, snap.instrument, snap.group):
            return "ok"
        calib_type = calib_type_of(snap, header)
        if calib_type is None and header is None:
            header = self.read_header(event.bucket, event.key)
            calib_type = calib_type_of(snap, header)
        if should_start_calib(calib_type, announced=False):
            self._start_calib(event, snap, calib_type or "")
        return "ok"

    def _start_calib(self, event: ObjectEvent, snap: SnapKey, calib_type: str) -> None:
        if self.send_task is None:
            log.warning("calibration raw %s not routed: no Celery app", event.key)
            return
        kwargs = {
            "instrument": snap.instrument, "group": snap.group, "detector": snap.detector,
            "snap": snap.snap, "bucket": event.bucket, "key": event.key, "calib_type": calib_type,
        }
        result = self.send_task(CALIB_TASK, kwargs=kwargs, queue=CALIB_QUEUE)
        record = json.dumps({"task_id": str(result.id), "calib_type": calib_type, "key": event.key,
                             "t": time.time()})
        calib = _calib_key(snap.instrument, snap.group)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(calib, f"{snap.detector}:{snap.snap}", record)
        pipe.expire(calib, self.ttl_s)
        pipe.hincrby(COUNTERS_KEY, "calib_started", 1)
        pipe.execute()
        log.info("started the %s calibration route for %s (task %s)", calib_type, event.key, result.id)

    def _park(self, event: ObjectEvent, sidecar_key: str) -> None:
        pending = _pending_key(event.bucket, sidecar_key)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(pending, json.dumps(event.__dict__))
        pipe.expire(pending, self.ttl_s)
        pipe.execute()
        log.info("%s waits for its sidecar %s", event.key, sidecar_key)

    def _sidecar_arrived(self, event: ObjectEvent) -> str:
        """A sidecar landed: index the images parked on it."""
        pending = _pending_key(event.bucket, event.key)
        parked = self.redis.lrange(pending, 0, -1)
        if parked:
            sidecar = self.read_sidecar(event.bucket, event.key)
            if sidecar is None:
                log.warning("sidecar %s/%s announced but not readable", event.bucket, event.key)
                return "bad_key"
            for raw in parked:
                image = ObjectEvent(**json.loads(raw))
                try:
                    snap = scheme_for(instrument_of(image.key)).parse(image.key, sidecar)
                except InvalidEvent as exc:
                    log.warning("parked image %s: %s", image.key, exc)
                    self._count(["bad_key"])
                    continue
                self._count([self._record(image, snap, sidecar)])
            self.redis.delete(pending)
        return "sidecar"

    def _count(self, outcomes: Iterable[str], body: bool = False, done: bytes | str | None = None) -> None:
        """Count outcomes (and a body); drop ``done`` from the processing list, in one trip."""
        pipe = self.redis.pipeline(transaction=False)
        if body:
            pipe.hincrby(COUNTERS_KEY, "bodies", 1)
        for outcome in outcomes:
            pipe.hincrby(COUNTERS_KEY, outcome, 1)
        if done is not None:
            pipe.lrem(self.processing_list, 1, done)
        pipe.execute()

    # --- the loop -------------------------------------------------------------------------
    def recover(self) -> int:
        """Put bodies left in the processing list (by a dispatcher that died) back in line."""
        moved = 0
        while self.redis.lmove(self.processing_list, self.event_list, "RIGHT", "LEFT") is not None:
            moved += 1
        if moved:
            log.warning("put %d unfinished bucket events back in %s", moved, self.event_list)
        return moved

    def step(self, block_s: float = 1.0) -> bool:
        """Handle at most one body, blocking up to ``block_s``; False when none came."""
        if self._recover:
            self.recover()
            self._recover = False
        raw = self.redis.blmove(self.event_list, self.processing_list, block_s, "LEFT", "RIGHT")
        if raw is None:
            return False
        try:
            outcomes = self.handle_body(raw, count=False)
        except redis_lib.RedisError:
            raise  # the body stays in the processing list and is recovered after reconnecting
        except Exception:
            log.exception("bucket event body could not be handled: %.200r", raw)
            outcomes = ["error"]
        self._count(outcomes, body=True, done=raw)
        return True

    def run(self, stop: threading.Event, block_s: float = 1.0) -> None:
        """Handle bodies until ``stop`` is set; survives Redis going away and coming back."""
        log.info("dispatcher reading %s (instruments: %s)", self.event_list, ", ".join(sorted(self.known)))
        backoff = 0.1
        while not stop.is_set():
            try:
                self.step(block_s)
                backoff = 0.1
            except (redis_lib.ConnectionError, redis_lib.TimeoutError, redis_lib.BusyLoadingError) as exc:
                log.warning("events Redis unavailable (%s); retrying in %.1f s", exc, backoff)
                self._recover = True
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            except Exception:  # never die: log, pause, carry on
                log.exception("dispatcher error; carrying on")
                self._recover = True
                stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        log.info("dispatcher stopped")


def dispatcher_for(ctx: Context, known: frozenset[str] | None = None, celery_app: Any = None) -> Dispatcher:
    """A dispatcher on the clients of ``ctx`` (the Celery app sends calibration tasks).

    ``known`` None: the instrument registry's instruments, with their plugins' key schemes.

    It gets its own Redis client, returning bytes: a body that is not UTF-8 must reach the
    parser (and be counted as malformed), not break the client that reads it.
    """
    client = ctx.extras.get("dispatcher_redis")
    if client is None:
        client = redis_lib.Redis.from_url(
            ctx.settings.events_redis, socket_keepalive=True, health_check_interval=10
        )
        ctx.extras["dispatcher_redis"] = client
    if known is None:
        known = known_instruments()
        use_plugin_schemes(known)
    return Dispatcher(
        redis=client,
        event_list=ctx.settings.event_list,
        known=known,
        read_sidecar=s3_sidecar_reader(ctx.s3),
        read_header=s3_header_reader(ctx.s3),
        send_task=None if celery_app is None else celery_app.send_task,
        ttl_s=ctx.settings.arrival_ttl_s,
    )
