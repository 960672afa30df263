"""The bucket-event dispatcher: bucket events in, arrivals indexed, waiters woken.

One long-running loop moves each body from ``settings.event_list`` to a processing list
(``BLMOVE``, so a body is never lost if the dispatcher dies while handling it: the next start
puts it back), parses it, and for every object-created record of a known instrument indexes
the arrival (idempotently, so replays are harmless) and wakes whoever waits for it.

Every record it cannot use is counted in the Redis hash :data:`DISPATCHER_COUNTERS` by reason
and logged once per reason per ``log_interval_s`` (with how many were not logged), never
raised and never indexed: the loop survives garbage, forgeries and Redis restarts. A record is
accepted only when it is

- for a configured raw bucket (``wrong_bucket`` otherwise),
- for a known instrument (``unknown_instrument``) under its key scheme (``bad_key``),
- for a detector that instrument has (``unknown_detector``): its plugin's geometry, by default
  and as the central repo's camera describes it, plus the configured active detectors;
- of an object that exists (``missing_object``), checked only for raws of no announced visit:
  those are read anyway (their header says whether they start the calibration route), while
  the raws of an announced visit are indexed at once, unread, so that their waiter wakes
  without an S3 round trip. An announced raw that turns out not to exist fails its
  detector-visit at ingest, which records it for catch-up.

A body that is not JSON, has an unknown shape, is over ``MAX_BODY_BYTES`` or nests deeper than
``MAX_DEPTH`` (:mod:`prompt_tasks.model.events`) is counted ``malformed``.

Raws whose key scheme keeps the group in a sidecar (LSSTCam) are resolved by reading the
sidecar; an image whose sidecar is not there yet is parked until the sidecar's own event.
A calibration exposure (bias, dark, flat...) arriving with no announced visit starts the
raw-calibration route by sending the task :data:`CALIB_TASK` by name. The image type comes
from the key's file name, the sidecar, or else the raw's FITS header (one ranged GET, made
only for raws of no announced visit, after the arrival is indexed and its waiter woken);
see :mod:`prompt_tasks.model.headers`.
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

from prompt_tasks.butler.central import central_cameras
from prompt_tasks.errors import InvalidEvent
from prompt_tasks.flow.router import parse_detector_spec
from prompt_tasks.instruments import UnknownInstrument, load_plugin
from prompt_tasks.instruments import known_instruments as plugin_instruments
from prompt_tasks.model.events import ObjectEvent, parse_body
from prompt_tasks.model.headers import (
    calib_type_of,
    should_start_calib,
)
from prompt_tasks.model.objectkeys import (
    NeedsSidecar,
    SnapKey,
    instrument_of,
    register_scheme,
    registered_schemes,
    resolve,
    scheme_for,
)
from prompt_tasks.objstore import header_reader, object_checker, sidecar_reader
from prompt_tasks.store.arrivals import DEFAULT_TTL_S, record_arrival, visit_announced
from prompt_tasks.store.keys import DISPATCHER_COUNTERS, calib_route_key, pending_sidecar_key

if TYPE_CHECKING:
    from prompt_tasks.context import Context
    from prompt_tasks.settings import Settings

__all__ = [
    "CALIB_QUEUE",
    "CALIB_TASK",
    "COUNTERS",
    "Dispatcher",
    "InstrumentDetectors",
    "counters",
    "dispatcher_for",
    "known_instruments",
    "use_plugin_schemes",
]

log = logging.getLogger(__name__)

#: Every counter the dispatcher keeps.
COUNTERS: tuple[str, ...] = (
    "bodies", "ok", "duplicate", "malformed", "wrong_bucket", "unknown_instrument", "bad_key",
    "unknown_detector", "missing_object", "non_create", "pending_sidecar", "sidecar",
    "calib_started", "error",
)
#: The raw-calibration route's task, sent by name (its body lives with the calibration code).
CALIB_TASK = "prompt_tasks.calibration.process_calib"
#: Queue of the raw-calibration route: the compute workers' catch-up queue.
CALIB_QUEUE = "catchup"


def known_instruments() -> frozenset[str]:
    """The instruments whose raws the fleet accepts: every plugin's, and every registered key scheme's."""
    return frozenset(plugin_instruments()) | frozenset(registered_schemes())


def use_plugin_schemes(instruments: Iterable[str]) -> dict[str, str]:
    """Register the key scheme each instrument's plugin names; returns instrument → scheme.

    An instrument whose plugin cannot be loaded keeps the scheme it has (logged).
    """
    used: dict[str, str] = {}
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
    raw = redis.hgetall(DISPATCHER_COUNTERS)
    values = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
    return {name: values.get(name, 0) for name in COUNTERS} | values


@dataclass
class InstrumentDetectors:
    """``(instrument, detector) -> bool``: does the instrument have that detector?

    The detectors of an instrument are those of its plugin's default geometry and the
    configured active ones (``settings.active_detectors``); on a miss, the central repo's
    camera (a simulated camera's focal plane is chosen when its repo is built) is read too,
    at most once per ``refresh_s``. An instrument with no plugin, or whose geometry does not
    list its detectors, cannot be checked: any detector is accepted.
    """

    settings: Settings
    refresh_s: float = 60.0
    _ids: dict[str, frozenset[int] | None] = field(default_factory=dict, repr=False)
    _read_at: dict[str, float] = field(default_factory=dict, repr=False)

    def __call__(self, instrument: str, detector: int) -> bool:
        """True when ``instrument`` has ``detector`` (or its detectors are not known)."""
        if instrument not in self._ids:
            self._ids[instrument] = self._detectors(instrument, central=False)
        ids = self._ids[instrument]
        if ids is None or detector in ids:
            return True
        now = time.monotonic()
        if now - self._read_at.get(instrument, -self.refresh_s) >= self.refresh_s:
            self._read_at[instrument] = now
            ids = self._ids[instrument] = self._detectors(instrument, central=True)
        return ids is None or detector in ids

    def _detectors(self, instrument: str, central: bool) -> frozenset[int] | None:
        try:
            plugin = load_plugin(instrument)
        except UnknownInstrument:
            return None
        cameras: list[Mapping[str, Any] | None] = [None]
        if central:
            cameras += list(central_cameras(self.settings, [instrument]).values())
        ids: set[int] = set(parse_detector_spec(self.settings.active_detectors).get(instrument, []))
        for camera in cameras[:1] + [c for c in cameras[1:] if c is not None]:
            listed = getattr(plugin.geometry(camera), "detectors", None)
            if listed is None:
                return None
            ids.update(int(getattr(det, "id", det)) for det in listed)
        return frozenset(ids)


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
    buckets
        The raw buckets whose events are accepted (None: any bucket).
    has_detector
        ``(instrument, detector) -> bool`` (:class:`InstrumentDetectors`); default: any.
    object_exists
        ``(bucket, key) -> bool | None`` (None: cannot tell, e.g. S3 down: accepted).
    log_interval_s
        A rejection reason is logged at most once per this many seconds.
    """

    redis: redis_lib.Redis
    event_list: str
    known: frozenset[str] = field(default_factory=known_instruments)
    read_sidecar: Callable[[str, str], Mapping[str, Any] | None] = lambda bucket, key: None
    read_header: Callable[[str, str], Mapping[str, Any] | None] = lambda bucket, key: None
    send_task: Callable[..., Any] | None = None
    ttl_s: int = DEFAULT_TTL_S
    buckets: frozenset[str] | None = None
    has_detector: Callable[[str, int], bool] = lambda instrument, detector: True
    object_exists: Callable[[str, str], bool | None] = lambda bucket, key: None
    log_interval_s: float = 60.0
    _recover: bool = field(default=True, repr=False)
    _logged: dict[str, float] = field(default_factory=dict, repr=False)
    _unlogged: dict[str, int] = field(default_factory=dict, repr=False)

    @property
    def processing_list(self) -> str:
        """Where a body sits while it is handled."""
        return f"{self.event_list}:processing"

    # --- one body -------------------------------------------------------------------------
    def _reject(self, reason: str, message: str, *args: Any) -> str:
        """Log a rejection (once per reason per ``log_interval_s``); returns ``reason``."""
        now = time.monotonic()
        last = self._logged.get(reason)
        if last is not None and now - last < self.log_interval_s:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return reason
        self._logged[reason] = now
        unlogged = self._unlogged.pop(reason, 0)
        more = f" ({unlogged} more not logged since the last)" if unlogged else ""
        log.warning("bucket event rejected, %s: " + message + "%s", reason, *args, more)
        return reason

    def handle_body(self, raw: bytes | str, count: bool = True) -> list[str]:
        """Handle one list item; returns the outcome of each record (counted if ``count``)."""
        try:
            events = parse_body(raw)
        except InvalidEvent as exc:
            outcomes = [self._reject("malformed", "%.200s", exc)]
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
        if self.buckets is not None and event.bucket not in self.buckets:
            return self._reject("wrong_bucket", "bucket %.100r is not a raw bucket (%.200r)", event.bucket, event.key)
        if not event.is_create:
            log.info("ignored %s event for %s/%s", event.event_name, event.bucket, event.key)
            return "non_create"
        try:
            instrument = instrument_of(event.key)
        except InvalidEvent as exc:
            return self._reject("bad_key", "%.200s", exc)
        if instrument not in self.known:
            return self._reject("unknown_instrument", "%.100r (%.200r)", instrument, event.key)
        scheme = scheme_for(instrument)
        if scheme.sidecar_of(event.key) is not None:
            return self._sidecar_arrived(event)
        try:
            snap, header = resolve(event.key, lambda key: self.read_sidecar(event.bucket, key))
        except NeedsSidecar as exc:
            self._park(event, exc.sidecar)
            return "pending_sidecar"
        except InvalidEvent as exc:
            return self._reject("bad_key", "outside the %s scheme: %.200s", scheme.name, exc)
        return self._record(event, snap, header)

    def _record(self, event: ObjectEvent, snap: SnapKey, header: Mapping[str, Any] | None) -> str:
        if not self.has_detector(snap.instrument, snap.detector):
            return self._reject("unknown_detector", "%s has no detector %d (%.200r)",
                                snap.instrument, snap.detector, event.key)
        announced = visit_announced(self.redis, snap.instrument, snap.group)
        if not announced and header is None:  # nobody waits: read it (image type, existence)
            header = self.read_header(event.bucket, event.key)
            if header is None and self.object_exists(event.bucket, event.key) is False:
                return self._reject("missing_object", "%.200r is not in bucket %.100r", event.key, event.bucket)
        new = record_arrival(self.redis, snap, event.key, event.size, event.etag, time.time(), self.ttl_s)
        if not new:
            log.info("duplicate event for %s", event.key)
            return "duplicate"
        log.debug("indexed %s as %s", event.key, snap)
        if announced:  # the waiter is woken; the rest concerns raws of no announced visit
            return "ok"
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
        calib = calib_route_key(snap.instrument, snap.group)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(calib, f"{snap.detector}:{snap.snap}", record)
        pipe.expire(calib, self.ttl_s)
        pipe.hincrby(DISPATCHER_COUNTERS, "calib_started", 1)
        pipe.execute()
        log.info("started the %s calibration route for %s (task %s)", calib_type, event.key, result.id)

    def _park(self, event: ObjectEvent, sidecar_key: str) -> None:
        pending = pending_sidecar_key(event.bucket, sidecar_key)
        pipe = self.redis.pipeline(transaction=False)
        pipe.rpush(pending, json.dumps(event.__dict__))
        pipe.expire(pending, self.ttl_s)
        pipe.execute()
        log.info("%s waits for its sidecar %s", event.key, sidecar_key)

    def _sidecar_arrived(self, event: ObjectEvent) -> str:
        """A sidecar landed: index the images parked on it."""
        pending = pending_sidecar_key(event.bucket, event.key)
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
            pipe.hincrby(DISPATCHER_COUNTERS, "bodies", 1)
        for outcome in outcomes:
            pipe.hincrby(DISPATCHER_COUNTERS, outcome, 1)
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
            log.exception("bucket event body could not be handled (%d bytes)", len(raw))
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
        read_sidecar=sidecar_reader(ctx.s3),
        read_header=header_reader(ctx.s3),
        send_task=None if celery_app is None else celery_app.send_task,
        ttl_s=ctx.settings.arrival_ttl_s,
        buckets=frozenset({ctx.settings.raw_bucket}),
        has_detector=InstrumentDetectors(ctx.settings),
        object_exists=object_checker(ctx.s3),
    )
