"""The central repository: everything Prompt Processing reads before any image arrives.

:func:`init_central` builds (or completes) the central Butler repository of the simulated
camera and its APDB:

- the repository (SQLite in the repo directory by default; PostgreSQL when ``registry_db``
  is a ``postgresql://`` URI, with the ``btree_gist`` extension its registry needs), created
  with the shared seed config (``CCDImage`` storage class), its datastore on the S3 server
  (``settings.central_datastore_uri``; the repository itself may be an ``s3://`` URI too), so
  that every host of a fleet reads and writes its files without a shared disk;
- the instrument's dimension records and the ``camera`` dataset (the simulated world's
  :class:`~prompt_tasks.instruments.simcam.config.SimConfig`);
- master bias, dark and flats per detector (flats per filter) for every calibration epoch,
  certified in ``SimCam/calib`` with the epoch's validity range;
- a tract/patch skymap (``skymap``/``tract``/``patch`` records and the ``skyMap`` dataset),
  template coadds over the survey area per band, and reference-catalog shards (``htm7``);
- an APDB, its config file where ``settings.apdb_config`` says (:func:`apdb_config_path`);
- the collection chains ``SimCam/templates`` and ``SimCam/defaults``.

Every step looks before it writes, so a second run writes nothing and says so. The repository
remembers the world it was built for: asking for another one (other detector count, size,
seed) is an error rather than a silent mix.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astropy.time import Time
from lsst.daf.butler import (
    Butler,
    CollectionType,
    DatasetRef,
    DatasetType,
    MissingCollectionError,
    MissingDatasetTypeError,
    Timespan,
)
from lsst.sphgeom import ConvexPolygon

from prompt_tasks.butler.apdb import APDB_CONFIG_NAME, apdb_config_path
from prompt_tasks.instruments import load_plugin
from prompt_tasks.objstore import configure_s3
from prompt_tasks.settings import Settings, mask_url

__all__ = [
    "APDB_CONFIG_NAME",
    "CALIB_COLLECTION",
    "DEFAULTS_COLLECTION",
    "RAW_RUN",
    "REFCAT_COLLECTION",
    "SKYMAP_COLLECTION",
    "TEMPLATE_COLLECTION",
    "CentralMismatch",
    "Step",
    "apdb_config_path",
    "calibration_runs",
    "database_url",
    "dataset_types",
    "init_central",
    "read_camera",
    "survey_region",
]

INSTRUMENT = "SimCam"
CALIB_COLLECTION = "SimCam/calib"
TEMPLATE_COLLECTION = "SimCam/templates"
TEMPLATE_RUN = "SimCam/templates/deep"
REFCAT_COLLECTION = "refcats/sim"
SKYMAP_COLLECTION = "skymaps"
DEFAULTS_COLLECTION = "SimCam/defaults"
RAW_RUN = "SimCam/raw/all"
CAMERA_RUN = "SimCam/calib/unbounded"
#: Images ingested per registry transaction.
_INGEST_BATCH = 64


class CentralMismatch(RuntimeError):
    """The repository was built for another simulated world than the one asked for."""


@dataclass
class Step:
    """What one step of :func:`init_central` found and wrote."""

    name: str
    created: int = 0
    existing: int = 0
    notes: list[str] = field(default_factory=list)


def calibration_runs(n_epochs: int) -> list[str]:
    """The RUN collection of each calibration epoch."""
    return [f"SimCam/calib/epoch{i + 1}" for i in range(n_epochs)]


def dataset_types(universe: Any) -> list[DatasetType]:
    """The dataset types of the central repository (see DATASETS.md)."""
    def make(name: str, dims: Iterable[str], storage: str, calib: bool = False) -> DatasetType:
        return DatasetType(name, tuple(dims), storage, universe=universe, isCalibration=calib)

    return [
        make("raw", ("instrument", "exposure", "detector"), "CCDImage"),
        make("camera", ("instrument",), "StructuredDataDict", calib=True),
        make("bias", ("instrument", "detector"), "CCDImage", calib=True),
        make("dark", ("instrument", "detector"), "CCDImage", calib=True),
        make("flat", ("instrument", "detector", "physical_filter"), "CCDImage", calib=True),
        make("skyMap", ("skymap",), "StructuredDataDict"),
        make("template_coadd", ("skymap", "tract", "patch", "band"), "CCDImage"),
        make("sim_refcat", ("htm7",), "ArrowAstropy"),
    ]


def survey_region(config: Any) -> tuple[float, ConvexPolygon]:
    """Half-width (deg) and polygon of the square every pointing's footprint falls in."""
    from prompt_tasks.instruments.simcam.skymap import SimSkyMap

    half = config.field_radius + config.focal_plane.radius_deg + 0.01
    skymap = SimSkyMap.for_field(config.field_ra, config.field_dec, half, patch_inner=config.patch_size)
    return half, skymap.tract_region(0)


