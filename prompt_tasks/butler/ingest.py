"""Ingest: a detector-visit's snaps, from the raw bucket into the detector's local repo.

For each snap the object is read with one GET; its header is checked against the visit
(instrument, detector, group, filter) and against the object's size (a truncated file is
refused before it reaches the repo), turned into dimension records by the instrument's header
translator, and the same bytes are ingested (written beside the local datastore, then moved
into it) with a deterministic dataset id (``DATAID_TYPE_RUN``): ingesting the same snap twice
is a no-op.

Every problem with a raw raises :class:`~prompt_tasks.errors.BadRaw` with a readable reason;
a detector-visit's raws are all read and checked before any is written, then written in one
transaction (one insert per dimension element, one of the datasets, one datastore ingest that
moves the files in), so a refused raw leaves the local repo as it was. Raws are read through
the S3 server's minio client when the caller gives one (:func:`fetch_raw`; the detector stages
do), else through lsst-resources, configured from the settings by
:func:`prompt_tasks.objstore.configure_s3`.
"""

from __future__ import annotations

import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_tasks.errors import BadRaw, RetryLater
from prompt_tasks.objstore import configure_s3, get_bytes
from prompt_tasks.settings import Settings

if TYPE_CHECKING:
    from astropy.io.fits import Header
    from lsst.daf.butler import Butler, DatasetRef, DimensionRecord, DimensionUniverse
    from minio import Minio

__all__ = [
    "IngestedSnap",
    "RecordsFromHeader",
    "VisitExpectation",
    "check_header",
    "fetch_raw",
    "ingest_snap",
    "ingest_snaps",
    "own_records",
    "parse_header",
    "raw_uri",
]

#: Header translator: raw header → dimension records by element, in insertion order.
RecordsFromHeader = Callable[[Mapping[str, Any]], dict[str, list[dict[str, Any]]]]
#: FITS block size.
_BLOCK = 2880
#: Most bytes searched for the primary header's END card (a header of 1000 blocks is not a raw).
_HEADER_SCAN = 1000 * _BLOCK


def raw_uri(settings: Settings, key: str) -> str:
    """The ``s3://`` URI of an object of the raw bucket."""
    return f"s3://{settings.raw_bucket}/{key}"


@dataclass(frozen=True)
class VisitExpectation:
    """What every raw of a detector-visit must say about itself."""

    instrument: str
    detector: int
    group: str
    physical_filter: str = ""


@dataclass
class IngestedSnap:
    """One ingested snap."""

    snap: int
    key: str
    exposure: int
    dataset_id: str
    nbytes: int
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict, repr=False)


def _data_bytes(header: Header) -> int:
    naxis = int(header.get("NAXIS", 0))
    if naxis == 0:
        return 0
    count = 1
    for axis in range(1, naxis + 1):
        count *= int(header[f"NAXIS{axis}"])
    return count * abs(int(header["BITPIX"])) // 8


def fetch_raw(uri: str, client: Minio | None = None) -> bytes:
    """The whole object at ``uri``, in one GET (the header is read from it, and the same bytes
    are ingested: no second request, no download thread). With ``client`` (the S3 server's
    client) an ``s3://`` object is read through it, else through lsst-resources.

    Raises
    ------
    BadRaw
        The object is missing.
    RetryLater
        The object store could not be reached.
    """
    from lsst.resources import ResourcePath

    try:
        if client is not None and uri.startswith("s3://"):
            return get_bytes(client, uri)
        return ResourcePath(uri).read()
    except FileNotFoundError as exc:
        raise BadRaw(f"{uri}: not found") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise RetryLater(f"{uri}: object store unreachable: {exc}", delay=1.0) from exc


