"""The arrivals index: which snaps of which detector-visit are in the bucket, and wake-ups.

Redis layout (every key expires after ``settings.arrival_ttl_s``, so images that arrive with
no announced visit stay findable for a late ``next_visit`` but not forever)::

    arrivals:{instrument}:{group}:{detector}   hash  snap -> JSON {key, size, etag, t}
    wake:{instrument}:{group}:{detector}       list  one token per new arrival (BLPOP target)
    waiters:{instrument}:{group}               set   detectors someone is waiting for
    visit-end:{instrument}:{group}             str   the visit's end was signalled
    abort:{instrument}:{group}                 str   the visit was aborted (the reason)

Recording is idempotent (``HSETNX``): a duplicate event changes nothing and wakes nobody.
End and abort push a token to the wake key of every registered waiter of the group; a waiter
registers before it checks the markers, so neither can be missed.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from prompt_tasks.model.objectkeys import SnapKey
from prompt_tasks.store.keys import abort_key, arrivals_key, visit_end_key, visit_key, waiters_key, wake_key

if TYPE_CHECKING:
    import redis

__all__ = [
    "DEFAULT_TTL_S",
    "VISIT_TOKEN",
    "Arrival",
    "WaitState",
    "abort_visit",
    "arrivals_for",
    "is_aborted",
    "is_ended",
    "record_arrival",
    "register_waiter",
    "signal_end",
    "unregister_waiter",
    "visit_announced",
    "wait_state",
]

#: TTL used when a caller gives none (the default of ``settings.arrival_ttl_s``).
DEFAULT_TTL_S = 2 * 24 * 3600
#: Wake tokens kept per detector; waiters re-read the index, so one would do.
_WAKE_TOKENS_KEPT = 64
#: Token pushed to wake a waiter for a visit-level signal (end, abort).
VISIT_TOKEN = "visit"


@dataclass(frozen=True)
class Arrival:
    """One indexed snap: the object that holds it and when it was indexed."""

    snap: int
    key: str
    size: int
    etag: str
    t: float

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


# One round trip: the dispatcher's latency is the waiters' latency.
_RECORD_LUA = """
local new = redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then
  redis.call('RPUSH', KEYS[2], ARGV[1])
  redis.call('LTRIM', KEYS[2], -tonumber(ARGV[4]), -1)
  redis.call('EXPIRE', KEYS[2], ARGV[3])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return new
"""


def record_arrival(redis: redis.Redis, snap_key: SnapKey, obj_key: str, size: int, etag: str,
                   t: float | None = None, ttl_s: int = DEFAULT_TTL_S) -> bool:
    """Index one snap and wake its waiter; True when it was new, False for a duplicate."""
    t = time.time() if t is None else t
    index = arrivals_key(snap_key.instrument, snap_key.group, snap_key.detector)
    wake = wake_key(snap_key.instrument, snap_key.group, snap_key.detector)
    value = json.dumps({"key": obj_key, "size": int(size), "etag": etag, "t": t})
    script = redis.register_script(_RECORD_LUA)
    return bool(script(keys=[index, wake], args=[str(snap_key.snap), value, int(ttl_s), _WAKE_TOKENS_KEPT]))


def _decode_arrivals(raw: dict[Any, Any]) -> dict[int, Arrival]:
    out: dict[int, Arrival] = {}
    for snap, item in raw.items():
        value = json.loads(item)
        number = int(snap)
        out[number] = Arrival(number, value["key"], int(value["size"]), value["etag"], float(value["t"]))
    return out


def arrivals_for(redis: redis.Redis, instrument: str, group: str, detector: int) -> dict[int, Arrival]:
    """Every indexed snap of one detector-visit, by snap number."""
    return _decode_arrivals(redis.hgetall(arrivals_key(instrument, group, detector)))


@dataclass(frozen=True)
class WaitState:
    """What a waiter needs to decide, read in one round trip."""

    arrivals: dict[int, Arrival]
    ended: bool
    aborted: str | None


def wait_state(redis: redis.Redis, instrument: str, group: str, detector: int) -> WaitState:
    """The detector's arrivals and the visit's end and abort markers, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(arrivals_key(instrument, group, detector))
    pipe.exists(visit_end_key(instrument, group))
    pipe.get(abort_key(instrument, group))
    raw, ended, aborted = pipe.execute()
    if isinstance(aborted, bytes):
        aborted = aborted.decode(errors="replace")
    return WaitState(_decode_arrivals(raw), bool(ended), aborted)


def register_waiter(redis: redis.Redis, instrument: str, group: str, detector: int,
                    ttl_s: int = DEFAULT_TTL_S) -> None:
    """Declare that someone waits for ``detector`` of the visit (so end/abort wake it)."""
    key = waiters_key(instrument, group)
    pipe = redis.pipeline(transaction=False)
    pipe.sadd(key, str(detector))
    pipe.expire(key, ttl_s)
    pipe.execute()


def unregister_waiter(redis: redis.Redis, instrument: str, group: str, detector: int) -> None:
    """Undo :func:`register_waiter`."""
    redis.srem(waiters_key(instrument, group), str(detector))


def _wake_group(redis: redis.Redis, instrument: str, group: str, ttl_s: int) -> int:
    """Push a visit token to every registered waiter of the group; returns how many."""
    detectors = redis.smembers(waiters_key(instrument, group))
    if detectors:
        pipe = redis.pipeline(transaction=False)
        for detector in detectors:
            wake = wake_key(instrument, group, int(detector))
            pipe.rpush(wake, VISIT_TOKEN)
            pipe.expire(wake, ttl_s)
        pipe.execute()
    return len(detectors)


def signal_end(redis: redis.Redis, instrument: str, group: str, ttl_s: int = DEFAULT_TTL_S) -> int:
    """Mark the visit's exposures as complete and wake its waiters; returns waiters woken."""
    redis.set(visit_end_key(instrument, group), str(time.time()), ex=ttl_s)
    return _wake_group(redis, instrument, group, ttl_s)


def abort_visit(redis: redis.Redis, instrument: str, group: str, reason: str = "aborted",
                ttl_s: int = DEFAULT_TTL_S) -> int:
    """Mark the visit aborted and wake every waiter of it at once; returns waiters woken."""
    redis.set(abort_key(instrument, group), reason or "aborted", ex=ttl_s)
    return _wake_group(redis, instrument, group, ttl_s)


def is_aborted(redis: redis.Redis, instrument: str, group: str) -> str | None:
    """The abort reason if the visit was aborted, else None."""
    reason = redis.get(abort_key(instrument, group))
    return reason.decode(errors="replace") if isinstance(reason, bytes) else reason


def is_ended(redis: redis.Redis, instrument: str, group: str) -> bool:
    """True when the visit's end was signalled."""
    return bool(redis.exists(visit_end_key(instrument, group)))


def visit_announced(redis: redis.Redis, instrument: str, group: str) -> bool:
    """True when a ``next_visit`` for this group was received (its ledger exists)."""
    return bool(redis.exists(visit_key(instrument, group)))