def read_camera(butler: Butler) -> dict[str, Any] | None:
    """The ``camera`` dataset (the simulated world's config) of a repository, or None."""
    try:
        refs = butler.query_datasets("camera", collections=CAMERA_RUN, instrument=INSTRUMENT,
                                     explain=False)
    except (MissingDatasetTypeError, MissingCollectionError):  # not built yet
        return None
    return dict(butler.get(refs[0])) if refs else None


def _existing(butler: Butler, dataset_type: str, run: str) -> set[tuple[Any, ...]]:
    """Data-id value tuples of ``dataset_type`` already in ``run``."""
    refs = butler.query_datasets(dataset_type, collections=run, find_first=False, explain=False)
    return {tuple(ref.dataId.required.values()) for ref in refs}


def _key(butler: Butler, dataset_type: str, data_id: dict[str, Any]) -> tuple[Any, ...]:
    dims = butler.get_dataset_type(dataset_type).dimensions.required
    return tuple(data_id[name] for name in dims)


def database_url(url: str) -> str:
    """``url`` with the driver installed here made explicit (``postgresql://`` → psycopg2).

    SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not a dependency.
    """
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


def _ensure_postgres(url: str, namespace: str | None) -> None:
    """Create the ``btree_gist`` extension (and the schema) a PostgreSQL registry needs."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE EXTENSION IF NOT EXISTS btree_gist"))
            if namespace:
                conn.execute(sqlalchemy.text(f'CREATE SCHEMA IF NOT EXISTS "{namespace}"'))
    finally:
        engine.dispose()


def _open_repo(uri: str, registry_db: str | None, namespace: str | None, datastore_root: str | None,
               step: Step) -> Butler:
    from lsst.resources import ResourcePath

    from prompt_tasks.instruments.simcam.formatter import seed_config

    root = ResourcePath(uri, forceDirectory=True)
    if root.join("butler.yaml").exists():
        step.existing += 1
    else:
        config = seed_config(registry_db)
        if registry_db and registry_db.startswith("postgresql"):
            _ensure_postgres(registry_db, namespace)
            if namespace:
                config["registry", "namespace"] = namespace
        if datastore_root:
            config["datastore", "root"] = datastore_root
        # forceConfigRoot=False keeps our datastore root (by default makeRepo resets it to the repo's)
        Butler.makeRepo(root, config=config, forceConfigRoot=not datastore_root)
        step.created += 1
        step.notes.append(str(root) + (f", datastore {datastore_root}" if datastore_root else ""))
    return Butler.from_config(str(root), writeable=True)


def _buckets_for(settings: Settings) -> None:
    """Create the buckets the central repo (or its datastore) lives in, when on our S3 server."""
    from prompt_tasks.objstore import ensure_plain_bucket, make_client

    buckets = {uri.removeprefix("s3://").split("/", 1)[0]
               for uri in (settings.central_repo_uri, settings.central_datastore_uri or "") if uri.startswith("s3://")}
    if buckets:
        client = make_client(settings)
        for bucket in sorted(buckets):
            ensure_plain_bucket(client, bucket)


def _put_missing(butler: Butler, dataset_type: str, run: str, wanted: Iterable[dict[str, Any]],
                 make: Callable[[dict[str, Any]], Any], step: Step) -> list[DatasetRef]:
    """Store the datasets of ``wanted`` data ids not yet in ``run``; return the new refs.

    Images are written to files and ingested in batches (one registry transaction per batch,
    deterministic dataset ids), which is several times faster than one ``put`` each.
    """
    butler.registry.registerRun(run)
    have = _existing(butler, dataset_type, run)
    missing = []
    for data_id in wanted:
        if _key(butler, dataset_type, data_id) in have:
            step.existing += 1
        else:
            missing.append(data_id)
    step.created += len(missing)
    if butler.get_dataset_type(dataset_type).storageClass_name != "CCDImage":
        return [butler.put(make(data_id), dataset_type, data_id, run=run) for data_id in missing]
    refs: list[DatasetRef] = []
    for start in range(0, len(missing), _INGEST_BATCH):
        refs += _ingest_images(butler, dataset_type, run, missing[start:start + _INGEST_BATCH], make)
    return refs


def _ingest_images(butler: Butler, dataset_type: str, run: str, data_ids: list[dict[str, Any]],
                   make: Callable[[dict[str, Any]], Any]) -> list[DatasetRef]:
    """Write ``CCDImage`` datasets to files and ingest them in one transaction."""
    import tempfile

    from lsst.daf.butler import DatasetIdGenEnum, FileDataset

    from prompt_tasks.instruments.simcam.formatter import CCDImageFormatter, write_ccd

    dtype = butler.get_dataset_type(dataset_type)
    datasets, refs = [], []
    with tempfile.TemporaryDirectory(prefix="central-") as tmp:
        for i, data_id in enumerate(data_ids):
            path = Path(tmp) / f"{i}.fits"
            write_ccd(make(data_id)).writeto(path)
            ref = DatasetRef(dtype, butler.registry.expandDataId(data_id), run=run,
                             id_generation_mode=DatasetIdGenEnum.DATAID_TYPE_RUN)
            datasets.append(FileDataset(path=str(path), refs=[ref], formatter=CCDImageFormatter))
            refs.append(ref)
        butler.ingest(*datasets, transfer="move")
    return refs


def init_central(settings: Settings, instrument: str = INSTRUMENT, *, config: Any = None,
                 registry_db: str | None = None, registry_namespace: str | None = None,
                 apdb_namespace: str | None = None, echo: Callable[[str], None] | None = None) -> list[Step]:
    """Build or complete the central repository and the APDB (idempotent).

    Parameters
    ----------
    settings
        Gives the repository URI (``central_repo_uri``), the APDB URL (``apdb_uri``) and the
        state directory (for the APDB config file).
    instrument
        Only ``SimCam`` has a simulated central repository.
    config
        The simulated world (:class:`~prompt_tasks.instruments.simcam.config.SimConfig`);
        default: the one the repository was built with, else the defaults.
    registry_db, registry_namespace
        A PostgreSQL URL (and schema) for the registry; default SQLite inside the repository.
    apdb_namespace
        PostgreSQL schema of the APDB tables.
    echo
        Called with a line per step as it finishes.

    Returns
    -------
    list[Step]
        What each step created and found already there.

    Raises
    ------
    CentralMismatch
        The repository was built for another ``config``.
    """
    if instrument != INSTRUMENT:
        raise ValueError(f"only {INSTRUMENT} has a simulated central repository, not {instrument!r}")
    say = echo or (lambda line: None)
    steps: list[Step] = []

    def done(step: Step) -> None:
        steps.append(step)
        say(f"{step.name}: {step.created} created, {step.existing} already there"
            + (f" ({'; '.join(step.notes)})" if step.notes else ""))

    if any(uri.startswith("s3://") for uri in (settings.central_repo_uri, settings.central_datastore_uri or "")):
        configure_s3(settings)
        _buckets_for(settings)
    step = Step("repository")
    butler = _open_repo(settings.central_repo_uri, database_url(registry_db) if registry_db else None,
                        registry_namespace, settings.central_datastore_uri, step)
    done(step)
    config = _world(settings, butler, config)
    done(_register(butler, instrument))
    done(_calibrations(butler, instrument, config))
    skymap, region = _skymap(butler, config, done)
    done(_templates(butler, config, skymap))
    done(_refcat(butler, config, region))
    done(_collections(butler))
    done(_init_apdb(settings, apdb_namespace))
    return steps


def _world(settings: Settings, butler: Butler, config: Any) -> Any:
    """The world to build: ``config``, else the stored one, else the defaults."""
    from prompt_tasks.instruments.simcam.config import SimConfig

    stored = read_camera(butler)
    if config is None:
        return SimConfig.model_validate(stored) if stored else SimConfig()
    if stored is not None and SimConfig.model_validate(stored) != config:
        built = SimConfig.model_validate(stored).model_dump()
        asked = config.model_dump()
        diff = ", ".join(f"{k}: built {built[k]!r}, asked {asked[k]!r}" for k in built if built[k] != asked[k])
        raise CentralMismatch(f"{settings.central_repo_uri} was built for another world ({diff}); "
                              "use the same options or a new repository")
    return config


def _register(butler: Butler, instrument: str) -> Step:
    """The instrument's records, the dataset types and the raw run."""

    step = Step("instrument")
    had = _has_instrument(butler)
    load_plugin(instrument).instrument_class().register(butler.registry)
    step.existing += int(had)
    step.created += int(not had)
    for dataset_type in dataset_types(butler.dimensions):
        if butler.registry.registerDatasetType(dataset_type):
            step.created += 1
        else:
            step.existing += 1
    butler.registry.registerRun(RAW_RUN)
    return step


