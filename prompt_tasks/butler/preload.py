"""Preload: fill a detector's local repo with what a visit's pipelines will read.

Planning is pure: from the (resolved) pipeline graphs of the visit's candidate pipelines, the
dataset types consumed and produced by no earlier step are the inputs; each gets a query kind:

- ``calibration``: calibrations valid at the visit time for this detector (and filter);
- ``spatial``: datasets whose region (patch, HTM trixel...) overlaps the detector's predicted
  footprint, padded by a margin: templates, reference-catalog shards;
- ``skymap``: the sky map definitions;
- ``data_id``: anything else, by the visit's data id (instrument, detector, filter);
- inputs with ``exposure``/``visit``/``group`` dimensions come with the visit itself (raws)
  and are not preloaded.

The I/O then queries the central repo, transfers only what the local repo does not hold
(``Butler.transfer_from`` with dimension records), certifies newly transferred calibrations
into the local calibration collection with the central validity ranges, evicts the least
recently used datasets beyond the cache budget (never those this visit needs), and reports
what it transferred and reused and how long each part took.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from prompt_tasks.butler.cache import CacheIndex, choose_evictions

if TYPE_CHECKING:
    from lsst.daf.butler import Butler, DatasetRef
    from lsst.pipe.base.pipeline_graph import PipelineGraph
    from lsst.sphgeom import Region

__all__ = [
    "OBSERVATION_DIMENSIONS",
    "DatasetQuery",
    "InputType",
    "PreloadPlan",
    "PreloadReport",
    "PreloadTarget",
    "QueryKind",
    "find_refs",
    "inputs_of",
    "mirror_collections",
    "plan_preload",
    "preload",
]

#: Dimensions of datasets that arrive with the visit (raws) rather than being preloaded.
OBSERVATION_DIMENSIONS = frozenset({"exposure", "visit", "group"})
#: Data-id keys of the visit that constrain a preload query when the dataset type has them.
_VISIT_KEYS = ("instrument", "detector", "physical_filter", "band")


class QueryKind(StrEnum):
    """How a preloaded dataset type is looked up in the central repo."""

    CALIBRATION = "calibration"
    SPATIAL = "spatial"
    SKYMAP = "skymap"
    DATA_ID = "data_id"


@dataclass(frozen=True)
class InputType:
    """An overall input of the pipelines: what planning needs to know of its dataset type."""

    name: str
    dimensions: frozenset[str]
    region_dimension: str | None = None
    is_calibration: bool = False


@dataclass(frozen=True)
class PreloadTarget:
    """The detector-visit being prepared."""

    instrument: str
    detector: int
    physical_filter: str | None = None
    band: str | None = None


@dataclass(frozen=True)
class DatasetQuery:
    """One query of the central repo."""

    dataset_type: str
    kind: QueryKind
    data_id: Mapping[str, str | int]
    region_dimension: str | None = None


@dataclass(frozen=True)
class PreloadPlan:
    """The queries that preload a visit, and the inputs the visit brings itself."""

    queries: tuple[DatasetQuery, ...]
    from_visit: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "queries": [
                {"dataset_type": q.dataset_type, "kind": q.kind.value, "data_id": dict(q.data_id),
                 "region_dimension": q.region_dimension}
                for q in self.queries
            ],
            "from_visit": list(self.from_visit),
        }


def inputs_of(graphs: Iterable[PipelineGraph]) -> list[InputType]:
    """The overall inputs of resolved pipeline graphs (union, first seen first)."""
    seen: dict[str, InputType] = {}
    for graph in graphs:
        for name, node in graph.iter_overall_inputs():
            if node is None or name in seen:
                continue
            dims = node.dimensions
            seen[name] = InputType(
                name=name,
                dimensions=frozenset(dims.names),
                region_dimension=dims.region_dimension,
                is_calibration=node.is_calibration,
            )
    return list(seen.values())


def _kind(input_type: InputType) -> QueryKind | None:
    if input_type.dimensions & OBSERVATION_DIMENSIONS:
        return None
    if input_type.is_calibration:
        return QueryKind.CALIBRATION
    if input_type.region_dimension is not None:
        return QueryKind.SPATIAL
    if input_type.dimensions == {"skymap"}:
        return QueryKind.SKYMAP
    return QueryKind.DATA_ID


def plan_preload(inputs: Iterable[InputType], target: PreloadTarget) -> PreloadPlan:
    """The central-repo queries that preload ``target`` for pipelines with ``inputs``.

    Each query is constrained by the visit's data-id values the dataset type has among
    instrument, detector, physical filter and band (an unknown filter leaves that key out).
    """
    values: dict[str, str | int | None] = {
        "instrument": target.instrument,
        "detector": int(target.detector),
        "physical_filter": target.physical_filter or None,
        "band": target.band or None,
    }
    queries: list[DatasetQuery] = []
    from_visit: list[str] = []
    for input_type in inputs:
        kind = _kind(input_type)
        if kind is None:
            from_visit.append(input_type.name)
            continue
        data_id = {
            key: value for key in _VISIT_KEYS
            if key in input_type.dimensions and (value := values[key]) is not None
        }
        if "physical_filter" in data_id:
            data_id.pop("band", None)  # implied by the physical filter
        queries.append(DatasetQuery(
            dataset_type=input_type.name,
            kind=kind,
            data_id=data_id,
            region_dimension=input_type.region_dimension if kind is QueryKind.SPATIAL else None,
        ))
    return PreloadPlan(tuple(queries), tuple(from_visit))


# --------------------------------------------------------------------------- I/O


@dataclass
class PreloadReport:
    """What a preload did: counts per query kind and the time of each part (s)."""

    found: dict[str, int] = field(default_factory=dict)
    transferred: dict[str, int] = field(default_factory=dict)
    reused: dict[str, int] = field(default_factory=dict)
    certified: int = 0
    evicted: int = 0
    missing: list[str] = field(default_factory=list)
    cache_bytes: int = 0
    times: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (goes into the stage status and the ledger)."""
        return {
            "found": self.found,
            "transferred": self.transferred,
            "reused": self.reused,
            "certified": self.certified,
            "evicted": self.evicted,
            "missing": self.missing,
            "cache_bytes": self.cache_bytes,
            "times": {k: round(v, 4) for k, v in self.times.items()},
        }


