"""Export: pipeline outputs and raws written back to the central repo, in batches.

``run_pipeline`` does not write to the central repo itself: it appends an
:class:`ExportRequest` (which local repo, which dataset ids) to a Redis list and pokes the
``export`` task. The export task drains the list under a Redis lock, so one writer runs at a
time, and writes up to ``settings.export_batch`` requests in one central transaction: the
central registry sees a few large transactions instead of hundreds of small concurrent ones.
A partial batch is written once its oldest request is ``settings.export_max_age_s`` old (one
delayed flush is scheduled at a time).

Exporting is idempotent: dataset ids are those of the local repo (deterministic for raws,
kept by ``transfer_from`` for outputs), dimension records are inserted with
``skip_existing``, and a request leaves the list only after its batch is committed. A failed
batch stays in the list and is retried by the task, without rerunning any pipeline.

The flush decision (:func:`decide_flush`) is pure; the rest is Redis and Butler I/O.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockError

if TYPE_CHECKING:
    import redis
    from lsst.daf.butler import Butler, DatasetRef

    from prompt_tasks.context import Context

__all__ = [
    "EXPORT_FAILED",
    "EXPORT_LIST",
    "EXPORT_LOCK",
    "EXPORT_SCHEDULED",
    "EXPORT_STATS",
    "ExportRequest",
    "ExportResult",
    "decide_flush",
    "drain",
    "enqueue",
    "export_batch",
    "is_exported",
    "pending",
]

#: Redis list of pending export requests (JSON), oldest first.
EXPORT_LIST = "export:requests"
#: Redis list of requests that can never be exported (their local repo or datasets are gone).
EXPORT_FAILED = "export:failed"
#: Lock held by the one export writer.
EXPORT_LOCK = "export:lock"
#: Set while a delayed flush is scheduled.
EXPORT_SCHEDULED = "export:scheduled"
#: Hash of counters: batches, requests, datasets written.
EXPORT_STATS = "export:stats"
#: Output dataset types never exported by default.
_BOOKKEEPING_SUFFIXES = ("_metadata", "_log", "_config")


@dataclass
class ExportRequest:
    """One detector-visit whose outputs (and raws) should reach the central repo."""

    instrument: str
    group: str
    detector: int
    visit: int
    local_repo: str
    run: str
    outputs: list[str] = field(default_factory=list)
    raws: list[str] = field(default_factory=list)
    enqueued: float = field(default_factory=time.time)

    def to_json(self) -> str:
        """JSON form (the Redis list item)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ExportRequest:
        """Inverse of :meth:`to_json`."""
        return cls(**json.loads(text))


@dataclass
class ExportResult:
    """What one drain did."""

    batches: int = 0
    requests: int = 0
    datasets: int = 0
    dropped: int = 0
    waiting: int = 0
    busy: bool = False
    flush_in: float | None = None
    times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def decide_flush(pending: int, oldest_age: float, batch: int, max_age: float, force: bool) -> float | None:
    """Whether to write a batch now (``0.0``), later (seconds to wait), or not at all (None)."""
    if pending <= 0:
        return None
    if force or pending >= batch or oldest_age >= max_age:
        return 0.0
    return max_age - oldest_age


def enqueue(client: redis.Redis, request: ExportRequest) -> int:
    """Append ``request`` to the export list; the list's length."""
    return int(client.rpush(EXPORT_LIST, request.to_json()))


def pending(client: redis.Redis) -> int:
    """Requests waiting to be exported."""
    return int(client.llen(EXPORT_LIST))


def _wanted(name: str, dataset_types: Sequence[str] | None) -> bool:
    if dataset_types is not None:
        return name in dataset_types
    return not name.endswith(_BOOKKEEPING_SUFFIXES) and name != "packages"


def _visit_records(local: Butler, request: ExportRequest) -> dict[str, list[Any]]:
    """Every record of the visit and its exposures, in insertion order (foreign keys first).

    Datasets' data ids do not carry the visit definitions, the visit system memberships or
    the detector regions, and an output may name only the visit or only the exposure.
    """
    instrument = request.instrument
    visit_id = {"instrument": instrument, "visit": request.visit}
    definitions = list(local.query_dimension_records("visit_definition", data_id=visit_id, explain=False))
    exposures = sorted({d.exposure for d in definitions})
    exposure_records = list(local.query_dimension_records(
        "exposure", data_id={"instrument": instrument}, where="exposure IN (exps)",
        bind={"exps": exposures}, explain=False)) if exposures else []
    days = sorted({e.day_obs for e in exposure_records})
    groups = sorted({e.group for e in exposure_records})
    return {
        "day_obs": list(local.query_dimension_records(
            "day_obs", data_id={"instrument": instrument}, where="day_obs IN (days)", bind={"days": days},
            explain=False)) if days else [],
        "group": list(local.query_dimension_records(
            "group", data_id={"instrument": instrument}, where="group IN (groups)", bind={"groups": groups},
            explain=False)) if groups else [],
        "exposure": exposure_records,
        "visit": list(local.query_dimension_records("visit", data_id=visit_id, explain=False)),
        "visit_definition": definitions,
        "visit_system_membership": list(local.query_dimension_records(
            "visit_system_membership", data_id=visit_id, explain=False)),
        "visit_detector_region": list(local.query_dimension_records(
            "visit_detector_region", data_id={**visit_id, "detector": request.detector}, explain=False)),
    }