def _calibrations(butler: Butler, instrument: str, config: Any) -> Step:
    """The ``camera`` and the master calibrations of every epoch, certified."""
    from prompt_tasks.instruments.simcam import calibs
    from prompt_tasks.instruments.simcam.geometry import band_of, physical_filter

    step = Step("calibrations")
    butler.registry.registerCollection(CALIB_COLLECTION, CollectionType.CALIBRATION)
    camera_refs = _put_missing(butler, "camera", CAMERA_RUN, [{"instrument": instrument}],
                               lambda _: config.model_dump(mode="json"), step)
    if camera_refs:
        butler.registry.certify(CALIB_COLLECTION, camera_refs, Timespan(None, None))
    starts = [Time(e, scale="tai") for e in config.epochs]
    detectors = [{"instrument": instrument, "detector": d} for d in range(config.n_detectors)]
    flats = [{"instrument": instrument, "detector": d, "physical_filter": physical_filter(b)}
             for d in range(config.n_detectors) for b in config.bands]
    for epoch, run in enumerate(calibration_runs(len(starts))):
        validity = Timespan(starts[epoch], starts[epoch + 1] if epoch + 1 < len(starts) else None)
        new = _put_missing(butler, "bias", run, detectors,
                           lambda d, e=epoch: calibs.master_bias(config, d["detector"], e), step)
        new += _put_missing(butler, "dark", run, detectors,
                            lambda d, e=epoch: calibs.master_dark(config, d["detector"], e), step)
        new += _put_missing(
            butler, "flat", run, flats,
            lambda d, e=epoch: calibs.master_flat(config, d["detector"], band_of(d["physical_filter"]), e),
            step)
        if new:
            butler.registry.certify(CALIB_COLLECTION, new, validity)
            step.notes.append(f"{run} valid {validity.begin.isot if validity.begin else '-inf'}"
                              f"..{validity.end.isot if validity.end else 'inf'}")
    return step


