"""Ingest: a detector-visit's snaps, from the raw bucket into the detector's local repo.

For each snap the header is read with one ranged GET of the object's first blocks, checked
against the visit (instrument, detector, group, filter) and against the object's size (a
truncated file is refused before it reaches the repo), turned into dimension records by the
instrument's header translator, and the raw is ingested from its ``s3://`` URI with
``transfer="copy"`` and a deterministic dataset id (``DATAID_TYPE_RUN``): ingesting the same
snap twice is a no-op.

Every problem with a raw raises :class:`~prompt_tasks.errors.BadRaw` with a readable reason;
records and datasets are written in one transaction per snap, so a refused raw leaves the
local repo as it was. S3 access goes through lsst-resources, configured from the settings by
:func:`configure_s3`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prompt_tasks.errors import BadRaw, RetryLater
from prompt_tasks.settings import Settings

if TYPE_CHECKING:
    from astropy.io.fits import Header
    from lsst.daf.butler import Butler, DatasetRef

__all__ = [
    "IngestedSnap",
    "RecordsFromHeader",
    "VisitExpectation",
    "check_header",
    "configure_s3",
    "ingest_snap",
    "ingest_snaps",
    "raw_uri",
    "read_header",
]

#: Header translator: raw header → dimension records by element, in insertion order.
RecordsFromHeader = Callable[[Mapping[str, Any]], dict[str, list[dict[str, Any]]]]
#: FITS block size.
_BLOCK = 2880
#: Bytes read first to find the primary header (most headers fit).
_HEADER_GUESS = 8 * _BLOCK


def configure_s3(settings: Settings) -> None:
    """Point lsst-resources' S3 client at the raw bucket's server (process start)."""
    os.environ["S3_ENDPOINT_URL"] = settings.s3_url
    os.environ["AWS_ACCESS_KEY_ID"] = settings.s3_access_key.get_secret_value()
    os.environ["AWS_SECRET_ACCESS_KEY"] = settings.s3_secret_key.get_secret_value()


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


def read_header(uri: str) -> tuple[Header, int]:
    """The primary header of the FITS object at ``uri`` and the bytes it needs in all.

    Raises
    ------
    BadRaw
        The object is missing, empty, or does not start with a FITS header.
    RetryLater
        The object store could not be reached.
    """
    from astropy.io import fits
    from lsst.resources import ResourcePath

    path = ResourcePath(uri)
    try:
        head = path.read(size=_HEADER_GUESS)
        if b"END" + b" " * 77 not in _cards(head) and len(head) == _HEADER_GUESS:
            head = path.read()
        size = path.size()
    except FileNotFoundError as exc:
        raise BadRaw(f"{uri}: not found") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise RetryLater(f"{uri}: object store unreachable: {exc}", delay=1.0) from exc
    if not head.startswith(b"SIMPLE  ="):
        raise BadRaw(f"{uri}: not a FITS file (no SIMPLE card)")
    end = _header_end(head)
    if end is None:
        raise BadRaw(f"{uri}: FITS header has no END card (truncated or corrupt)")
    try:
        header = fits.Header.fromstring(head[:end].decode("ascii"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRaw(f"{uri}: unreadable FITS header: {exc}") from exc
    header_bytes = (end + _BLOCK - 1) // _BLOCK * _BLOCK
    needed = header_bytes + _data_bytes(header)
    if size < needed:
        raise BadRaw(f"{uri}: truncated: {size} bytes, the header says at least {needed}")
    return header, size


def _cards(data: bytes) -> list[bytes]:
    return [data[i:i + 80] for i in range(0, len(data) - len(data) % 80, 80)]


def _header_end(data: bytes) -> int | None:
    """Offset just past the END card of the first header, or None."""
    for index, card in enumerate(_cards(data)):
        if card.startswith(b"END") and card[3:].strip() == b"":
            return (index + 1) * 80
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


def _insert_records(butler: Butler, records: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    for element, element_records in records.items():
        if element_records:
            butler.registry.insertDimensionData(element, *element_records, skip_existing=True)


def ingest_snap(butler: Butler, uri: str, expected: VisitExpectation, translate: RecordsFromHeader,
                run: str, snap: int = 0, key: str = "") -> IngestedSnap:
    """Ingest one raw from ``uri`` into ``butler`` (idempotent); see the module doc."""
    from lsst.daf.butler import DatasetIdGenEnum, DatasetRef, DatasetType, FileDataset
    from lsst.pipe.base import Instrument
    from lsst.resources import ResourcePath

    header, nbytes = read_header(uri)
    check_header(header, expected, uri)
    try:
        records = translate(header)
        exposure = int(records["exposure"][0]["id"])
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise BadRaw(f"{uri}: header cannot be translated: {type(exc).__name__}: {exc}") from exc
    instrument = Instrument.from_string(expected.instrument, butler.registry)
    name, dimensions, storage_class = instrument.raw_definition  # type: ignore[attr-defined]
    dataset_type = DatasetType(name, dimensions, storage_class, universe=butler.dimensions)
    butler.registry.registerDatasetType(dataset_type)
    butler.registry.registerRun(run)
    with butler.transaction():
        _insert_records(butler, records)
        data_id = butler.registry.expandDataId(
            instrument=expected.instrument, exposure=exposure, detector=expected.detector
        )
        ref = DatasetRef(dataset_type, data_id, run=run, id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
        if not butler.stored(ref):
            formatter = instrument.getRawFormatter(data_id)
            butler.ingest(FileDataset(path=ResourcePath(uri), refs=[ref], formatter=formatter),
                          transfer="copy", skip_existing=True)
    return IngestedSnap(snap, key, exposure, str(ref.id), nbytes, records)


def ingest_snaps(settings: Settings, butler: Butler, snaps: Mapping[int, str], expected: VisitExpectation,
                 translate: RecordsFromHeader, run: str) -> list[IngestedSnap]:
    """Ingest every snap (snap number → object key) of a detector-visit, in snap order."""
    configure_s3(settings)
    return [
        ingest_snap(butler, raw_uri(settings, key), expected, translate, run, snap=snap, key=key)
        for snap, key in sorted(snaps.items())
    ]


def raw_refs(butler: Butler, ingested: Sequence[IngestedSnap]) -> list[DatasetRef]:
    """The local refs of ingested snaps."""
    import uuid

    return list(butler.get_many_datasets([uuid.UUID(s.dataset_id) for s in ingested]))
