"""The name of every Redis key the fleet uses, in one place so that none collide.

Keys live in the events/ledger Redis (``settings.events_redis``), beside the bucket-event
list (``settings.events_key``). Per-visit keys carry ``{instrument}:{group}``; a group id is
an ISO timestamp, so it holds ``:`` itself: never split a key to parse it, keep the parts.
"""

from __future__ import annotations

__all__ = [
    "AFFINITY_ASSIGNMENT",
    "AFFINITY_EVENTS",
    "AFFINITY_STATE",
    "CATCHUP_PENDING",
    "CATCHUP_RECORDS",
    "DISPATCHER_COUNTERS",
    "EXPORT_FAILED",
    "EXPORT_LOCK",
    "EXPORT_REQUESTS",
    "EXPORT_SCHEDULED",
    "EXPORT_STATS",
    "FLEET_BEATING",
    "FLEET_QUEUES",
    "FLEET_WORKERS",
    "STREAM_PREFIX",
    "VISITS_INFLIGHT",
    "VISITS_RECENT",
    "abort_key",
    "arrivals_key",
    "beat_key",
    "calib_route_key",
    "counter_key",
    "delivery_key",
    "export_done_key",
    "fault_key",
    "histogram_key",
    "pending_sidecar_key",
    "stream_key",
    "visit_end_key",
    "visit_key",
    "waiters_key",
    "wake_key",
]

# --------------------------------------------------------------------------- visits

#: Sorted set of visits whose summary is not written yet, scored by received time.
VISITS_INFLIGHT = "visits:inflight"
#: Sorted set of every visit still in the ledger, scored by received time.
VISITS_RECENT = "visits:recent"


def visit_key(instrument: str, group: str) -> str:
    """Hash: a visit's ledger (:mod:`prompt_tasks.store.ledger`)."""
    return f"visit:{instrument}:{group}"


def visit_end_key(instrument: str, group: str) -> str:
    """String: marker of the visit's signalled end."""
    return f"visit-end:{instrument}:{group}"


def abort_key(instrument: str, group: str) -> str:
    """String: marker of the visit's abort (holds the reason)."""
    return f"abort:{instrument}:{group}"


#: Prefix of the per-instrument fan-out streams Rubin's summit writes (``instrument:<name>``).
STREAM_PREFIX = "instrument:"


def stream_key(instrument: str) -> str:
    """Stream: the per-detector next_visit fan-out of ``instrument``."""
    return f"{STREAM_PREFIX}{instrument}"


# --------------------------------------------------------------------------- snaps


def arrivals_key(instrument: str, group: str, detector: int) -> str:
    """Hash: the detector-visit's indexed snaps."""
    return f"arrivals:{instrument}:{group}:{detector}"


def wake_key(instrument: str, group: str, detector: int) -> str:
    """List: what the detector-visit's waiter blocks on."""
    return f"wake:{instrument}:{group}:{detector}"


def waiters_key(instrument: str, group: str) -> str:
    """Set: the visit's detectors someone waits for."""
    return f"waiters:{instrument}:{group}"


def pending_sidecar_key(bucket: str, sidecar_key: str) -> str:
    """String: a raw whose JSON sidecar has not arrived yet."""
    return f"pending-sidecar:{bucket}:{sidecar_key}"


def calib_route_key(instrument: str, group: str) -> str:
    """Hash: a calibration group's raws and results on the raw-calibration route."""
    return f"calib-route:{instrument}:{group}"


#: Hash: the dispatcher's event counters, by outcome and reason.
DISPATCHER_COUNTERS = "dispatcher:counters"

# --------------------------------------------------------------------------- stages


def delivery_key(task_id: str, retries: int) -> str:
    """Counter: the deliveries of one attempt of one task."""
    return f"deliveries:{task_id}:{int(retries)}"


def fault_key(instrument: str, group: str, detector: int | str, stage: str) -> str:
    """String: a fault injected into ``stage`` of one detector-visit (tests, drills).

    ``detector="*"`` makes the key apply to every detector of the visit.
    """
    which = detector if detector == "*" else int(detector)
    return f"fault:{instrument}:{group}:{which}:{stage}"


# --------------------------------------------------------------------------- export

#: List: export requests waiting for the writer.
EXPORT_REQUESTS = "export:requests"
#: List: requests the writer could not use, with their reason.
EXPORT_FAILED = "export:failed"
#: String: the writer's lock (one writer at a time).
EXPORT_LOCK = "export:lock"
#: String: an export run is already scheduled.
EXPORT_SCHEDULED = "export:scheduled"
#: Hash: the writer's counters.
EXPORT_STATS = "export:stats"


def export_done_key(instrument: str, group: str, detector: int) -> str:
    """String: the detector-visit's outputs are committed to the central repo."""
    return f"export:done:{instrument}:{group}:{int(detector)}"


# --------------------------------------------------------------------------- daytime

#: Hash: catch-up record of every detector-visit that did not succeed.
CATCHUP_RECORDS = "catchup:records"
#: Sorted set: the records still to redo.
CATCHUP_PENDING = "catchup:pending"

# --------------------------------------------------------------------------- fleet

#: Hash: detector queue → worker (the queue controller's decision).
AFFINITY_ASSIGNMENT = "affinity:assignment"
#: List: the controller's recent moves.
AFFINITY_EVENTS = "affinity:events"
#: Hash: the controller's own state.
AFFINITY_STATE = "affinity:state"
#: Hash: queue depths last measured.
FLEET_QUEUES = "fleet:queues"
#: Hash: live workers last seen.
FLEET_WORKERS = "fleet:workers"
#: Set: node names of the workers that have sent a heartbeat (:func:`beat_key`).
FLEET_BEATING = "fleet:beating"


def beat_key(node: str) -> str:
    """String, expiring: one worker's last heartbeat (:mod:`prompt_tasks.fleet.heartbeat`)."""
    return f"fleet:beat:{node}"


def histogram_key(name: str) -> str:
    """Hash: latency histogram ``name`` (:mod:`prompt_tasks.store.metrics`)."""
    return f"metrics:hist:{name}"


def counter_key(name: str) -> str:
    """Hash: counter ``name`` by labels."""
    return f"metrics:counter:{name}"