def _skymap(butler: Butler, config: Any, done: Callable[[Step], None]) -> tuple[Any, ConvexPolygon]:
    """The skymap's records and ``skyMap`` dataset; returns it and the survey region."""
    from prompt_tasks.instruments.simcam.skymap import SKYMAP, SimSkyMap

    half, region = survey_region(config)
    skymap = SimSkyMap.for_field(config.field_ra, config.field_dec, half, name=SKYMAP,
                                 patch_inner=config.patch_size)
    step = Step("skymap")
    _, _, nx, ny = skymap.tracts[0]
    inserted = butler.registry.syncDimensionData(
        "skymap", {"name": SKYMAP, "hash": skymap.hash, "tract_max": len(skymap.tracts),
                   "patch_nx_max": nx, "patch_ny_max": ny})
    if inserted:
        butler.registry.insertDimensionData(
            "tract", *[{"skymap": SKYMAP, "id": t, "region": skymap.tract_region(t)} for t in skymap.tracts],
            skip_existing=True)
        butler.registry.insertDimensionData(
            "patch", *[{"skymap": SKYMAP, "tract": p.tract, "id": p.id, "cell_x": p.cell_x,
                        "cell_y": p.cell_y, "region": p.region}
                       for t in skymap.tracts for p in skymap.patches(t)],
            skip_existing=True)
    _put_missing(butler, "skyMap", SKYMAP_COLLECTION, [{"skymap": SKYMAP}], lambda _: skymap.to_dict(), step)
    step.notes.append(f"{SKYMAP}: {len(skymap.tracts)} tract, {nx}x{ny} patches of "
                      f"{skymap.patch_inner}+2x{skymap.patch_border} px")
    done(step)
    return skymap, region