def parse_header(data: bytes, uri: str) -> Header:
    """The primary header of the FITS file ``data`` (the object at ``uri``).

    Raises
    ------
    BadRaw
        ``data`` is empty, not FITS, has no END card or is shorter than its header says.
    """
    from astropy.io import fits

    if not data.startswith(b"SIMPLE  ="):
        raise BadRaw(f"{uri}: not a FITS file (no SIMPLE card)")
    end = _header_end(data)
    if end is None:
        raise BadRaw(f"{uri}: FITS header has no END card (truncated or corrupt)")
    try:
        header = fits.Header.fromstring(data[:end].decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRaw(f"{uri}: unreadable FITS header: {exc}") from exc
    header_bytes = (end + _BLOCK - 1) // _BLOCK * _BLOCK
    needed = header_bytes + _data_bytes(header)
    if len(data) < needed:
        raise BadRaw(f"{uri}: truncated: {len(data)} bytes, the header says at least {needed}")
    return header


def _header_end(data: bytes, limit: int = _HEADER_SCAN) -> int | None:
    """Offset just past the END card of the first header (searched in ``limit`` bytes), or None."""
    for offset in range(0, min(len(data), limit) - 79, 80):
        card = data[offset:offset + 80]
        if card.startswith(b"END") and card[3:].strip() == b"":
            return offset + 80
    return None


def check_header(header: Mapping[str, Any], expected: VisitExpectation, uri: str) -> None:
    """Raise :class:`BadRaw` when the header contradicts the visit it was announced for."""
    problems = []
    instrument = str(header.get("INSTRUME", expected.instrument))
    if instrument != expected.instrument:
        problems.append(f"instrument {instrument!r}, expected {expected.instrument!r}")
    try:
        detector = int(header["DETECTOR"])
    except (KeyError, ValueError, TypeError):
        detector = None
    if detector != expected.detector:
        problems.append(f"detector {detector!r}, expected {expected.detector}")
    group = str(header.get("GROUPID", ""))
    if group != expected.group:
        problems.append(f"group {group!r}, expected {expected.group!r}")
    physical_filter = str(header.get("FILTER", ""))
    if expected.physical_filter and physical_filter != expected.physical_filter:
        problems.append(f"filter {physical_filter!r}, expected {expected.physical_filter!r}")
    if problems:
        raise BadRaw(f"{uri}: header contradicts the visit: " + "; ".join(problems))


#: Dimension records an ingest remembers as inserted (per local repo; the oldest forgotten first).
REMEMBERED_RECORDS = 256


def _insert_records(butler: Butler, records: Mapping[str, Sequence[Mapping[str, Any]]],
                    inserted: Mapping[int, bool]) -> list[int]:
    """Insert the records not in ``inserted`` (hashes of records inserted before); the hashes of
    those inserted now.

    A visit's snaps share their visit and its definitions, and a night shares its day: each
    is inserted once per local repo, not once per snap (``records`` may list one twice).
    """
    fresh_keys = []
    for element, element_records in records.items():
        fresh: dict[int, Mapping[str, Any]] = {}
        for record in element_records:  # the same record from two snaps: once
            key = hash((element, repr(sorted(record.items()))))
            if key not in inserted:
                fresh.setdefault(key, record)
        if fresh:
            butler.registry.insertDimensionData(element, *fresh.values(), skip_existing=True)
            fresh_keys += list(fresh)
    return fresh_keys


@dataclass
class _Fetched:
    """A raw read and checked, with its dimension records: ready to be written."""

    snap: int
    key: str
    data: bytes
    records: dict[str, list[dict[str, Any]]]
    exposure: int


def _fetch(uri: str, expected: VisitExpectation, translate: RecordsFromHeader, snap: int, key: str,
           client: Minio | None = None) -> _Fetched:
    """Read the raw at ``uri`` (one GET), check its header and translate it; nothing is written."""
    data = fetch_raw(uri, client)
    header = parse_header(data, uri)
    check_header(header, expected, uri)
    try:
        records = translate(header)
        exposure = int(records["exposure"][0]["id"])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise BadRaw(f"{uri}: header cannot be translated: {type(exc).__name__}: {exc}") from exc
    return _Fetched(snap, key, data, records, exposure)


def ingest_snap(butler: Butler, uri: str, expected: VisitExpectation, translate: RecordsFromHeader,
                run: str, snap: int = 0, key: str = "", known: dict[str, Any] | None = None) -> IngestedSnap:
    """Ingest one raw from ``uri`` into ``butler`` (idempotent); see the module doc.

    ``known`` is what this process already set up in ``butler`` (the ``Instrument``, the raw
    dataset type, the run, the dimension records it inserted), kept between calls so a warm
    repo pays for it once, not per snap.
    """
    return _write(butler, [_fetch(uri, expected, translate, snap, key)], expected, run, known)[0]


def _write(butler: Butler, fetched: Sequence[_Fetched], expected: VisitExpectation, run: str,
           known: dict[str, Any] | None) -> list[IngestedSnap]:
    """Write the records and datasets of ``fetched`` raws in one transaction (one registry
    insert per dimension element, one of the new datasets, one datastore ingest of their files),
    skipping what is already there."""
    from lsst.daf.butler import DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset
    from lsst.pipe.base import Instrument
    from lsst.resources import ResourcePath

    known = {} if known is None else known
    instrument = known.get(f"instrument:{expected.instrument}")
    if instrument is None:
        instrument = known[f"instrument:{expected.instrument}"] = Instrument.from_string(
            expected.instrument, butler.registry)
    name, dimensions, storage_class = instrument.raw_definition  # type: ignore[attr-defined]
    dataset_type = DatasetType(name, dimensions, storage_class, universe=butler.dimensions)
    if f"run:{run}:{name}" not in known:
        butler.registry.registerDatasetType(dataset_type)
        butler.registry.registerRun(run)
        known[f"run:{run}:{name}"] = True
    remembered: OrderedDict[int, bool] = known.setdefault("records", OrderedDict())
    merged: dict[str, list[dict[str, Any]]] = {}
    for raw in fetched:  # the snaps of a visit share its visit records: each element inserted once
        for element, element_records in raw.records.items():
            merged.setdefault(element, []).extend(element_records)
    with butler.transaction(), contextlib.ExitStack() as staging:
        inserted = _insert_records(butler, merged, remembered)
        refs = [DatasetRef(dataset_type, butler.registry.expandDataId(
                    instrument=expected.instrument, exposure=raw.exposure, detector=expected.detector,
                    records=own_records(butler.dimensions, raw.records, raw.exposure)),
                    run=run, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN) for raw in fetched]
        registered = {ref.id for ref in butler.get_many_datasets([ref.id for ref in refs])}
        new = [ref for ref in refs if ref.id not in registered]
        _register_raws(butler, dataset_type, run, new)
        # the files of the new raws, and of registered raws that lost theirs, moved into the datastore
        datasets = [
            FileDataset(path=ResourcePath(staging.enter_context(_staged(butler, raw.data))), refs=[ref],
                        formatter=instrument.getRawFormatter(ref.dataId))
            for raw, ref in zip(fetched, refs, strict=True)
            if ref.id not in registered or not butler.stored(ref)
        ]
        if datasets:
            butler._datastore.ingest(*datasets, transfer="move")
    remembered.update(dict.fromkeys(inserted, True))  # committed: a failed write leaves nothing marked
    while len(remembered) > REMEMBERED_RECORDS:
        remembered.popitem(last=False)
    return [IngestedSnap(raw.snap, raw.key, raw.exposure, str(ref.id), len(raw.data), raw.records)
            for raw, ref in zip(fetched, refs, strict=True)]


def own_records(universe: DimensionUniverse, records: Mapping[str, Sequence[Mapping[str, Any]]],
                exposure: int) -> dict[str, DimensionRecord]:
    """The records of the raw's exposure, its group and its day, from its header's translation:
    the data id is expanded with them instead of reading back what was just inserted (the
    registry caches the others: instrument, detector, filter). Nothing for an exposure
    ``records`` does not hold (or holds twice, differently)."""

    def one(element: str, key: str, value: Any) -> Mapping[str, Any] | None:
        found = [r for r in records.get(element, ()) if r.get(key) == value]
        return found[0] if found and all(r == found[0] for r in found) else None

    fields = one("exposure", "id", int(exposure))
    if fields is None:
        return {}
    own = {"exposure": universe["exposure"].RecordClass(**fields)}
    for element, key in (("group", "name"), ("day_obs", "id")):
        if (found := one(element, key, fields.get(element))) is not None:
            own[element] = universe[element].RecordClass(**found)
    return own


def _register_raws(butler: Butler, dataset_type: Any, run: str, refs: Sequence[DatasetRef]) -> None:
    """Insert the datasets of ``refs`` (not registered yet) with their deterministic ids.

    A plain insert: ``Butler.ingest`` imports refs through a temporary table (its statements
    compiled anew each time), most of a warm ingest's registry cost.
    """
    from lsst.daf.butler import DatasetIdGenEnum

    if not refs:
        return
    made = butler.registry.insertDatasets(dataset_type, [ref.dataId for ref in refs], run=run, expand=False,
                                          idGenerationMode=DatasetIdGenEnum.DATAID_TYPE_RUN)
    if [ref.id for ref in made] != [ref.id for ref in refs]:  # the registry's ids are the refs' ids
        raise RuntimeError(f"raw dataset ids differ from the registry's: {refs} vs {made}")


@contextlib.contextmanager
def _staged(butler: Butler, data: bytes) -> Iterator[str]:
    """``data`` as a file beside the local datastore's files (a move into it is a rename);
    removed afterwards if the ingest did not take it."""
    root = Path(butler._datastore.root.ospath) / ".incoming"
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{uuid.uuid4().hex}.fits"
    path.write_bytes(data)
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def ingest_snaps(settings: Settings, butler: Butler, snaps: Mapping[int, str], expected: VisitExpectation,
                 translate: RecordsFromHeader, run: str, known: dict[str, Any] | None = None,
                 client: Minio | None = None) -> list[IngestedSnap]:
    """Ingest every snap (snap number → object key) of a detector-visit, in snap order.

    Every raw is read (through ``client`` when given, :func:`fetch_raw`) and checked first,
    then all are written in one transaction: a bad raw leaves the local repo as it was.
    """
    configure_s3(settings)
    fetched = [_fetch(raw_uri(settings, key), expected, translate, snap, key, client)
               for snap, key in sorted(snaps.items())]
    return _write(butler, fetched, expected, run, known)


def raw_refs(butler: Butler, ingested: Sequence[IngestedSnap]) -> list[DatasetRef]:
    """The local refs of ingested snaps."""
    return list(butler.get_many_datasets([uuid.UUID(s.dataset_id) for s in ingested]))
