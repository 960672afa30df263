"""The registry writer: export messages registered in the central repo, in batches, by one writer.

Compute workers have already written the files into the central datastore
(:mod:`prompt_tasks.butler.export`); the writer only registers them. It drains the Redis list
of messages under a lock, so one writer runs at a time, and registers up to
``settings.export_batch`` messages in one central transaction: dimension records inserted with
``skip_existing``, the datasets imported with their ids, and the datastore records the compute
worker sent registered as they are (:func:`_register_files`; ``Butler.ingest`` for a file
sent without its record). The central registry sees a few large transactions
instead of hundreds of small concurrent ones. A partial batch is written once its oldest
message is ``settings.export_max_age_s`` old (one delayed flush is scheduled at a time). A
compute worker hands its message over with :func:`hand_over`, which sends the ``export`` task
only when no drain has the message covered already (:func:`needs_drain`).

At least once, and idempotent: a message leaves the list only after its batch is committed
(a writer killed mid-batch loses nothing); dataset ids are the compute worker's, so a message
applied twice registers once. A failed batch stays in the list and is retried without
rerunning any pipeline. A message that can never be registered (not an export message, files
missing from the datastore, another datastore's files, refused by the registry) is parked in
:data:`~prompt_tasks.store.keys.EXPORT_FAILED` with its reason, counted, and the writer goes on.

The flush decisions (:func:`decide_flush`, :func:`needs_drain`) and message checks are pure;
the rest is Redis and Butler I/O.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from redis.exceptions import LockError

from prompt_tasks.butler.export import ExportMessage, Queued, enqueue, pending
from prompt_tasks.flow.retry import is_transient
from prompt_tasks.objstore import exists_many
from prompt_tasks.store.keys import (
    EXPORT_FAILED,
    EXPORT_LOCK,
    EXPORT_REQUESTS,
    EXPORT_SCHEDULED,
    EXPORT_STATS,
    export_done_key,
)

if TYPE_CHECKING:
    from lsst.daf.butler import Butler

    from prompt_tasks.context import Context

__all__ = ["ExportResult", "Parked", "decide_flush", "drain", "hand_over", "import_ahead", "needs_drain",
           "register_batch", "register_isolating"]

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Parked:
    """A message set aside, and why."""

    item: str
    reason: str

    def to_json(self) -> str:
        return json.dumps({"reason": self.reason, "message": self.item})


def decide_flush(pending: int, oldest_age: float, batch: int, max_age: float, force: bool) -> float | None:
    """Whether to write a batch now (``0.0``), later (seconds to wait), or not at all (None)."""
    if pending <= 0:
        return None
    if force or pending >= batch or oldest_age >= max_age:
        return 0.0
    return max_age - oldest_age


def needs_drain(queued: Queued, batch: int) -> bool:
    """Whether a message just queued must send an ``export`` task for a drain to run.

    A writer holding the lock looks at the list again before it stops, and a scheduled drain
    writes a partial batch once it is old enough (and schedules the next), so the message is
    already covered unless neither is true; one that completes a batch sends a drain to write
    it now. A 189-detector visit's runs ending together send a few export tasks, not 189
    that find nothing to do. The beat's periodic export is the safety net for a lost one.
    """
    if queued.writing:
        return False
    return not queued.flush_scheduled or queued.length % max(batch, 1) == 0


def import_ahead() -> None:
    """Import what opening the central repo and a first drain import, nothing opened.

    Meant for the writer's worker before it forks its pool: each pool process otherwise
    imports the Butler, its registry managers and its datastore on its first ``export`` task
    (~2 CPU-s, in the middle of a night). No Butler is opened before the fork (connections and
    object-store clients are not shared across it); the pool processes open theirs as they start.
    """
    import lsst.daf.butler.datastores.fileDatastore
    import lsst.daf.butler.direct_butler
    import lsst.daf.butler.registry.databases.postgresql
    import lsst.daf.butler.registry.databases.sqlite
    import lsst.daf.butler.registry.sql_registry
    import lsst.resources.s3  # noqa: F401
    from lsst.daf.butler.registry import RegistryConfig
    from lsst.utils import doImport

    for manager in RegistryConfig()["managers"].values():  # the defaults; a repo names its own
        if isinstance(manager, str):
            doImport(manager)


def hand_over(ctx: Context, message: ExportMessage, poke: Callable[[], None] | None) -> None:
    """Queue ``message`` for the writer and ``poke`` (send an ``export`` task) if no drain has
    it covered (:func:`needs_drain`); ``None``: never poke (the caller drains itself)."""
    queued = enqueue(ctx.redis, message)
    if poke is not None and needs_drain(queued, ctx.settings.export_batch):
        poke()


def _enqueued(item: str) -> float:
    """When a list item was queued (now, for an item that does not say)."""
    try:
        value = json.loads(item).get("enqueued")
        return float(value) if value is not None else time.time()
    except (ValueError, TypeError, AttributeError):
        return time.time()


#: ``uris -> {uri: exists}`` for the files of a batch (raises when it cannot tell).
FilesExist = Callable[[Sequence[str]], dict[str, bool]]


def register_batch(central: Butler, items: Sequence[str],
                   exists: FilesExist | None = None) -> tuple[int, list[ExportMessage], list[Parked]]:
    """Register the messages of ``items`` in ``central`` in one transaction.

    Returns the number of datasets registered (or already there), the messages registered,
    and the items parked with their reason (left out of the transaction). ``exists`` checks
    that the batch's files are in the datastore (default: lsst-resources' ``mexists``; the
    writer passes the S3 server's client, a third of the CPU per object).
    """
    from lsst.daf.butler import (
        DatasetRef,
        DimensionRecord,
        FileDataset,
        SerializedDatasetRef,
        SerializedDimensionRecord,
    )
    from lsst.daf.butler.datastore.stored_file_info import SerializedStoredFileInfo, StoredFileInfo
    from lsst.resources import ResourcePath

    universe = central.dimensions
    root = central._datastore.root
    parked: list[Parked] = []
    work: list[tuple[ExportMessage, list[FileDataset], dict[str, list[Any]]]] = []
    stored: dict[Any, Any] = {}  # dataset id → the StoredFileInfo its compute worker sent
    for item in items:
        try:
            message = ExportMessage.from_json(item)
            files = [FileDataset(path=root.join(f.path),
                                 refs=[DatasetRef.from_simple(SerializedDatasetRef(**f.ref), universe=universe)],
                                 formatter=f.formatter)
                     for f in message.files]
            infos = {dataset.refs[0].id: StoredFileInfo.from_simple(SerializedStoredFileInfo(**f.stored))
                     for f, dataset in zip(message.files, files, strict=True) if f.stored is not None}
            # dependencies first (the message's JSON object does not keep an order)
            records = {element.name: [DimensionRecord.from_simple(SerializedDimensionRecord(**r), universe=universe)
                                      for r in message.records[element.name]]
                       for element in universe.sorted(message.records)}
        except Exception as exc:  # noqa: BLE001 - anything unreadable is parked, never raised
            parked.append(Parked(item, f"unreadable: {type(exc).__name__}: {exc}"))
            continue
        if message.datastore_root and ResourcePath(message.datastore_root, forceDirectory=True) != root:
            parked.append(Parked(item, f"files written to {message.datastore_root}, not this datastore ({root})"))
            continue
        work.append((message, files, records))
        stored.update(infos)
    # One round of HEADs for the whole batch: a message whose files are missing is parked.
    uris = [str(f.path) for _, files, _ in work for f in files]
    if exists is None:
        found = {str(uri): there for uri, there in ResourcePath.mexists(ResourcePath(u) for u in uris).items()}
    else:
        found = exists(uris) if uris else {}
    usable = []
    for message, files, records in work:
        missing = [str(f.path) for f in files if not found.get(str(f.path), False)]
        if missing:
            parked.append(Parked(message.to_json(), f"{len(missing)} file(s) missing: {', '.join(missing[:3])}"))
        else:
            usable.append((message, files, records))
    files, records = _merged(universe, usable)
    refs = [ref for f in files for ref in f.refs]
    _register_new_dataset_types(central, refs)
    # The whole batch in one transaction, one insert per dimension element and one ingest: the
    # registry expands the data ids and writes the datastore records once per batch, not per
    # message (most of a message's cost when registered alone).
    with central.transaction():
        for run in sorted({ref.run for ref in refs}):
            central.registry.registerRun(run)  # a known run: no change
        for element, element_records in records.items():
            central.registry.insertDimensionData(element, *element_records, skip_existing=True)
        if files:
            _register_files(central, files, stored)
    return len(refs), [m for m, _, _ in usable], parked


def _register_files(central: Butler, files: Sequence[Any], stored: Mapping[Any, Any]) -> None:
    """Register ``files`` (already in the central datastore) inside the caller's transaction.

    A file whose datastore record came with it (``stored``: dataset id → ``StoredFileInfo``) is
    registered as it is: its dataset imported with its id, the record added unless already
    there. ``Butler.ingest`` (``transfer=None``, or ``"direct"`` for a raw registered in its raw
    bucket), used for the others, would look at every file again (a HEAD each) and resolve its
    formatter, which the compute worker that wrote the file has already done. A dataset applied
    twice is registered once either way.
    """
    from lsst.daf.butler.registry.interfaces import DatabaseInsertMode

    known: list[Any] = []
    rest: list[Any] = []
    for f in files:
        (known if all(ref.id in stored for ref in f.refs) else rest).append(f)
    groups: dict[tuple[str, str], list[Any]] = {}
    for dataset in known:
        for ref in dataset.refs:  # imported together: one run and one set of dimensions
            groups.setdefault((str(ref.run), str(ref.datasetType.dimensions)), []).append(ref)
    for key in sorted(groups):  # runs in name order: concurrent writers lock them in one order
        central._registry._importDatasets(groups[key], expand=True)
    if known:
        central._datastore._register_datasets(
            [(ref, stored[ref.id]) for dataset in known for ref in dataset.refs],
            insert_mode=DatabaseInsertMode.ENSURE)
    # a file inside the datastore is registered where it is; a raw outside it (its raw bucket
    # object) too, with its absolute URI recorded
    root = central._datastore.root
    by_transfer: dict[str | None, list[Any]] = {}
    for f in rest:
        by_transfer.setdefault(None if f.path.relative_to(root) is not None else "direct", []).append(f)
    for transfer, datasets in by_transfer.items():
        central.ingest(*datasets, transfer=transfer, record_validation_info=False, skip_existing=True)


def _merged(universe: Any, usable: Sequence[tuple[ExportMessage, list[Any], dict[str, list[Any]]]]
            ) -> tuple[list[Any], dict[str, list[Any]]]:
    """The files of every message (each dataset once: a message may be applied twice) and their
    dimension records by element, dependencies first, each record once."""
    files: dict[Any, Any] = {}
    by_element: dict[str, dict[Any, Any]] = {}
    for _message, message_files, records in usable:
        for f in message_files:
            files.setdefault(tuple(ref.id for ref in f.refs), f)
        for element, element_records in records.items():
            for record in element_records:
                by_element.setdefault(element, {}).setdefault(record.dataId.required_values, record)
    ordered = {element.name: list(by_element[element.name].values())
               for element in universe.sorted(by_element) if by_element[element.name]}
    return list(files.values()), ordered


def register_isolating(central: Butler, items: Sequence[str], is_transient: Callable[[BaseException], bool],
                       exists: FilesExist | None = None) -> tuple[int, list[ExportMessage], list[Parked]]:
    """:func:`register_batch`, and when the batch fails for a reason of its own, each message alone.

    A transient failure (database or object store unreachable) is raised: the batch is retried
    later as a whole. Any other failure of the batch is some message's: registered one by one,
    the messages that fail again are parked with their error, and the rest are registered.
    """
    try:
        return register_batch(central, items, exists)
    except Exception as exc:
        if is_transient(exc) or len(items) == 1:
            if is_transient(exc):
                raise
            return 0, [], [Parked(items[0], f"refused by the registry: {type(exc).__name__}: {exc}")]
        log.warning("export batch of %d refused (%s: %s); registering its messages one by one",
                    len(items), type(exc).__name__, exc)
    written, registered, parked = 0, [], []
    for item in items:
        one_written, one_registered, one_parked = register_isolating(central, [item], is_transient, exists)
        written += one_written
        registered += one_registered
        parked += one_parked
    return written, registered, parked


def _register_new_dataset_types(central: Butler, refs: Sequence[Any]) -> None:
    """Register the dataset types of ``refs`` the central repo does not know yet.

    Outside the batch's transaction: a new dataset type may create tables. The registry
    keeps the known ones cached, so a known type costs no query.
    """
    from lsst.daf.butler import MissingDatasetTypeError

    for dataset_type in {ref.datasetType.name: ref.datasetType for ref in refs}.values():
        try:
            central.get_dataset_type(dataset_type.name)
        except MissingDatasetTypeError:
            central.registry.registerDatasetType(dataset_type)


def drain(ctx: Context, central: Butler, schedule: Callable[[float], None], force: bool = False,
          lock_timeout: float = 600.0) -> ExportResult:
    """Register pending messages in batches while holding the writer lock.

    Parameters
    ----------
    schedule
        Called with a delay (s) to have :func:`drain` run again later when a partial batch
        must wait for its age; at most one such flush is pending at a time.
    force
        Write a partial batch now, whatever its age (``prompt-tasks export flush``).

    A drain that finds the lock taken returns at once (``busy``): the holder looks at the
    list again after releasing the lock, so no message is stranded.
    """
    client = ctx.redis
    result = ExportResult()
    while True:
        lock = client.lock(EXPORT_LOCK, timeout=lock_timeout, blocking=False)
        if not lock.acquire(blocking=False):
            result.busy = True
            return result
        try:
            _drain_locked(ctx, central, schedule, force, result)
        finally:
            with contextlib.suppress(LockError):  # expired: another writer may hold it now
                lock.release()
        if result.flush_in is not None or pending(client) == 0:
            return result


def _checker(ctx: Context, central: Butler) -> FilesExist | None:
    """The existence check of a batch's files: through the S3 server's client for an S3 datastore."""
    if central._datastore.root.scheme != "s3":
        return None
    return lambda uris: exists_many(ctx.s3, uris)


def _drain_locked(ctx: Context, central: Butler, schedule: Callable[[float], None], force: bool,
                  result: ExportResult) -> None:
    client = ctx.redis
    settings = ctx.settings
    while True:
        head = client.lindex(EXPORT_REQUESTS, 0)
        if head is None:
            return
        when = decide_flush(pending(client), time.time() - _enqueued(head), settings.export_batch,
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
        items = client.lrange(EXPORT_REQUESTS, 0, settings.export_batch - 1)
        t0 = time.perf_counter()
        written, registered, parked = register_isolating(central, items, is_transient, _checker(ctx, central))
        pipe = client.pipeline(transaction=True)
        pipe.ltrim(EXPORT_REQUESTS, len(items), -1)  # only the lock holder removes items
        for park in parked:
            log.warning("export message parked: %s", park.reason)
            pipe.rpush(EXPORT_FAILED, park.to_json())
        pipe.hincrby(EXPORT_STATS, "batches", 1)
        pipe.hincrby(EXPORT_STATS, "requests", len(registered))
        pipe.hincrby(EXPORT_STATS, "datasets", written)
        if parked:
            pipe.hincrby(EXPORT_STATS, "parked", len(parked))
        for message in registered:
            pipe.set(export_done_key(message.instrument, message.group, message.detector), repr(time.time()),
                     ex=settings.ledger_ttl_s)
        pipe.execute()
        result.batches += 1
        result.requests += len(registered)
        result.dropped += len(parked)
        result.datasets += written
        result.times.append(round(time.perf_counter() - t0, 4))