def _query_one(central: Butler, query: DatasetQuery, collections: list[str], when: Any,
               region: Region | None) -> list[DatasetRef]:
    """Run one planned query against the central repo."""
    from lsst.daf.butler import MissingDatasetTypeError

    try:
        if query.kind is QueryKind.CALIBRATION:
            with central.query() as q:
                x = q.expression_factory
                return list(
                    q.where(dict(query.data_id))
                    .datasets(query.dataset_type, collections, find_first=True)
                    .where(x[query.dataset_type].timespan.overlaps(when))
                    .with_dimension_records()
                )
        if query.kind is QueryKind.SPATIAL:
            if region is None:
                return []
            return central.query_datasets(
                query.dataset_type, collections, data_id=dict(query.data_id), find_first=True,
                where=f"{query.region_dimension}.region OVERLAPS footprint", bind={"footprint": region},
                with_dimension_records=True, explain=False, limit=None,
            )
        return central.query_datasets(
            query.dataset_type, collections, data_id=dict(query.data_id), find_first=True,
            with_dimension_records=True, explain=False, limit=None,
        )
    except MissingDatasetTypeError:
        return []


def find_refs(central: Butler, plan: PreloadPlan, collections: list[str], when: Any,
              region: Region | None) -> list[tuple[DatasetQuery, list[DatasetRef]]]:
    """Every planned query's datasets in ``collections`` of the central repo.

    Parameters
    ----------
    when
        The visit time (``astropy.time.Time``, TAI) calibrations must be valid at.
    region
        The detector's padded predicted footprint (spatial queries find nothing without it).
    """
    return [(query, _query_one(central, query, collections, when, region)) for query in plan.queries]


def _certifications(central: Butler, refs: list[DatasetRef]) -> list[tuple[str, DatasetRef, Any]]:
    """(calibration collection, ref, timespan) of every central certification of ``refs``."""
    from lsst.daf.butler import CollectionType, DatasetAssociation

    out: list[tuple[str, DatasetRef, Any]] = []
    by_type: dict[str, list[DatasetRef]] = {}
    for ref in refs:
        by_type.setdefault(ref.datasetType.name, []).append(ref)
    calib_collections = list(central.collections.query("*", CollectionType.CALIBRATION))
    for name, typed in by_type.items():
        ids = {ref.id: ref for ref in typed}
        dataset_type = typed[0].datasetType
        data_ids = {tuple(sorted(ref.dataId.required.items())) for ref in typed}
        with central.query() as q:
            for data_id in data_ids:
                result = (
                    q.where(dict(data_id))
                    .join_dataset_search(dataset_type, calib_collections)
                    .general(dataset_type.dimensions,
                             dataset_fields={name: {"dataset_id", "run", "collection", "timespan"}},
                             find_first=False)
                )
                for assoc in DatasetAssociation.from_query_result(result, dataset_type):
                    if assoc.ref.id in ids and assoc.timespan is not None:
                        out.append((assoc.collection, ids[assoc.ref.id], assoc.timespan))
    return out


def _certified_locally(local: Butler, collection: str, ref: DatasetRef) -> set[Any]:
    """Timespans with which ``ref`` is already certified in the local ``collection``."""
    from lsst.daf.butler import DatasetAssociation

    spans: set[Any] = set()
    dataset_type = ref.datasetType
    with local.query() as q:
        result = (
            q.where(dict(ref.dataId.required))
            .join_dataset_search(dataset_type, [collection])
            .general(dataset_type.dimensions,
                     dataset_fields={dataset_type.name: {"dataset_id", "run", "collection", "timespan"}},
                     find_first=False)
        )
        for assoc in DatasetAssociation.from_query_result(result, dataset_type):
            if assoc.ref.id == ref.id:
                spans.add(assoc.timespan)
    return spans


