"""Export, compute side: a detector-visit's outputs written straight into the central datastore.

A fleet shares no disk between hosts, so the compute worker that ran the pipeline does the
heavy part of export itself: it copies each output file from its local repo into the central
repo's datastore (the object store, for an S3-backed central repo), at the same path relative
to the datastore root, and queues an :class:`ExportMessage` holding what registration needs:
the dataset refs (ids kept), the dimension records of their data ids and of the visit, and each
file's datastore record (path, formatter, storage class, size, checksum).

Raws (with ``settings.export_raws``) are not copied: each is registered where it already is,
the raw bucket's object it was ingested from (an absolute URI in its datastore record, as
``transfer="direct"`` would record it). A visit's raws are most of its bytes; the raw bucket
is their archive, and the central repo reads them from there.
The single registry writer (:mod:`prompt_tasks.butler.writer`) registers batches of these
messages; it reads no compute host's disk.

A file copy that fails is retried with backoff (:data:`COPY_ATTEMPTS`); after that the
detector-visit fails with :class:`ExportWriteError` (its status and catch-up record say why).
Copies overwrite: a rerun writes the same bytes to the same place.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.errors import PermanentError
from prompt_tasks.objstore import put_bytes
from prompt_tasks.store.keys import EXPORT_LOCK, EXPORT_REQUESTS, EXPORT_SCHEDULED, export_done_key

if TYPE_CHECKING:
    import redis
    from lsst.daf.butler import Butler, DatasetRef, DimensionUniverse
    from lsst.resources import ResourcePath
    from minio import Minio

__all__ = [
    "COPY_ATTEMPTS",
    "VISIT_ELEMENTS",
    "ExportMessage",
    "ExportWriteError",
    "Queued",
    "StagedFile",
    "enqueue",
    "is_exported",
    "pending",
    "stage_outputs",
    "visit_records",
    "wanted",
]

log = logging.getLogger(__name__)

#: Attempts of one file copy into the central datastore, and the first backoff (doubled each time).
COPY_ATTEMPTS = 4
COPY_BACKOFF_S = 0.5
#: The visit's records an output's data id may not carry, which the central repo needs to build
#: graphs on the visit (without them a graph on the visit is empty).
VISIT_ELEMENTS: tuple[str, ...] = ("visit", "visit_definition", "visit_system_membership", "visit_detector_region")
#: Output dataset types never exported by default.
_BOOKKEEPING_SUFFIXES = ("_metadata", "_log", "_config")


class ExportWriteError(PermanentError):
    """The outputs could not be written into the central datastore."""

    code = "export_write"


@dataclass
class StagedFile:
    """One file of the central repo and the dataset it holds."""

    #: ``DatasetRef.to_simple()`` of the dataset (its dataset type, data id, run and id).
    ref: dict[str, Any]
    #: Path relative to the central datastore's root, or the absolute URI of a raw registered
    #: where it is (the raw bucket's object).
    path: str
    #: Formatter class the local datastore wrote it with.
    formatter: str | None = None
    #: ``StoredFileInfo.to_simple()`` of the file in the local datastore (the path is the same
    #: centrally): the writer registers it as it is, without looking at the file again.
    stored: dict[str, Any] | None = None


@dataclass
class ExportMessage:
    """What the registry writer needs to register one detector-visit's outputs (JSON)."""

    instrument: str
    group: str
    detector: int
    run: str
    files: list[StagedFile] = field(default_factory=list)
    #: Dimension element → ``DimensionRecord.to_simple()`` dicts, dependencies first.
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: The datastore root the files were written under (the writer checks it is its own).
    datastore_root: str = ""
    enqueued: float = field(default_factory=time.time)

    def to_json(self) -> str:
        """JSON form (the Redis list item)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> ExportMessage:
        """Inverse of :meth:`to_json`; ``ValueError`` for anything else."""
        raw = json.loads(text)
        if not isinstance(raw, dict):
            raise ValueError("an export message is a JSON object")
        try:
            files = [StagedFile(**f) for f in raw.pop("files", [])]
            message = cls(files=files, **raw)
        except TypeError as exc:
            raise ValueError(f"not an export message: {exc}") from exc
        if not isinstance(message.records, dict) or not message.run:
            raise ValueError("an export message needs a run and a records mapping")
        return message


def wanted(name: str, dataset_types: Sequence[str] | None) -> bool:
    """Whether outputs of ``name`` are exported (bookkeeping types are not, by default)."""
    if dataset_types is not None:
        return name in dataset_types
    return not name.endswith(_BOOKKEEPING_SUFFIXES) and name != "packages"


@dataclass(frozen=True)
class Queued:
    """A message handed to the registry writer, and what the writer was doing as it arrived."""

    #: Length of the writer's list with the message in it.
    length: int
    #: A delayed drain is scheduled (:data:`~prompt_tasks.store.keys.EXPORT_SCHEDULED`).
    flush_scheduled: bool
    #: A writer holds the lock (:data:`~prompt_tasks.store.keys.EXPORT_LOCK`).
    writing: bool


def enqueue(client: redis.Redis, message: ExportMessage) -> Queued:
    """Hand ``message`` to the registry writer (one round trip, with the writer's state)."""
    pipe = client.pipeline(transaction=False)
    pipe.rpush(EXPORT_REQUESTS, message.to_json())
    pipe.exists(EXPORT_SCHEDULED)
    pipe.exists(EXPORT_LOCK)
    length, scheduled, locked = pipe.execute()
    return Queued(int(length), bool(scheduled), bool(locked))


def pending(client: redis.Redis) -> int:
    """Messages waiting for the registry writer."""
    return int(client.llen(EXPORT_REQUESTS))


def is_exported(client: redis.Redis, instrument: str, group: str, detector: int) -> bool:
    """True once the registry writer has registered the detector-visit's outputs centrally."""
    return bool(client.exists(export_done_key(instrument, group, detector)))


def _visit_records(local: Butler, instrument: str, visit: int, detector: int) -> list[Any]:
    """The :data:`VISIT_ELEMENTS` records of the visit and detector, asked of the local registry
    in one query; nothing for an exposure that is no visit (a calibration)."""
    with local.query() as query:
        rows = (query.data_ids(["exposure", "visit", "detector", "visit_system"])
                .where("instrument = inst AND visit = v AND detector = det",
                       bind={"inst": instrument, "v": int(visit), "det": int(detector)})
                .with_dimension_records())
        return [row.records[element] for row in rows for element in VISIT_ELEMENTS
                if row.records[element] is not None]


def visit_records(universe: DimensionUniverse, snaps: Iterable[Mapping[str, Iterable[Mapping[str, Any]]]],
                  detector: int) -> list[dict[str, Any]]:
    """The :data:`VISIT_ELEMENTS` records among the snaps' records (per snap, element → field
    values, as ingest inserted them), serialized: ingest hands them on so export need not ask
    the registry again. Only ``detector``'s region; each record once (the snaps share a visit)."""
    out: dict[tuple[str, tuple[Any, ...]], dict[str, Any]] = {}
    for snap in snaps:
        for element in VISIT_ELEMENTS:
            for fields in snap.get(element, ()):
                if element == "visit_detector_region" and int(fields.get("detector", detector)) != int(detector):
                    continue
                record = universe[element].RecordClass(**fields)
                out.setdefault((element, record.dataId.required_values), record.to_simple().model_dump(mode="json"))
    return list(out.values())


def dimension_records(local: Butler, data_ids: Iterable[Any], extra: Iterable[Any] = ()) -> dict[str, list[dict[str, Any]]]:
    """Every record ``data_ids`` name (and ``extra``), by element, dependencies first.

    A data id that carries its records (a quantum graph's) is taken as it is; each other
    distinct one is expanded once: a detector-visit's outputs share a few.
    """
    by_element: dict[str, dict[Any, Any]] = {}
    for data_id in set(data_ids):
        expanded = data_id if data_id.hasRecords() else local.registry.expandDataId(data_id)
        for element in expanded.dimensions.elements:
            record = expanded.records[element]
            if record is not None:
                by_element.setdefault(element, {})[record.dataId.required_values] = record
    for record in extra:
        by_element.setdefault(record.definition.name, {})[record.dataId.required_values] = record
    # Elements without a table of their own (``band``, a view of ``physical_filter``) are implied.
    order = [e.name for e in local.dimensions.sorted(by_element) if e.has_own_table]
    return {name: [r.to_simple().model_dump(mode="json") for r in by_element[name].values()] for name in order}


#: Files up to this size are copied with one PUT from memory; larger ones by a multipart transfer.
SINGLE_PUT_BYTES = 64 * 1024 * 1024


def _copy(source: ResourcePath, target: ResourcePath, client: Minio | None = None) -> None:
    """Copy one file, retried with backoff; :class:`ExportWriteError` when it keeps failing.

    A small file goes in one PUT (through ``client``, the S3 server's client, for an ``s3://``
    target): the multipart transfer's thread pool, made for every file, cost more CPU than the
    upload itself.
    """
    delay = COPY_BACKOFF_S
    for attempt in range(1, COPY_ATTEMPTS + 1):
        try:
            if source.size() > SINGLE_PUT_BYTES:
                target.transfer_from(source, transfer="copy", overwrite=True)
            elif client is not None and target.scheme == "s3":
                put_bytes(client, str(target), source.read())
            else:
                target.write(source.read(), overwrite=True)
            return
        except Exception as exc:
            if attempt == COPY_ATTEMPTS:
                raise ExportWriteError(f"export: writing {target} failed {attempt} times: "
                                       f"{type(exc).__name__}: {exc}") from exc
            log.warning("export: writing %s failed (%s), retry %d in %.1f s", target, exc, attempt, delay)
            time.sleep(delay)
            delay *= 2


def stage_outputs(local: Butler, central_root: ResourcePath, *, instrument: str, group: str, detector: int,
                  visit: int, run: str, outputs: Iterable[str], raws: Mapping[str, str],
                  dataset_types: Sequence[str] | None, client: Minio | None = None,
                  graph_refs: Mapping[str, DatasetRef] | None = None,
                  visit_records: Sequence[Mapping[str, Any]] | None = None) -> ExportMessage:
    """Copy the detector-visit's outputs into the central datastore; the message, which also
    registers ``raws`` where they are.

    ``client``: the S3 server's client, for the copies into an ``s3://`` datastore (:func:`_copy`).

    ``outputs`` are dataset ids of the local repo; those whose type is not :func:`wanted` stay
    local. ``raws`` maps the local id of each raw to register centrally to the URI of the
    object it was ingested from (the same bytes): its central record points there.
    ``graph_refs``: refs the caller holds already (the quantum graph's, by id, data ids
    expanded); a predicted output that was not written (a quantum with no work) is left out.
    ``visit_records``: the visit's records (:func:`visit_records`) ingest handed on. The local
    registry is asked for the other refs, the stored files and, without ``visit_records``, the
    visit's records.
    """
    from lsst.daf.butler import DimensionRecord, SerializedDimensionRecord
    from lsst.resources import ResourcePath

    graph_refs = graph_refs or {}
    output_ids, raw_ids = list(outputs), list(raws)
    held = {i: graph_refs[i] for i in [*output_ids, *raw_ids] if i in graph_refs}
    looked_up = {str(ref.id): ref for ref in local.get_many_datasets(
        [uuid.UUID(i) for i in [*output_ids, *raw_ids] if i not in held])}
    datastore = local._datastore
    stored = datastore._get_stored_records_associated_with_refs([*held.values(), *looked_up.values()])
    unwritten = {i for i, ref in held.items() if ref.id not in stored}
    if unwritten:  # not written, or registered without its file: only the registry can tell
        registered = {str(ref.id) for ref in local.get_many_datasets([uuid.UUID(i) for i in unwritten])}
        held = {i: ref for i, ref in held.items() if i not in unwritten or i in registered}
    by_id = {**looked_up, **held}
    refs = [by_id[i] for i in output_ids if i in by_id and wanted(by_id[i].datasetType.name, dataset_types)]
    raw_refs = [by_id[i] for i in raw_ids if i in by_id]
    sources = {ref.id: raws[str(ref.id)] for ref in raw_refs}
    refs += raw_refs
    local_root = datastore.root
    message = ExportMessage(instrument, group, int(detector), run, datastore_root=str(central_root))
    for ref in refs:
        infos = stored.get(ref.id)
        if not infos:
            raise ExportWriteError(f"export: {ref} has no file in the local datastore")
        info = infos[0]
        if ref.id in sources:  # a raw: registered where it is, nothing copied
            info = info.update(path=sources[ref.id])
        elif ResourcePath(info.path, forceAbsolute=False).isabs():
            raise ExportWriteError(f"export: {info.path} is outside the local datastore {local_root}")
        else:
            _copy(local_root.join(info.path), central_root.join(info.path), client)
        message.files.append(StagedFile(ref.to_simple().model_dump(mode="json"), info.path, info.formatter,
                                        info.to_simple().model_dump(mode="json")))
    if visit_records is None:
        extra = _visit_records(local, instrument, visit, detector)
    else:
        extra = [DimensionRecord.from_simple(SerializedDimensionRecord(**r), universe=local.dimensions)
                 for r in visit_records]
    message.records = dimension_records(local, [ref.dataId for ref in refs], extra)
    return message