def _templates(butler: Butler, config: Any, skymap: Any) -> Step:
    """A template coadd per patch and band, and the templates chain."""
    from prompt_tasks.instruments.simcam import templates
    from prompt_tasks.instruments.simcam.sky import Sky

    sky = Sky(config)
    step = Step("templates")
    wanted = [{"skymap": skymap.name, "tract": p.tract, "patch": p.id, "band": band}
              for t in skymap.tracts for p in skymap.patches(t) for band in config.bands]
    _put_missing(butler, "template_coadd", TEMPLATE_RUN, wanted,
                 lambda d: templates.make_template(config, skymap, d["tract"], d["patch"], d["band"], sky), step)
    butler.registry.registerCollection(TEMPLATE_COLLECTION, CollectionType.CHAINED)
    butler.registry.setCollectionChain(TEMPLATE_COLLECTION, [TEMPLATE_RUN])
    return step


def _refcat(butler: Butler, config: Any, region: ConvexPolygon) -> Step:
    """The reference-catalog shards over the survey region."""
    from prompt_tasks.instruments.simcam import refcat
    from prompt_tasks.instruments.simcam.sky import Sky

    sky = Sky(config)
    step = Step("refcat")
    shards = [{"htm7": index} for index in sky.trixels(region)]
    _put_missing(butler, "sim_refcat", REFCAT_COLLECTION, shards,
                 lambda d: refcat.refcat_shard(config, d["htm7"], sky), step)
    return step


def _collections(butler: Butler) -> Step:
    """The umbrella chain the pipelines read from."""
    step = Step("collections")
    chain = [CALIB_COLLECTION, TEMPLATE_COLLECTION, REFCAT_COLLECTION, SKYMAP_COLLECTION]
    if butler.registry.registerCollection(DEFAULTS_COLLECTION, CollectionType.CHAINED):
        step.created += 1
    else:
        step.existing += 1
    if list(butler.registry.getCollectionChain(DEFAULTS_COLLECTION)) != chain:
        butler.registry.setCollectionChain(DEFAULTS_COLLECTION, chain)
    step.notes.append(f"{DEFAULTS_COLLECTION} = {chain}")
    return step


def _has_instrument(butler: Butler) -> bool:
    return any(True for _ in butler.registry.queryDimensionRecords("instrument", instrument=INSTRUMENT))


def _init_apdb(settings: Settings, namespace: str | None) -> Step:
    """Create the APDB schema and write its config file, unless both exist."""
    from lsst.dax.apdb import Apdb
    from lsst.dax.apdb.sql import ApdbSql

    step = Step("apdb")
    path = apdb_config_path(settings)
    url = database_url(settings.apdb_uri)
    if path.exists():
        Apdb.from_uri(str(path))  # proves the config and the schema are usable
        step.existing += 1
    else:
        if path.isLocal:
            Path(path.ospath).parent.mkdir(parents=True, exist_ok=True)
        if url.startswith("postgresql"):
            _ensure_postgres(url, namespace)
        apdb_config = ApdbSql.init_database(url, namespace=namespace, drop=False)
        apdb_config.save(str(path))
        step.created += 1

    step.notes.append(f"{mask_url(url)}, config {path}")
    return step