def _structure(butler: Butler, collections: list[str]) -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """``collections`` and every collection they chain, as (name, type, children)."""
    infos = butler.collections.query_info(collections, flatten_chains=True, include_chains=True)
    return tuple((info.name, info.type.name, tuple(info.children)) for info in infos)


def _structure_if_any(butler: Butler, collections: list[str]) -> tuple[tuple[str, str, tuple[str, ...]], ...] | None:
    """:func:`_structure`, or None when one of ``collections`` is missing."""
    from lsst.daf.butler import MissingCollectionError

    try:
        return _structure(butler, collections)
    except MissingCollectionError:
        return None


def mirror_collections(central: Butler, local: Butler, collections: list[str],
                       known: dict[str, Any] | None = None) -> None:
    """Give the local repo the same (chained, calibration) collections as the central.

    ``known``: what this process knows of the local repo; the structure mirrored last is kept
    there. A structure the local repo already has (the usual visit; a new repo copied from a
    template that has it) is not written again.
    """
    from lsst.daf.butler import CollectionType

    structure = _structure(central, collections)
    if known is not None and known.get("mirrored") == structure:
        return
    if _structure_if_any(local, collections) != structure:
        chains: dict[str, list[str]] = {}
        for name, type_name, children in structure:
            if CollectionType[type_name] is CollectionType.CHAINED:
                chains[name] = list(children)
            local.registry.registerCollection(name, CollectionType[type_name])
        for chain, children in chains.items():
            if list(local.collections.get_info(chain).children) != children:
                local.collections.redefine_chain(chain, children)
    if known is not None:
        known["mirrored"] = structure


def _nbytes(local: Butler, ref: DatasetRef) -> int:
    try:
        return int(local.getURI(ref).size())
    except (FileNotFoundError, RuntimeError, ValueError):
        return 0


def preload(central: Butler, local: Butler, plan: PreloadPlan, collections: list[str], when: Any,
            region: Region | None, cache_bytes: int, local_root: Any,
            known: dict[str, Any] | None = None) -> PreloadReport:
    """Bring the datasets of ``plan`` from ``central`` into ``local``; see the module doc.

    Parameters
    ----------
    collections
        Central collections to search (the instrument's umbrella chain); the local repo gets
        the same collection structure.
    cache_bytes
        Budget of preloaded datasets kept in the local repo.
    local_root
        Directory of the local repo (where its cache index lives).
    known
        What this process knows of the local repo
        (:meth:`~prompt_tasks.butler.localrepo.Repos.known`): the collection
        structure it mirrored last is not written again.
    """
    report = PreloadReport()
    t0 = time.perf_counter()
    found = find_refs(central, plan, collections, when, region)
    wanted: dict[Any, tuple[DatasetQuery, DatasetRef]] = {}
    for query, refs in found:
        report.found[query.kind.value] = report.found.get(query.kind.value, 0) + len(refs)
        if not refs:
            report.missing.append(query.dataset_type)
        for ref in refs:
            wanted[ref.id] = (query, ref)
    present = {ref.id for ref in local.get_many_datasets(list(wanted))}
    report.times["query"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    new_refs = [ref for ref_id, (_, ref) in wanted.items() if ref_id not in present]
    for ref_id in present:
        kind = wanted[ref_id][0].kind.value
        report.reused[kind] = report.reused.get(kind, 0) + 1
    transferred = []
    if new_refs:
        transferred = list(local.transfer_from(
            central, new_refs, transfer="copy", skip_missing=True,
            register_dataset_types=True, transfer_dimensions=True,
        ))
    for ref in transferred:
        kind = wanted[ref.id][0].kind.value
        report.transferred[kind] = report.transferred.get(kind, 0) + 1
    report.times["transfer"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    mirror_collections(central, local, collections, known)
    calibs = [ref for _, (query, ref) in wanted.items() if query.kind is QueryKind.CALIBRATION]
    # Certify what is not yet certified locally: new calibs, and any a crash left uncertified.
    uncertified = [ref for ref in calibs if ref.id not in present]
    if len(uncertified) != len(calibs):
        cache = CacheIndex(local_root)
        uncertified += [ref for ref in calibs if ref.id in present and ref.id.hex not in cache.entries]
    for collection, ref, span in _certifications(central, uncertified):
        if span not in _certified_locally(local, collection, ref):
            local.registry.certify(collection, [ref], span)
            report.certified += 1
    report.times["certify"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    cache = CacheIndex(local_root)
    now = time.time()
    cache.touch((ref_id.hex for ref_id in present), now)
    for ref in transferred:
        cache.add(ref.id.hex, ref.datasetType.name, _nbytes(local, ref), now)
    evict = choose_evictions(cache.entries, (ref_id.hex for ref_id in wanted), cache_bytes)
    if evict:
        import uuid

        refs = local.get_many_datasets([uuid.UUID(hex=h) for h in evict])
        local.pruneDatasets(refs, disassociate=True, unstore=True, purge=True)
        cache.remove(evict)
        report.evicted = len(evict)
    cache.save()
    report.cache_bytes = cache.nbytes
    report.times["evict"] = time.perf_counter() - t3
    return report