def _refs(local: Butler, ids: Iterable[str]) -> list[DatasetRef]:
    return list(local.get_many_datasets([uuid.UUID(i) for i in ids]))


def export_batch(central: Butler, requests: Sequence[ExportRequest],
                 open_local: Callable[[str], Butler], dataset_types: Sequence[str] | None,
                 export_raws: bool) -> tuple[int, list[ExportRequest]]:
    """Write ``requests`` to ``central`` in one transaction.

    Returns the number of datasets written (or already there) and the requests that can never
    be exported (local repo gone); those are left out of the transaction.
    """
    unusable: list[ExportRequest] = []
    work: list[tuple[ExportRequest, Butler, list[DatasetRef], dict[str, list[Any]]]] = []
    for request in requests:
        try:
            local = open_local(request.local_repo)
        except (FileNotFoundError, ValueError, RuntimeError):
            unusable.append(request)
            continue
        refs = [ref for ref in _refs(local, request.outputs) if _wanted(ref.datasetType.name, dataset_types)]
        if export_raws:
            refs += _refs(local, request.raws)
        work.append((request, local, refs, _visit_records(local, request)))
    written = 0
    # New dataset types may create tables, which cannot happen inside a transaction.
    dataset_types = {ref.datasetType.name: ref.datasetType for _, _, refs, _ in work for ref in refs}
    for dataset_type in dataset_types.values():
        central.registry.registerDatasetType(dataset_type)
    with central.transaction():
        for _request, local, refs, records in work:
            for element, element_records in records.items():
                if element_records:
                    central.registry.insertDimensionData(element, *element_records, skip_existing=True)
            if refs:
                written += len(central.transfer_from(
                    local, refs, transfer="copy", skip_missing=True,
                    register_dataset_types=True, transfer_dimensions=True,
                ))
    return written, unusable


def drain(ctx: Context, central: Butler, open_local: Callable[[str], Butler],
          schedule: Callable[[float], None], force: bool = False, lock_timeout: float = 600.0) -> ExportResult:
    """Export pending requests in batches while holding the writer lock.

    Parameters
    ----------
    schedule
        Called with a delay (s) to have :func:`drain` run again later when a partial batch
        must wait for its age; at most one such flush is pending at a time.
    force
        Write a partial batch now, whatever its age (``prompt-tasks export flush``).

    A drain that finds the lock taken returns at once (``busy``): the holder looks at the
    list again after releasing the lock, so no request is stranded.
    """
    client = ctx.redis
    result = ExportResult()
    while True:
        lock = client.lock(EXPORT_LOCK, timeout=lock_timeout, blocking=False)
        if not lock.acquire(blocking=False):
            result.busy = True
            return result
        try:
            _drain_locked(ctx, central, open_local, schedule, force, result)
        finally:
            with contextlib.suppress(LockError):  # expired: another writer may hold it now
                lock.release()
        if result.flush_in is not None or pending(client) == 0:
            return result


def _drain_locked(ctx: Context, central: Butler, open_local: Callable[[str], Butler],
                  schedule: Callable[[float], None], force: bool, result: ExportResult) -> None:
    client = ctx.redis
    settings = ctx.settings
    while True:
        head = client.lindex(EXPORT_LIST, 0)
        if head is None:
            return
        oldest = ExportRequest.from_json(head)
        when = decide_flush(pending(client), time.time() - oldest.enqueued, settings.export_batch,
                            settings.export_max_age_s, force)
        if when is None:
            return
        if when > 0:
            result.waiting = pending(client)
            result.flush_in = when
            # The marker expires just before the delayed drain runs, so that drain may
            # schedule the next one.
            if client.set(EXPORT_SCHEDULED, "1", nx=True, px=max(int(when * 1000), 1)):
                schedule(when + 0.1)
            return
        items = client.lrange(EXPORT_LIST, 0, settings.export_batch - 1)
        requests = [ExportRequest.from_json(item) for item in items]
        t0 = time.perf_counter()
        written, unusable = export_batch(central, requests, open_local,
                                         settings.export_dataset_types, settings.export_raws)
        pipe = client.pipeline(transaction=True)
        pipe.ltrim(EXPORT_LIST, len(items), -1)  # only the lock holder removes items
        for request in unusable:
            pipe.rpush(EXPORT_FAILED, request.to_json())
        pipe.hincrby(EXPORT_STATS, "batches", 1)
        pipe.hincrby(EXPORT_STATS, "requests", len(requests) - len(unusable))
        pipe.hincrby(EXPORT_STATS, "datasets", written)
        for request in requests:
            if request not in unusable:
                pipe.set(_done_key(request), repr(time.time()), ex=settings.ledger_ttl_s)
        pipe.execute()
        result.batches += 1
        result.requests += len(requests) - len(unusable)
        result.dropped += len(unusable)
        result.datasets += written
        result.times.append(round(time.perf_counter() - t0, 4))


def _done_key(request: ExportRequest) -> str:
    return f"export:done:{request.instrument}:{request.group}:{request.detector}"


def is_exported(client: redis.Redis, instrument: str, group: str, detector: int) -> bool:
    """True once the detector-visit's outputs are committed to the central repo."""
    return bool(client.exists(f"export:done:{instrument}:{group}:{int(detector)}"))
